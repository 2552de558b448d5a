"""Stage 2 of the Gaussian rasterizer: bin screen-space Gaussians into 16x16 pixel tiles.

Not differentiable (it only decides *which* Gaussians each tile composites, and in which
order). Every backend shares this function, so their compositing order is identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TILE_SIZE = 16


@dataclass
class TileIntersections:
    """Per-tile lists of Gaussians, front to back.

    ``gaussian_ids[tile_offsets[t]:tile_offsets[t+1]]`` are the flat ids (camera * N + gaussian)
    overlapping tile t, sorted by depth; tiles are numbered camera-major, then row-major.
    """

    gaussian_ids: Tensor  # [M] int64
    tile_offsets: Tensor  # [C*tiles_y*tiles_x + 1] int64
    tiles_x: int
    tiles_y: int
    tile_size: int

    @property
    def num_tiles(self) -> int:
        return self.tile_offsets.numel() - 1


def tile_grid(width: int, height: int, tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """Number of tiles (x, y) covering an image."""
    return (width + tile_size - 1) // tile_size, (height + tile_size - 1) // tile_size


def tile_ranges(means2d: Tensor, radii: Tensor, tiles_x: int, tiles_y: int, tile_size: int) -> tuple[Tensor, ...]:
    """Half-open tile rectangles [x0,x1) x [y0,y1) covered by each Gaussian's box, clamped to the grid."""
    mx, my = means2d.detach().unbind(-1)
    rx, ry = radii[..., 0].to(mx.dtype), radii[..., 1].to(mx.dtype)
    x0 = torch.floor((mx - rx) / tile_size).clamp(0, tiles_x).long()
    x1 = torch.ceil((mx + rx) / tile_size).clamp(0, tiles_x).long()
    y0 = torch.floor((my - ry) / tile_size).clamp(0, tiles_y).long()
    y1 = torch.ceil((my + ry) / tile_size).clamp(0, tiles_y).long()
    return x0, x1, y0, y1


def intersect_tiles(
    means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int, tile_size: int = TILE_SIZE
) -> TileIntersections:
    """List, for every tile of every camera, the Gaussians whose box overlaps it, sorted by depth.

    means2d [C,N,2], radii [C,N,2] (0 = culled), depths [C,N].
    """
    C, N = depths.shape
    device = depths.device
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    x0, x1, y0, y1 = tile_ranges(means2d, radii, tiles_x, tiles_y, tile_size)
    visible = radii[..., 0] > 0
    span_x = (x1 - x0).clamp_min(0)
    counts = (span_x * (y1 - y0).clamp_min(0) * visible).flatten()  # [C*N]

    flat_ids = torch.repeat_interleave(torch.arange(C * N, device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(flat_ids.numel(), device=device) - starts[flat_ids]
    width_in_tiles = span_x.flatten()[flat_ids]
    tile_x = x0.flatten()[flat_ids] + local % width_in_tiles.clamp_min(1)
    tile_y = y0.flatten()[flat_ids] + local // width_in_tiles.clamp_min(1)
    camera = flat_ids // N
    tile = (camera * tiles_y + tile_y) * tiles_x + tile_x

    # Sort by depth, then stably by tile: within a tile, front to back (ties by id).
    by_depth = torch.sort(depths.detach().flatten()[flat_ids], stable=True).indices
    by_tile = torch.sort(tile[by_depth], stable=True).indices
    order = by_depth[by_tile]

    num_tiles = C * tiles_y * tiles_x
    per_tile = torch.bincount(tile, minlength=num_tiles)
    offsets = torch.zeros(num_tiles + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(per_tile, 0)
    return TileIntersections(flat_ids[order], offsets, tiles_x, tiles_y, tile_size)

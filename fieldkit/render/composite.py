"""Stage 3 of the Gaussian rasterizer: front-to-back alpha compositing per pixel.

Reference implementation in PyTorch (autograd gives the backward). Tiles are processed in
chunks of similar list length so memory stays bounded (no dense Gaussians x pixels tensor).

Per pixel (sampled at its centre, +0.5), walking the tile's Gaussians front to back:
    sigma = 0.5 (a dx^2 + c dy^2) + b dx dy       (skip if sigma < 0)
    alpha = min(0.999, opacity * exp(-sigma))       (skip if alpha < 1/255)
    stop before the Gaussian that would bring T below 1e-4
    out += alpha * T * feature;  T *= 1 - alpha
    image = out + T * background;  pixel alpha = 1 - T
"""

from __future__ import annotations

import torch
from torch import Tensor

from fieldkit.render.tiles import TileIntersections

ALPHA_MAX = 0.999
ALPHA_MIN = 1.0 / 255.0
TRANSMITTANCE_MIN = 1e-4
# Upper bound on (tiles x pixels x Gaussians) elements per chunk: bounds peak memory.
CHUNK_ELEMENTS = 1 << 21


def composite_tiles(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    isect: TileIntersections,
    width: int,
    height: int,
    background: Tensor,
) -> tuple[Tensor, Tensor]:
    """Composite per-camera features into images.

    means2d [C,N,2], conics [C,N,3], opacities [C,N], features [C,N,D], background [C,D].
    Returns (image [C,H,W,D], alpha [C,H,W,1]).
    """
    C, N, D = features.shape
    ts = isect.tile_size
    device, dtype = features.device, features.dtype
    flat_means = means2d.reshape(C * N, 2)
    flat_conics = conics.reshape(C * N, 3)
    flat_opac = opacities.reshape(C * N)
    flat_feat = features.reshape(C * N, D)

    counts = isect.tile_offsets[1:] - isect.tile_offsets[:-1]
    tiles_per_cam = isect.tiles_x * isect.tiles_y
    pix = torch.arange(ts, device=device, dtype=dtype) + 0.5
    pix_y, pix_x = torch.meshgrid(pix, pix, indexing="ij")
    pix_local = torch.stack([pix_x.flatten(), pix_y.flatten()], dim=-1)  # [P,2], P = ts*ts

    tile_out = [torch.zeros(0, ts * ts, D + 1, device=device, dtype=dtype)]
    tile_ids = [torch.zeros(0, dtype=torch.int64, device=device)]
    active = torch.nonzero(counts > 0).flatten()
    active = active[torch.argsort(counts[active], stable=True)]
    for chunk in _chunks_within_budget(counts[active].tolist(), ts * ts):
        tiles = active[chunk]
        tile_out.append(
            _composite_chunk(
                tiles, int(counts[tiles[-1]]), isect, counts, flat_means, flat_conics, flat_opac,
                flat_feat, pix_local, tiles_per_cam,
            )
        )
        tile_ids.append(tiles)

    # Empty tiles show the background: accumulated features 0, transmittance 1.
    empty = torch.zeros(1, 1, D + 1, device=device, dtype=dtype)
    empty[..., D] = 1.0
    all_tiles = empty.expand(isect.num_tiles, ts * ts, D + 1)
    all_tiles = all_tiles.index_put((torch.cat(tile_ids),), torch.cat(tile_out))
    grid = all_tiles.reshape(C, isect.tiles_y, isect.tiles_x, ts, ts, D + 1)
    grid = grid.permute(0, 1, 3, 2, 4, 5).reshape(C, isect.tiles_y * ts, isect.tiles_x * ts, D + 1)
    grid = grid[:, :height, :width]
    accumulated, transmittance = grid[..., :D], grid[..., D:]
    image = accumulated + transmittance * background[:, None, None, :]
    return image, 1.0 - transmittance


def _chunks_within_budget(sorted_counts: list[int], pixels_per_tile: int) -> list[slice]:
    """Split tiles (sorted by list length) into runs whose padded size stays within CHUNK_ELEMENTS."""
    chunks, start = [], 0
    while start < len(sorted_counts):
        end = start + 1
        while end < len(sorted_counts) and (end + 1 - start) * sorted_counts[end] * pixels_per_tile <= CHUNK_ELEMENTS:
            end += 1
        chunks.append(slice(start, end))
        start = end
    return chunks


def _composite_chunk(
    tiles: Tensor,
    longest: int,
    isect: TileIntersections,
    counts: Tensor,
    flat_means: Tensor,
    flat_conics: Tensor,
    flat_opac: Tensor,
    flat_feat: Tensor,
    pix_local: Tensor,
    tiles_per_cam: int,
) -> Tensor:
    """Composite a chunk of tiles; returns [T, P, D+1] (accumulated features, final transmittance)."""
    slot = torch.arange(longest, device=tiles.device)
    in_list = slot[None, :] < counts[tiles][:, None]  # [T,L]
    entry = (isect.tile_offsets[tiles][:, None] + slot[None, :]).clamp_max(max(isect.gaussian_ids.numel() - 1, 0))
    gid = torch.where(in_list, isect.gaussian_ids[entry], torch.zeros_like(entry))  # [T,L]

    local_tile = tiles % tiles_per_cam
    origin = torch.stack([local_tile % isect.tiles_x, local_tile // isect.tiles_x], dim=-1) * isect.tile_size
    pixels = origin[:, None, :].to(pix_local.dtype) + pix_local[None]  # [T,P,2]

    mean = flat_means[gid]  # [T,L,2]
    conic = flat_conics[gid]  # [T,L,3]
    dx = mean[:, None, :, 0] - pixels[:, :, None, 0]  # [T,P,L]
    dy = mean[:, None, :, 1] - pixels[:, :, None, 1]
    a, b, c = (conic[:, None, :, k] for k in range(3))
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    # sigma < 0 is skipped below; clamping first keeps exp finite so masked gradients stay 0, not NaN.
    alpha = torch.clamp(flat_opac[gid][:, None, :] * torch.exp(-sigma.clamp_min(0)), max=ALPHA_MAX)
    used = in_list[:, None, :] & (sigma >= 0) & (alpha >= ALPHA_MIN)
    alpha = torch.where(used, alpha, torch.zeros_like(alpha))

    # Stop before the Gaussian that would take the transmittance to <= 1e-4.
    transmittance_after = torch.cumprod(1.0 - alpha.detach(), dim=-1)
    alpha = torch.where(transmittance_after > TRANSMITTANCE_MIN, alpha, torch.zeros_like(alpha))

    # T_i = prod_{j<i} (1 - alpha_j), computed as exp(cumsum(log(1 - alpha))): same value,
    # cheaper backward than cumprod (alpha <= 0.999 keeps the logarithm finite).
    log_transmittance = torch.cumsum(torch.log1p(-alpha), dim=-1)
    transmittance_incl = torch.exp(log_transmittance)
    transmittance_before = torch.exp(log_transmittance - torch.log1p(-alpha))
    weights = alpha * transmittance_before  # [T,P,L]
    accumulated = torch.einsum("tpl,tld->tpd", weights, flat_feat[gid])
    return torch.cat([accumulated, transmittance_incl[..., -1:]], dim=-1)

"""Occupancy grid over the unit cube: which cells may hold density, refreshed during training.

Follows instant-ngp / nerfacc: a grid of running values ``v`` (the field's opacity over one
render step, sigma * step) decays by ``decay`` at every update and takes the maximum with fresh
evaluations at a random point inside each visited cell. Warm-up updates visit every cell; later
ones visit a random subset of all cells plus a random subset of the occupied ones (so a CPU
update stays cheap). A cell is occupied when ``v > min(threshold, mean(v))``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class OccupancyGrid:
    def __init__(self, resolution: int = 128, device: torch.device | str = "cpu"):
        self.resolution = int(resolution)
        n = self.resolution**3
        self.values = torch.zeros(n, device=device)
        self.binary = torch.ones(n, dtype=torch.bool, device=device)  # everything occupied until the first update
        self._box: Tensor | None = None
        self._coarse: tuple | None = None
        self.updates = 0

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device) -> "OccupancyGrid":
        self.values = self.values.to(device)
        self.binary = self.binary.to(device)
        self._box = None
        self._coarse = None
        return self

    def cell_index(self, unit_points: Tensor) -> tuple[Tensor, Tensor]:
        """(flat cell index [S], inside [S]) of points in unit coordinates (x fastest)."""
        R = self.resolution
        cell = torch.floor(unit_points * R).long()
        inside = ((cell >= 0) & (cell < R)).all(dim=-1)
        cell = cell.clamp(0, R - 1)
        return cell[..., 0] + R * (cell[..., 1] + R * cell[..., 2]), inside

    def query(self, unit_points: Tensor) -> Tensor:
        """bool [S]: the point lies inside the cube in an occupied cell."""
        index, inside = self.cell_index(unit_points)
        return inside & self.binary[index]

    def coarse(self, factor: int) -> tuple[Tensor, int]:
        """(bool [r^3], r): the grid max-pooled by ``factor`` and dilated by one coarse cell (cached)."""
        key = int(factor)
        if self._coarse is None or self._coarse[0] != key:
            R = self.resolution
            r = max(1, R // key)
            grid = self.binary.reshape(1, 1, R, R, R).permute(0, 1, 4, 3, 2).float()  # [.., z, y, x]
            pooled = torch.nn.functional.adaptive_max_pool3d(grid, r)
            dilated = torch.nn.functional.max_pool3d(pooled, 3, stride=1, padding=1)
            self._coarse = (key, dilated[0, 0].permute(2, 1, 0).reshape(-1) > 0, r)  # back to x fastest
        return self._coarse[1], self._coarse[2]

    def occupancy_fraction(self) -> float:
        return float(self.binary.float().mean())

    def occupied_box(self) -> Tensor | None:
        """[2,3] unit-cube box around all occupied cells (None when nothing is occupied)."""
        if self._box is None:
            R = self.resolution
            idx = self.binary.nonzero()[:, 0]
            if idx.numel() == 0:
                return None
            coords = torch.stack([idx % R, (idx // R) % R, idx // (R * R)], dim=-1)
            self._box = torch.stack([coords.amin(0).float() / R, (coords.amax(0).float() + 1) / R])
        return self._box

    def cell_centers(self, index: Tensor) -> Tensor:
        R = self.resolution
        coords = torch.stack([index % R, (index // R) % R, index // (R * R)], dim=-1).float()
        return (coords + 0.5) / R

    @torch.no_grad()
    def update(
        self,
        opacity_fn: Callable[[Tensor], Tensor],
        *,
        threshold: float = 0.01,
        decay: float = 0.95,
        all_cells: bool = False,
        n_uniform: int = 1 << 16,
        n_occupied: int = 1 << 16,
        generator: torch.Generator | None = None,
        chunk: int = 1 << 17,
    ) -> None:
        """Refresh from ``opacity_fn`` (unit points [S,3] -> sigma * step [S])."""
        n = self.values.numel()
        gen_device = generator.device if generator is not None else self.device
        if all_cells or n_uniform + n_occupied >= n:
            index = torch.arange(n, device=self.device)
        else:
            uniform = torch.randint(0, n, (n_uniform,), generator=generator, device=gen_device).to(self.device)
            occupied = self.binary.nonzero()[:, 0]
            if occupied.numel() > 0:
                pick = torch.randint(0, occupied.numel(), (n_occupied,), generator=generator, device=gen_device).to(self.device)
                index = torch.cat([uniform, occupied[pick]])
            else:
                index = uniform
        R = self.resolution
        coords = torch.stack([index % R, (index // R) % R, index // (R * R)], dim=-1).float()
        jitter = torch.rand(coords.shape, generator=generator, device=gen_device).to(self.device)
        points = (coords + jitter) / R
        fresh = torch.cat([opacity_fn(points[i : i + chunk]).reshape(-1).float() for i in range(0, len(points), chunk)])
        self.values.mul_(decay)
        self.values.scatter_reduce_(0, index, fresh, reduce="amax")
        limit = min(threshold, float(self.values.mean()))
        self.binary = self.values > limit
        self._box = None
        self._coarse = None
        self.updates += 1

    def mark_all(self, occupied: bool = True) -> None:
        self.binary.fill_(occupied)
        self._box = None
        self._coarse = None

    def state_dict(self) -> dict:
        return {"resolution": self.resolution, "values": self.values.cpu(), "binary": self.binary.cpu(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.resolution = int(state["resolution"])
        self.values = state["values"].to(self.device)
        self.binary = state["binary"].to(self.device)
        self.updates = int(state.get("updates", 0))
        self._box = None
        self._coarse = None

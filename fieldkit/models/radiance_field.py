"""Instant-NGP-class radiance field: hash grid -> density MLP -> (SH view encoding) -> colour MLP.

Points come in unit-cube coordinates (see :class:`fieldkit.render.volume.SceneSpace`).

* density MLP: hash features [L*F] -> ``hidden`` x ``density_layers`` -> 1 + ``geo_features``;
  sigma = trunc_exp(raw - 1) (exp with its gradient clamped);
* colour MLP: [geo features, SH degree-4 encoding of the view direction (16)] -> ``hidden`` x
  ``color_layers`` -> 3, sigmoid.

With CAM (:mod:`fieldkit.fields.cam`) every hidden layer is normalised (no affine) and
modulated by scale/shift grids read at a coordinate: the position (a 3-D grid over the unit
cube, ``cam_coord = "xyz"``, all hidden layers) or the view direction (azimuth x elevation,
``"dir"``, the coordinate CAM uses for Mip-NeRF; here only the colour MLP's layers, so density
stays a function of position alone, which the occupancy grid and early termination rely on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fieldkit.fields.cam import ModulatedMLP, ModulationGrid
from fieldkit.fields.hashgrid import HashGrid, HashGridConfig
from fieldkit.render.sh import sh_basis


class _TruncExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15))


def trunc_exp(x: Tensor) -> Tensor:
    """exp(x) whose gradient uses exp(min(x, 15)) (instant-ngp's density activation)."""
    return _TruncExp.apply(x)


def sh_encoding(dirs: Tensor) -> Tensor:
    """Spherical harmonics of unit directions, 4 bands (16 values; tcnn's 'degree 4')."""
    return sh_basis(3, dirs)


def direction_angles(dirs: Tensor) -> Tensor:
    """Unit directions -> (azimuth / pi, 2 * elevation / pi), each in [-1, 1]."""
    azimuth = torch.atan2(dirs[:, 1], dirs[:, 0]) / math.pi
    elevation = torch.asin(dirs[:, 2].clamp(-1, 1)) * (2 / math.pi)
    return torch.stack([azimuth, elevation], dim=-1)


@dataclass
class FieldConfig:
    grid: HashGridConfig = field(default_factory=HashGridConfig)
    hidden: int = 64
    density_layers: int = 1
    color_layers: int = 2
    geo_features: int = 15
    cam: bool = False
    cam_coord: str = "xyz"
    cam_resolution: tuple[int, ...] = (16, 16, 16)
    cam_normalize: bool = True
    implementation: str = "auto"


class RadianceField(nn.Module):
    def __init__(self, config: FieldConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.encoding = HashGrid(config.grid, 3, implementation=config.implementation, generator=generator)
        norm = config.cam and config.cam_normalize
        self.density_mlp = ModulatedMLP(self.encoding.output_dim, config.hidden, config.density_layers,
                                        1 + config.geo_features, normalize=norm)
        self.color_mlp = ModulatedMLP(config.geo_features + 16, config.hidden, config.color_layers, 3, normalize=norm)
        self.cam: ModulationGrid | None = None
        if config.cam:
            if config.cam_coord not in ("xyz", "dir"):
                raise ValueError(f"cam_coord must be 'xyz' or 'dir', got {config.cam_coord!r}")
            n_layers = config.color_layers + (config.density_layers if config.cam_coord == "xyz" else 0)
            self.cam = ModulationGrid(n_layers, config.cam_resolution)

    # parameter groups ------------------------------------------------------------------------
    def grid_parameters(self) -> list[nn.Parameter]:
        return [self.encoding.params]

    def mlp_parameters(self) -> list[nn.Parameter]:
        return list(self.density_mlp.parameters()) + list(self.color_mlp.parameters())

    def cam_parameters(self) -> list[nn.Parameter]:
        return list(self.cam.parameters()) if self.cam is not None else []

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # evaluation ------------------------------------------------------------------------------
    def _modulation(self, points: Tensor, dirs: Tensor | None):
        if self.cam is None:
            return None, None
        if self.config.cam_coord == "xyz":
            gamma, beta = self.cam(points * 2 - 1)
            k = self.config.density_layers
            return (gamma[:k], beta[:k]), (gamma[k:], beta[k:])
        if dirs is None:
            return None, None
        return None, self.cam(direction_angles(dirs))

    def _base(self, points: Tensor, mod, encoding: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        features = self.encoding(points, encoding)
        raw = self.density_mlp(features, mod)
        sigma = trunc_exp(raw[:, 0] - 1.0)
        return sigma, raw[:, 1:], features

    def density(self, points: Tensor, return_encoding: bool = False):
        """sigma [N] at unit-cube points [N,3] (view-direction CAM modulates only the colour MLP).

        With ``return_encoding``: (sigma, hash features), so a later :meth:`forward` on a subset of
        the points can reuse the features instead of encoding again.
        """
        mod, _ = self._modulation(points, None)
        sigma, _, features = self._base(points, mod)
        return (sigma, features) if return_encoding else sigma

    def forward(self, points: Tensor, dirs: Tensor, encoding: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(sigma [N], rgb [N,3]) at unit-cube points [N,3] seen along unit directions [N,3].

        ``encoding``: the points' hash features from an earlier no-grad :meth:`density` call.
        """
        mod_density, mod_color = self._modulation(points, dirs)
        sigma, geo, _ = self._base(points, mod_density, encoding)
        rgb = torch.sigmoid(self.color_mlp(torch.cat([geo, sh_encoding(dirs)], dim=-1), mod_color))
        return sigma, rgb

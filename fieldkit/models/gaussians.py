"""Gaussian splat parameters in the raw (pre-activation) layout of the Inria 3DGS PLY."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

SH_C0 = 0.28209479177387814


def sh_coeff_count(degree: int) -> int:
    """Coefficients per colour channel for SH ``degree`` (0..4)."""
    return (degree + 1) ** 2


def sh_degree_from_count(count: int) -> int:
    degree = int(round(math.sqrt(count))) - 1
    if sh_coeff_count(degree) != count:
        raise ValueError(f"{count} SH coefficients per channel is not (degree+1)^2")
    return degree


def rgb_to_sh_dc(rgb: Tensor) -> Tensor:
    return (rgb - 0.5) / SH_C0


def sh_dc_to_rgb(dc: Tensor) -> Tensor:
    return dc * SH_C0 + 0.5


@dataclass
class Splats:
    """N Gaussians, stored before activation (as the standard .ply stores them).

    means: [N,3] world positions.
    quats: [N,4] rotation, (w, x, y, z), not necessarily unit length.
    log_scales: [N,3] log of the per-axis standard deviations.
    opacity_logits: [N] logit of opacity.
    sh: [N,K,3] spherical-harmonic coefficients, K = (degree+1)^2, sh[:, 0] is the DC term.
    """

    means: Tensor
    quats: Tensor
    log_scales: Tensor
    opacity_logits: Tensor
    sh: Tensor

    def __post_init__(self) -> None:
        n = self.means.shape[0]
        expected = {"means": (n, 3), "quats": (n, 4), "log_scales": (n, 3), "opacity_logits": (n,)}
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"Splats.{name} must have shape {shape}, got {got}")
        if self.sh.ndim != 3 or self.sh.shape[0] != n or self.sh.shape[2] != 3:
            raise ValueError(f"Splats.sh must be [N,K,3], got {tuple(self.sh.shape)}")
        sh_degree_from_count(self.sh.shape[1])

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return sh_degree_from_count(self.sh.shape[1])

    @property
    def scales(self) -> Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def unit_quats(self) -> Tensor:
        return self.quats / self.quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Splats":
        return Splats(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})

    def detach(self) -> "Splats":
        return Splats(**{f.name: getattr(self, f.name).detach() for f in fields(self)})

    def __getitem__(self, index: Tensor | slice) -> "Splats":
        return Splats(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def state_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

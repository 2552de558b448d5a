"""Real spherical harmonics (degree 0-3) in the basis order and signs of the 3DGS references."""

from __future__ import annotations

import torch
from torch import Tensor

C0 = 0.28209479177387814
C1 = 0.4886025119029199
C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
C3 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)
MAX_SH_DEGREE = 3


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Basis values [..., (degree+1)^2] at unit directions [..., 3]."""
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"SH degree must be 0..{MAX_SH_DEGREE}, got {degree}")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, C0)]
    if degree >= 1:
        out += [-C1 * y, C1 * z, -C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [
            C2[0] * xy,
            C2[1] * yz,
            C2[2] * (2 * zz - xx - yy),
            C2[3] * xz,
            C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            C3[0] * y * (3 * xx - yy),
            C3[1] * xy * z,
            C3[2] * y * (4 * zz - xx - yy),
            C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            C3[4] * x * (4 * zz - xx - yy),
            C3[5] * z * (xx - yy),
            C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, dim=-1)


def sh_to_rgb(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Colour [..., 3] = max(sum_k Y_k(dir) * coeff_k + 0.5, 0) using the first (degree+1)^2 coefficients.

    dirs: [..., 3] (normalised here); coeffs: [..., K, 3] with K >= (degree+1)^2.
    """
    count = (degree + 1) ** 2
    if coeffs.shape[-2] < count:
        raise ValueError(f"SH degree {degree} needs {count} coefficients, got {coeffs.shape[-2]}")
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    basis = sh_basis(degree, dirs)
    rgb = (basis[..., None] * coeffs[..., :count, :]).sum(dim=-2)
    return torch.clamp_min(rgb + 0.5, 0.0)

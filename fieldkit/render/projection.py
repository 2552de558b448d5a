"""Stage 1 of the Gaussian rasterizer: 3D Gaussians -> 2D screen-space Gaussians (EWA splatting).

Reference implementation in plain PyTorch, differentiable by autograd; written for clarity.
Conventions (gsplat/Inria, see docs/rendering.md): OpenCV camera axes, pinhole K, the EWA
Jacobian evaluated at a clamped position (1.3x the field of view), a low-pass dilation of
``eps2d`` pixels^2, and a per-axis 3-sigma box for the screen-space extent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fieldkit.cameras import quat_to_rotmat


@dataclass
class Projection:
    """Screen-space Gaussians for C cameras and N Gaussians; radii == 0 marks culled ones."""

    means2d: Tensor  # [C,N,2] pixel coordinates (pixel centres at +0.5)
    conics: Tensor  # [C,N,3] upper triangle (a, b, c) of the inverse 2D covariance
    depths: Tensor  # [C,N] camera-space z of the centre
    radii: Tensor  # [C,N,2] int32 half extents in pixels, 0 when culled


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariances [N,3,3] = R diag(s^2) R^T from quaternions (w,x,y,z) and linear scales."""
    M = quat_to_rotmat(quats) * scales[:, None, :]
    return M @ M.transpose(-1, -2)


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    world_to_cam: Tensor,
    K: Tensor,
    width: int,
    height: int,
    *,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> Projection:
    """Project N Gaussians into C pinhole cameras.

    means [N,3], quats [N,4] (w,x,y,z, any norm), scales [N,3] (linear), world_to_cam [C,4,4],
    K [C,3,3]. Culled Gaussians (centre outside (near, far), degenerate, or box outside the
    image) get radii 0 and finite outputs with zero gradient.
    """
    R = world_to_cam[:, :3, :3]
    t = world_to_cam[:, :3, 3]
    p_cam = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]  # [C,N,3]
    x, y, z = p_cam.unbind(-1)
    in_depth = (z > near_plane) & (z < far_plane)
    z_safe = torch.where(in_depth, z, torch.ones_like(z))

    fx, fy = K[:, 0, 0, None], K[:, 1, 1, None]
    cx, cy = K[:, 0, 2, None], K[:, 1, 2, None]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    tx = z_safe * torch.minimum(torch.maximum(x / z_safe, -lim_x_neg), lim_x_pos)
    ty = z_safe * torch.minimum(torch.maximum(y / z_safe, -lim_y_neg), lim_y_pos)

    zeros = torch.zeros_like(z_safe)
    J = torch.stack(
        [
            fx / z_safe, zeros, -fx * tx / z_safe**2,
            zeros, fy / z_safe, -fy * ty / z_safe**2,
        ],
        dim=-1,
    ).reshape(*z.shape, 2, 3)  # [C,N,2,3]

    cov_world = covariance_3d(quats, scales)  # [N,3,3]
    cov_cam = R[:, None] @ cov_world[None] @ R[:, None].transpose(-1, -2)  # [C,N,3,3]
    cov2d = J @ cov_cam @ J.transpose(-1, -2)  # [C,N,2,2]
    a = cov2d[..., 0, 0] + eps2d
    b = cov2d[..., 0, 1]
    c = cov2d[..., 1, 1] + eps2d
    det = a * c - b * b
    valid = in_depth & (det > 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)

    means2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], dim=-1)
    radius_x = torch.ceil(3.0 * torch.sqrt(torch.where(valid, a, torch.zeros_like(a)).detach()))
    radius_y = torch.ceil(3.0 * torch.sqrt(torch.where(valid, c, torch.zeros_like(c)).detach()))
    mx, my = means2d.detach().unbind(-1)
    on_screen = (mx + radius_x > 0) & (mx - radius_x < width) & (my + radius_y > 0) & (my - radius_y < height)
    valid = valid & on_screen
    radii = torch.stack([radius_x, radius_y], dim=-1).to(torch.int32) * valid[..., None]

    keep = valid[..., None]
    return Projection(
        means2d=torch.where(keep, means2d, torch.zeros_like(means2d)),
        conics=torch.where(keep, conics, torch.zeros_like(conics)),
        depths=torch.where(valid, z, torch.zeros_like(z)),
        radii=radii,
    )

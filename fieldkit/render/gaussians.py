"""``rasterize``: render 3D Gaussians into C cameras (differentiable).

The pipeline is one function per stage:
    project_gaussians (EWA, differentiable) -> intersect_tiles (binning, not differentiable)
    -> composite_tiles (front-to-back alpha blending, differentiable)
Colours may be plain RGB [N,3] or spherical-harmonic coefficients [N,K,3], evaluated per camera
in world space with the view direction from the camera centre to the Gaussian.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fieldkit.cameras import Cameras
from fieldkit.render.backends import get_backend
from fieldkit.render.sh import MAX_SH_DEGREE, sh_to_rgb


@dataclass
class RenderOutput:
    """What ``rasterize`` returns; images are [C,H,W,ch]."""

    rgb: Tensor  # [C,H,W,3]
    alpha: Tensor  # [C,H,W,1] accumulated opacity 1 - T
    depth: Tensor  # [C,H,W,1] expected depth sum(w z) / sum(w), 0 where nothing was hit
    means2d: Tensor  # [C,N,2] screen-space means; .grad after backward feeds densification
    radii: Tensor  # [C,N,2] int32 screen-space half extents, 0 when culled
    depths: Tensor  # [C,N] camera-space depth of each Gaussian centre


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    cameras: Cameras,
    *,
    sh_degree: int | None = None,
    background: Tensor | None = None,
    backend: str = "auto",
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    tile_size: int | None = None,
) -> RenderOutput:
    """Render N Gaussians into every camera of ``cameras``.

    means [N,3], quats [N,4] (w,x,y,z, need not be unit), scales [N,3] (linear), opacities [N]
    in [0,1], colors [N,3] RGB or [N,K,3] SH coefficients (then ``sh_degree`` picks how many
    bands are used; default all). background: [3] or [C,3], default black. ``tile_size``: the
    backend's own (16 px; 32 for the native CPU build) unless given.
    """
    C, N = len(cameras), means.shape[0]
    _check_inputs(means, quats, scales, opacities, colors)
    impl = get_backend(backend, means.device)
    world_to_cam = cameras.world_to_cam.to(means)
    K = cameras.K.to(means)
    W, H = cameras.width, cameras.height

    proj = impl.project(means, quats, scales, world_to_cam, K, W, H, eps2d=eps2d, near_plane=near_plane, far_plane=far_plane)
    means2d = proj.means2d
    if means2d.requires_grad:
        means2d.retain_grad()

    rgb = _colors_per_camera(means, colors, cameras, sh_degree)  # [C,N,3]
    features = torch.cat([rgb, proj.depths[..., None]], dim=-1)  # depth rides along as channel 4
    if background is None:
        background = torch.zeros(3, device=means.device, dtype=means.dtype)
    background = background.to(means).expand(C, 3)
    background = torch.cat([background, torch.zeros_like(background[:, :1])], dim=-1)

    isect = impl.intersect(means2d, proj.radii, proj.depths, W, H, impl.tile_size if tile_size is None else tile_size)
    image, alpha = impl.composite(means2d, proj.conics, opacities.expand(C, N), features, isect, W, H, background)
    depth = image[..., 3:] / alpha.clamp_min(1e-10)
    depth = torch.where(alpha > 0, depth, torch.zeros_like(depth))
    return RenderOutput(rgb=image[..., :3], alpha=alpha, depth=depth, means2d=means2d, radii=proj.radii, depths=proj.depths)


def _colors_per_camera(means: Tensor, colors: Tensor, cameras: Cameras, sh_degree: int | None) -> Tensor:
    C = len(cameras)
    if colors.ndim == 2:
        return colors[None].expand(C, -1, -1)
    count = colors.shape[1]
    degree = int(round(count**0.5)) - 1 if sh_degree is None else sh_degree
    if degree > MAX_SH_DEGREE or (degree + 1) ** 2 > count:
        raise ValueError(f"sh_degree {degree} needs {(degree + 1) ** 2} coefficients (<= {MAX_SH_DEGREE}), colors has {count}")
    dirs = means[None] - cameras.centers.to(means)[:, None, :]  # [C,N,3]
    return sh_to_rgb(degree, dirs, colors[None].expand(C, -1, -1, -1))


def _check_inputs(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor) -> None:
    N = means.shape[0]
    expected = {"means": (means, (N, 3)), "quats": (quats, (N, 4)), "scales": (scales, (N, 3)), "opacities": (opacities, (N,))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"rasterize: {name} must have shape {shape}, got {tuple(tensor.shape)}")
    if colors.shape[0] != N or colors.shape[-1] != 3 or colors.ndim not in (2, 3):
        raise ValueError(f"rasterize: colors must be [N,3] or [N,K,3] with N={N}, got {tuple(colors.shape)}")

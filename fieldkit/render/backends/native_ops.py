"""Torch glue shared by the native backends: autograd Functions over a compiled extension.

The CPU (:mod:`.cpu`) and CUDA (:mod:`.cuda`) extensions expose the same entry points
(``project_forward/backward``, ``intersect_tiles``, ``composite_forward/backward``); these
functions take the extension module as their first argument and give the torch reference
stages' signatures and gradients.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch
from torch import Tensor

from fieldkit.render.projection import Projection
from fieldkit.render.tiles import TILE_SIZE, TileIntersections, tile_grid


def _dense(grad: Tensor | None, shape, like: Tensor) -> Tensor:
    if grad is None:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    return grad.contiguous()


class _ProjectGaussians(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, means, quats, scales, world_to_cam, K, width, height, eps2d, near_plane, far_plane):
        means2d, conics, depths, radii = ext.project_forward(
            means, quats, scales, world_to_cam, K, width, height, eps2d, near_plane, far_plane
        )
        ctx.save_for_backward(means, quats, scales, world_to_cam, K, radii)
        ctx.ext, ctx.params = ext, (width, height, eps2d)
        ctx.mark_non_differentiable(radii)
        return means2d, conics, depths, radii

    @staticmethod
    def backward(ctx, v_means2d, v_conics, v_depths, _v_radii):
        means, quats, scales, world_to_cam, K, radii = ctx.saved_tensors
        width, height, eps2d = ctx.params
        C, N = radii.shape[:2]
        v_means, v_quats, v_scales, v_viewmats = ctx.ext.project_backward(
            means, quats, scales, world_to_cam, K, width, height, eps2d, radii,
            _dense(v_means2d, (C, N, 2), means), _dense(v_conics, (C, N, 3), means), _dense(v_depths, (C, N), means),
            bool(ctx.needs_input_grad[4]),
        )
        v_viewmats = v_viewmats if ctx.needs_input_grad[4] else None
        return None, v_means, v_quats, v_scales, v_viewmats, None, None, None, None, None, None


def project_gaussians_native(ext: ModuleType, means: Tensor, quats: Tensor, scales: Tensor, world_to_cam: Tensor,
                             K: Tensor, width: int, height: int, *, eps2d: float = 0.3, near_plane: float = 0.01,
                             far_plane: float = 1e10) -> Projection:
    """:func:`fieldkit.render.projection.project_gaussians` through ``ext``; differentiable except K."""
    dtype = means.dtype
    args = [t.contiguous() for t in (means, quats.to(dtype), scales.to(dtype), world_to_cam.to(dtype), K.to(dtype))]
    means2d, conics, depths, radii = _ProjectGaussians.apply(
        ext, *args, int(width), int(height), float(eps2d), float(near_plane), float(far_plane)
    )
    return Projection(means2d=means2d, conics=conics, depths=depths, radii=radii)


def intersect_tiles_native(ext: ModuleType, means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int,
                           tile_size: int = TILE_SIZE) -> TileIntersections:
    """:func:`fieldkit.render.tiles.intersect_tiles` through ``ext`` (not differentiable)."""
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    dtype = means2d.dtype if means2d.dtype in (torch.float32, torch.float64) else torch.float32
    ids, offsets = ext.intersect_tiles(
        means2d.detach().to(dtype).contiguous(), radii.to(torch.int32).contiguous(),
        depths.detach().to(dtype).contiguous(), tiles_x, tiles_y, int(tile_size),
    )
    return TileIntersections(ids, offsets, tiles_x, tiles_y, int(tile_size))


class _CompositeTiles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, means2d, conics, opacities, features, background, gaussian_ids, tile_offsets, geometry):
        width, height, tiles_x, tiles_y, tile_size = geometry
        image, alpha, final_T, last_index = ext.composite_forward(
            means2d, conics, opacities, features, background, gaussian_ids, tile_offsets,
            width, height, tiles_x, tiles_y, tile_size,
        )
        ctx.save_for_backward(means2d, conics, opacities, features, background, gaussian_ids, tile_offsets, final_T, last_index)
        ctx.ext, ctx.geometry = ext, geometry
        return image, alpha

    @staticmethod
    def backward(ctx, v_image, v_alpha):
        means2d, conics, opacities, features, background, gaussian_ids, tile_offsets, final_T, last_index = ctx.saved_tensors
        width, height, tiles_x, tiles_y, tile_size = ctx.geometry
        C, D = features.shape[0], features.shape[2]
        v_image = _dense(v_image, (C, height, width, D), features)
        v_alpha = _dense(v_alpha, (C, height, width, 1), features)
        v_means2d, v_conics, v_opacities, v_features = ctx.ext.composite_backward(
            means2d, conics, opacities, features, background, gaussian_ids, tile_offsets,
            width, height, tiles_x, tiles_y, tile_size, final_T, last_index, v_image, v_alpha,
        )
        v_background = None
        if ctx.needs_input_grad[5]:
            v_background = (v_image * final_T[..., None]).sum(dim=(1, 2))
        return None, v_means2d, v_conics, v_opacities, v_features, v_background, None, None, None


def composite_tiles_native(ext: ModuleType, means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor,
                           isect: TileIntersections, width: int, height: int, background: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`fieldkit.render.composite.composite_tiles` through ``ext``: (image [C,H,W,D], alpha [C,H,W,1]).

    means2d [C,N,2], conics [C,N,3], opacities [C,N], features [C,N,D] (any D), background [C,D];
    differentiable w.r.t. all five float inputs.
    """
    dtype = features.dtype
    C, N, D = features.shape
    tensors = [
        means2d.to(dtype).contiguous(),
        conics.to(dtype).contiguous(),
        opacities.to(dtype).expand(C, N).contiguous(),
        features.contiguous(),
        background.to(dtype).expand(C, D).contiguous(),
    ]
    geometry = (int(width), int(height), int(isect.tiles_x), int(isect.tiles_y), int(isect.tile_size))
    ids = isect.gaussian_ids.to(device=features.device, dtype=torch.int64).contiguous()
    offsets = isect.tile_offsets.to(device=features.device, dtype=torch.int64).contiguous()
    return _CompositeTiles.apply(ext, *tensors, ids, offsets, geometry)


def native_stages(extension: Callable[[], ModuleType], label: str) -> tuple[Callable, Callable, Callable]:
    """(project, intersect, composite) with the torch reference stages' signatures, run through ``extension()``
    (built on first call), named ``project_gaussians_<label>``, ``intersect_tiles_<label>``,
    ``composite_tiles_<label>``."""

    def project(*args, **kwargs) -> Projection:
        return project_gaussians_native(extension(), *args, **kwargs)

    def intersect(*args, **kwargs) -> TileIntersections:
        return intersect_tiles_native(extension(), *args, **kwargs)

    def composite(*args, **kwargs) -> tuple[Tensor, Tensor]:
        return composite_tiles_native(extension(), *args, **kwargs)

    for fn, stage, reference, native in (
        (project, "project_gaussians", "fieldkit.render.projection.project_gaussians", project_gaussians_native),
        (intersect, "intersect_tiles", "fieldkit.render.tiles.intersect_tiles", intersect_tiles_native),
        (composite, "composite_tiles", "fieldkit.render.composite.composite_tiles", composite_tiles_native),
    ):
        fn.__name__ = fn.__qualname__ = f"{stage}_{label}"
        fn.__doc__ = f"{label} twin of :func:`{reference}` (same signature and gradients).\n\n{native.__doc__}"
    return project, intersect, composite

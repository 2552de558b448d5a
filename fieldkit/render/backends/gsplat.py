"""gsplat (nerfstudio-project/gsplat) as an optional peer backend, for benchmarks and users.

Used when ``gsplat`` is importable and a CUDA device is present; never required. Each stage maps to
gsplat's staged low-level ops (v1.5.x API, ``gsplat.cuda._wrapper``; v1.4's single radius is also
accepted):

* ``project``   -> ``fully_fused_projection(means, None, quats, scales, viewmats, Ks, W, H,
  eps2d, near_plane, far_plane, packed=False)``. Same EWA conventions as ours (pixel centres at
  +0.5, 0.3 x FOV Jacobian clamp, eps2d dilation), but gsplat's screen-space box uses
  k = 3.33 sigma instead of our 3 sigma, so its radii (and hence its tile lists) are larger.
  Culled entries, which gsplat leaves unspecified, are zeroed as in our contract.
* ``intersect`` -> ``isect_tiles`` + ``isect_offset_encode``. gsplat's (flatten_ids,
  isect_offsets [C,TY,TX]) is exactly our TileIntersections (flat ids c*N+g sorted by tile then
  depth, offsets [C*TY*TX+1]) with the total appended; it is used with gsplat's own radii.
* ``composite`` -> ``rasterize_to_pixels(means2d, conics, features, opacities, W, H,
  tile_size, isect_offsets, flatten_ids, backgrounds)``; accepts any TileIntersections (ours
  too), converting them back to gsplat's layout. Same compositing constants as ours (alpha
  clamp 0.999, skip below 1/255, stop before T <= 1e-4). Channel counts gsplat was not compiled
  for are zero-padded to the next one it was.

So the three stages are consistent with each other (gsplat's own pipeline end to end), and
``rasterize(..., backend="gsplat")`` renders what gsplat renders. gsplat kernels are float32:
inputs are cast to float32 and results back to the input dtype.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from fieldkit.render.projection import Projection
from fieldkit.render.tiles import TILE_SIZE, TileIntersections, tile_grid

# Channel counts gsplat's rasterizer kernels are instantiated for (gsplat/cuda/csrc/Config.h).
_SUPPORTED_CHANNELS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513)
_HINT = "gsplat is not installed (optional peer backend: pip install gsplat, on a machine with an NVIDIA GPU)"


def is_available() -> tuple[bool, str]:
    """(True, '') when gsplat imports, a CUDA device is present and gsplat's CUDA ops load."""
    if importlib.util.find_spec("gsplat") is None:
        return False, _HINT
    if not torch.cuda.is_available():
        return False, "gsplat needs a CUDA device (torch.cuda.is_available() is False)"
    try:
        _ops()
        from gsplat.cuda._backend import _C  # builds or loads gsplat's extension
    except Exception as error:  # noqa: BLE001 - any reason gsplat cannot run here
        return False, f"gsplat is installed but unusable ({type(error).__name__}: {error})"
    if _C is None:
        return False, "gsplat is installed but its CUDA extension is not (gsplat printed why above)"
    return True, ""


def backend():
    from fieldkit.render.backends import Backend

    ok, reason = is_available()
    if not ok:
        raise RuntimeError(reason)
    return Backend("gsplat", project_gaussians_gsplat, composite_tiles_gsplat, intersect_tiles_gsplat)


def _ops():
    from gsplat.cuda._wrapper import fully_fused_projection, isect_offset_encode, isect_tiles, rasterize_to_pixels

    return fully_fused_projection, isect_tiles, isect_offset_encode, rasterize_to_pixels


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def project_gaussians_gsplat(
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
    """gsplat's ``fully_fused_projection`` with our signature and our Projection (k = 3.33 radii)."""
    fully_fused_projection = _ops()[0]
    dtype = means.dtype
    radii, means2d, depths, conics, _ = fully_fused_projection(
        _f32(means), None, _f32(quats), _f32(scales), _f32(world_to_cam), _f32(K), int(width), int(height),
        eps2d=float(eps2d), near_plane=float(near_plane), far_plane=float(far_plane), packed=False,
    )
    if radii.dim() == 2:  # gsplat < 1.5: one radius per Gaussian
        radii = torch.stack([radii, radii], dim=-1)
    radii = radii.to(torch.int32).contiguous()
    visible = (radii > 0).any(dim=-1)
    keep = visible[..., None]
    return Projection(
        means2d=torch.where(keep, means2d, torch.zeros_like(means2d)).to(dtype),
        conics=torch.where(keep, conics, torch.zeros_like(conics)).to(dtype),
        depths=torch.where(visible, depths, torch.zeros_like(depths)).to(dtype),
        radii=radii * keep,
    )


def intersect_tiles_gsplat(
    means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int, tile_size: int = TILE_SIZE
) -> TileIntersections:
    """gsplat's ``isect_tiles`` + ``isect_offset_encode``, returned as our TileIntersections."""
    _, isect_tiles, isect_offset_encode, _ = _ops()
    C = depths.shape[0]
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    radii = radii.to(torch.int32).contiguous()
    if _single_radius():
        radii = radii[..., 0].contiguous()
    _, isect_ids, flatten_ids = isect_tiles(
        _f32(means2d.detach()), radii, _f32(depths.detach()), int(tile_size), tiles_x, tiles_y, sort=True
    )
    offsets = isect_offset_encode(isect_ids, C, tiles_x, tiles_y)  # [C, tiles_y, tiles_x] int32
    total = torch.tensor([flatten_ids.numel()], dtype=torch.int64, device=offsets.device)
    tile_offsets = torch.cat([offsets.flatten().to(torch.int64), total])
    return TileIntersections(flatten_ids.to(torch.int64), tile_offsets, tiles_x, tiles_y, int(tile_size))


def composite_tiles_gsplat(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    isect: TileIntersections,
    width: int,
    height: int,
    background: Tensor,
) -> tuple[Tensor, Tensor]:
    """gsplat's ``rasterize_to_pixels`` with our signature (any channel count, any TileIntersections)."""
    rasterize_to_pixels = _ops()[3]
    C, N, D = features.shape
    dtype = features.dtype
    padded = next((c for c in _SUPPORTED_CHANNELS if c >= D), None)
    if padded is None:
        raise ValueError(f"gsplat rasterizes at most {_SUPPORTED_CHANNELS[-1]} channels, got {D}")
    feats = _f32(features)
    bg = _f32(background.expand(C, D))
    if padded > D:
        feats = torch.cat([feats, feats.new_zeros(C, N, padded - D)], dim=-1)
        bg = torch.cat([bg, bg.new_zeros(C, padded - D)], dim=-1)
    offsets = isect.tile_offsets[:-1].reshape(C, isect.tiles_y, isect.tiles_x).to(torch.int32).contiguous()
    flatten_ids = isect.gaussian_ids.to(torch.int32).contiguous()
    image, alpha = rasterize_to_pixels(
        _f32(means2d), _f32(conics), feats.contiguous(), _f32(opacities.expand(C, N)), int(width), int(height),
        int(isect.tile_size), offsets, flatten_ids, backgrounds=bg.contiguous(),
    )
    return image[..., :D].to(dtype), alpha.to(dtype)


def _single_radius() -> bool:
    """gsplat before 1.5 has one radius per Gaussian ([C,N]) instead of one per axis ([C,N,2])."""
    import gsplat

    parts = str(getattr(gsplat, "__version__", "1.5")).split(".")
    try:
        return (int(parts[0]), int(parts[1])) < (1, 5)
    except (ValueError, IndexError):
        return False

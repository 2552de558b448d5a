"""Native CUDA backend: the rasterizer's stages as CUDA kernels (``kernels/cuda``).

Built just in time with :func:`torch.utils.cpp_extension.load` (nvcc for ``kernels/cuda/*.cu``,
the host compiler for ``kernels/bindings/cuda_bindings.cpp``) the first time it is needed, once
per process, and cached under ``$FIELDKIT_CACHE_DIR`` (default ``~/.cache/fieldkit``) in a folder
keyed by a hash of the sources, torch and its CUDA version, nvcc, the GPU's compute capability
(torch builds for it unless ``TORCH_CUDA_ARCH_LIST`` says otherwise) and the flags. Same lookup of
the kernel sources as the CPU backend (``$FIELDKIT_KERNELS_DIR``, ``fieldkit/kernels``,
``<repo>/kernels``); ``FIELDKIT_NO_NATIVE=1`` disables it.

It computes the same function as the torch reference stages and the CPU backend, with the same
signatures (see :mod:`fieldkit.render.backends.cpu`): :func:`project_gaussians_cuda`,
:func:`intersect_tiles_cuda` (the reference's tile lists, element for element) and
:func:`composite_tiles_cuda`; float32 and float64. Differences from the CPU backend: gradients
are accumulated with atomicAdd, so they are not bitwise reproducible run to run (the forward is).
nvcc runs with ``--fmad=false`` so that float32 arithmetic is rounded like the CPU build's
(``-ffp-contract=off``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from fieldkit.render.backends.cpu import cache_root
from fieldkit.render.projection import Projection
from fieldkit.render.tiles import TILE_SIZE, TileIntersections, tile_grid

# FIELDKIT_CUDA_FAST_MATH=1 builds a variant with FMA contraction and nvcc's fast math: faster,
# but no longer bit-equal to the CPU build (parity with the torch reference still holds).
FAST_MATH = os.environ.get("FIELDKIT_CUDA_FAST_MATH", "0") == "1"
EXTENSION_NAME = "fieldkit_cuda_fast" if FAST_MATH else "fieldkit_cuda"
CFLAGS = ["-O3"]
CUDA_FLAGS = ["-O3", "--use_fast_math"] if FAST_MATH else ["-O3", "--fmad=false"]
_SOURCES = ("bindings/cuda_bindings.cpp", "cuda/projection.cu", "cuda/intersect.cu", "cuda/composite.cu")
_HEADERS = (
    "cuda/rasterize_cuda.cuh",
    "include/fieldkit/common.h",
    "include/fieldkit/projection.h",
    "include/fieldkit/composite.h",
)

_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None
build_seconds: float | None = None  # wall time of the load() call in this process (compile or cache hit)


def kernels_dir() -> Path | None:
    """Folder holding the CUDA kernel sources, or None."""
    candidates = []
    if os.environ.get("FIELDKIT_KERNELS_DIR"):
        candidates.append(Path(os.environ["FIELDKIT_KERNELS_DIR"]))
    package_root = Path(__file__).resolve().parents[2]  # .../fieldkit
    candidates += [package_root / "kernels", package_root.parent / "kernels"]
    for folder in candidates:
        if all((folder / rel).is_file() for rel in _SOURCES + _HEADERS):
            return folder
    return None


def nvcc_path() -> str | None:
    """nvcc from $CUDA_HOME (as torch finds it), else from PATH."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        candidate = Path(CUDA_HOME) / "bin" / "nvcc"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("nvcc")


def _build_key(folder: Path) -> str:
    digest = hashlib.sha256()
    for rel in sorted(_SOURCES + _HEADERS):
        digest.update(rel.encode())
        digest.update((folder / rel).read_bytes())
    capability = ".".join(map(str, torch.cuda.get_device_capability()))
    digest.update(
        "|".join(
            [torch.__version__, str(torch.version.cuda), sys.version, platform.machine(), str(nvcc_path()),
             capability, os.environ.get("TORCH_CUDA_ARCH_LIST", ""), " ".join(CFLAGS), " ".join(CUDA_FLAGS)]
        ).encode()
    )
    return digest.hexdigest()[:16]


def _unavailable_reason() -> str | None:
    """Why the extension cannot even be attempted here, or None."""
    if os.environ.get("FIELDKIT_NO_NATIVE", "") not in ("", "0"):
        return "disabled by FIELDKIT_NO_NATIVE"
    if torch.version.cuda is None:
        return f"this torch build has no CUDA support (torch {torch.__version__})"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if kernels_dir() is None:
        return ("CUDA kernel sources not found (looked in $FIELDKIT_KERNELS_DIR, fieldkit/kernels and <repo>/kernels); "
                "install from a source checkout or set FIELDKIT_KERNELS_DIR")
    if nvcc_path() is None:
        return "nvcc not found (install the CUDA toolkit matching torch.version.cuda, or set CUDA_HOME)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return f"no C++ compiler found ({os.environ.get('CXX', 'c++')} is not on PATH)"
    return None


def _load() -> ModuleType:
    """Build (or reuse the cached build of) the extension; raises RuntimeError with a reason."""
    global build_seconds
    reason = _unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    folder = kernels_dir()
    build_dir = cache_root() / "torch_extensions" / f"{EXTENSION_NAME}-{_build_key(folder)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils.cpp_extension import load

    start = time.perf_counter()
    try:
        module = load(
            name=EXTENSION_NAME,
            sources=[str(folder / rel) for rel in _SOURCES],
            extra_include_paths=[str(folder / "include"), str(folder / "cuda"), str(folder)],
            extra_cflags=CFLAGS,
            extra_cuda_cflags=CUDA_FLAGS,
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as error:  # compiler errors surface as RuntimeError/CalledProcessError
        log_path = build_dir / "build_error.log"
        log_path.write_text(f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
        raise RuntimeError(f"building the {EXTENSION_NAME} extension failed; log: {log_path}") from error
    build_seconds = time.perf_counter() - start
    return module


def extension() -> ModuleType:
    """The compiled extension module (built on first call); raises RuntimeError if unavailable."""
    global _module, _failure
    if _module is not None:
        return _module
    with _lock:
        if _module is None and _failure is None:
            try:
                _module = _load()
            except Exception as error:  # remember the failure: do not retry a broken build per call
                _failure = str(error)
        if _module is None:
            raise RuntimeError(_failure)
        return _module


def is_available() -> tuple[bool, str]:
    """(True, '') when a CUDA device is present and the extension builds/loads, else (False, reason)."""
    try:
        extension()
    except RuntimeError as error:
        return False, str(error)
    return True, ""


def backend():
    from fieldkit.render.backends import Backend

    extension()
    return Backend("cuda", project_gaussians_cuda, composite_tiles_cuda, intersect_tiles_cuda)


def _dense(grad: Tensor | None, shape, like: Tensor) -> Tensor:
    if grad is None:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    return grad.contiguous()


# ---------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------
class _ProjectGaussians(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, world_to_cam, K, width, height, eps2d, near_plane, far_plane):
        means2d, conics, depths, radii = extension().project_forward(
            means, quats, scales, world_to_cam, K, width, height, eps2d, near_plane, far_plane
        )
        ctx.save_for_backward(means, quats, scales, world_to_cam, K, radii)
        ctx.params = (width, height, eps2d)
        ctx.mark_non_differentiable(radii)
        return means2d, conics, depths, radii

    @staticmethod
    def backward(ctx, v_means2d, v_conics, v_depths, _v_radii):
        means, quats, scales, world_to_cam, K, radii = ctx.saved_tensors
        width, height, eps2d = ctx.params
        C, N = radii.shape[:2]
        v_means, v_quats, v_scales, v_viewmats = extension().project_backward(
            means, quats, scales, world_to_cam, K, width, height, eps2d, radii,
            _dense(v_means2d, (C, N, 2), means), _dense(v_conics, (C, N, 3), means), _dense(v_depths, (C, N), means),
            bool(ctx.needs_input_grad[3]),
        )
        v_viewmats = v_viewmats if ctx.needs_input_grad[3] else None
        return v_means, v_quats, v_scales, v_viewmats, None, None, None, None, None, None


def project_gaussians_cuda(
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
    """CUDA twin of :func:`fieldkit.render.projection.project_gaussians` (same signature).

    Differentiable w.r.t. means, quats, scales and world_to_cam (not K). float32 or float64, all
    tensors on one CUDA device.
    """
    dtype = means.dtype
    args = [t.contiguous() for t in (means, quats.to(dtype), scales.to(dtype), world_to_cam.to(dtype), K.to(dtype))]
    means2d, conics, depths, radii = _ProjectGaussians.apply(
        *args, int(width), int(height), float(eps2d), float(near_plane), float(far_plane)
    )
    return Projection(means2d=means2d, conics=conics, depths=depths, radii=radii)


# ---------------------------------------------------------------------------------------------
# Tile binning (not differentiable)
# ---------------------------------------------------------------------------------------------
def intersect_tiles_cuda(
    means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int, tile_size: int = TILE_SIZE
) -> TileIntersections:
    """CUDA twin of :func:`fieldkit.render.tiles.intersect_tiles`: the same lists, element for element.

    means2d [C,N,2], radii [C,N,2] int32 (0 = culled), depths [C,N], on a CUDA device.
    """
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    dtype = means2d.dtype if means2d.dtype in (torch.float32, torch.float64) else torch.float32
    ids, offsets = extension().intersect_tiles(
        means2d.detach().to(dtype).contiguous(), radii.to(torch.int32).contiguous(),
        depths.detach().to(dtype).contiguous(), tiles_x, tiles_y, int(tile_size),
    )
    return TileIntersections(ids, offsets, tiles_x, tiles_y, int(tile_size))


# ---------------------------------------------------------------------------------------------
# Compositing
# ---------------------------------------------------------------------------------------------
class _CompositeTiles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, background, gaussian_ids, tile_offsets, geometry):
        width, height, tiles_x, tiles_y, tile_size = geometry
        image, alpha, final_T, last_index = extension().composite_forward(
            means2d, conics, opacities, features, background, gaussian_ids, tile_offsets,
            width, height, tiles_x, tiles_y, tile_size,
        )
        ctx.save_for_backward(means2d, conics, opacities, features, background, gaussian_ids, tile_offsets, final_T, last_index)
        ctx.geometry = geometry
        return image, alpha

    @staticmethod
    def backward(ctx, v_image, v_alpha):
        means2d, conics, opacities, features, background, gaussian_ids, tile_offsets, final_T, last_index = ctx.saved_tensors
        width, height, tiles_x, tiles_y, tile_size = ctx.geometry
        C, D = features.shape[0], features.shape[2]
        v_image = _dense(v_image, (C, height, width, D), features)
        v_alpha = _dense(v_alpha, (C, height, width, 1), features)
        v_means2d, v_conics, v_opacities, v_features = extension().composite_backward(
            means2d, conics, opacities, features, background, gaussian_ids, tile_offsets,
            width, height, tiles_x, tiles_y, tile_size, final_T, last_index, v_image, v_alpha,
        )
        v_background = None
        if ctx.needs_input_grad[4]:
            v_background = (v_image * final_T[..., None]).sum(dim=(1, 2))
        return v_means2d, v_conics, v_opacities, v_features, v_background, None, None, None


def composite_tiles_cuda(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    isect: TileIntersections,
    width: int,
    height: int,
    background: Tensor,
) -> tuple[Tensor, Tensor]:
    """CUDA twin of :func:`fieldkit.render.composite.composite_tiles` (same signature).

    means2d [C,N,2], conics [C,N,3], opacities [C,N], features [C,N,D] (any D), background [C,D].
    Returns (image [C,H,W,D], alpha [C,H,W,1]); differentiable w.r.t. all five float inputs.
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
    return _CompositeTiles.apply(*tensors, ids, offsets, geometry)

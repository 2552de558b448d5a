"""Native CPU backend: the rasterizer's two differentiable stages in C++ with OpenMP.

The extension is compiled just in time with :func:`torch.utils.cpp_extension.load` the first
time it is needed (once per process, thread-safe) and cached on disk under
``$FIELDKIT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fieldkit`` or ``~/.cache/fieldkit``) in a
folder keyed by a hash of the kernel sources, the torch version, the Python version and the
compiler flags, so edits and upgrades rebuild and nothing else does. Flags are portable
(``-O3 -fopenmp -ffp-contract=off``, no ``-march``); the compositing kernels are built twice,
for baseline x86-64 and for AVX2, and the AVX2 build runs when the CPU has it (both give
bit-identical results; ``FIELDKIT_CPU_SIMD=baseline`` forces the baseline build).

It computes the same function as the torch reference stages
(:func:`fieldkit.render.projection.project_gaussians` and
:func:`fieldkit.render.composite.composite_tiles`) with hand-written backward passes:

- :func:`project_gaussians_cpu`: same signature; gradients for means, quats, scales and
  world_to_cam (not K). Evaluated in double internally, whatever the tensor dtype.
- :func:`composite_tiles_cpu`: same signature, any channel count D; gradients for means2d,
  conics, opacities, features and background. Deterministic for any thread count.
- :func:`intersect_tiles_cpu`: optional native twin of
  :func:`fieldkit.render.tiles.intersect_tiles` (not differentiable), equal bit for bit.

Threads: ``torch.set_num_threads`` applies. Kernel sources are looked up in
``$FIELDKIT_KERNELS_DIR``, then ``fieldkit/kernels`` (package data of an install), then
``<repo>/kernels`` (source checkout). ``FIELDKIT_NO_NATIVE=1`` disables the backend.
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

from fieldkit.render.projection import Projection
from fieldkit.render.tiles import TILE_SIZE, TileIntersections, tile_grid

EXTENSION_NAME = "fieldkit_cpu"
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-Wno-psabi"]
LDFLAGS = ["-fopenmp"]
_SOURCES = ("bindings/cpu_bindings.cpp", "cpu/rasterize_cpu.cpp", "cpu/composite_avx2.cpp")
_HEADERS = (
    "cpu/rasterize_cpu.h",
    "cpu/composite_cpu.inl",
    "include/fieldkit/common.h",
    "include/fieldkit/projection.h",
    "include/fieldkit/composite.h",
)

_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None
build_seconds: float | None = None  # wall time of the load() call in this process (compile or cache hit)


def kernels_dir() -> Path | None:
    """Folder holding the kernel sources, or None when none of the known places has them."""
    candidates = []
    if os.environ.get("FIELDKIT_KERNELS_DIR"):
        candidates.append(Path(os.environ["FIELDKIT_KERNELS_DIR"]))
    package_root = Path(__file__).resolve().parents[2]  # .../fieldkit
    candidates += [package_root / "kernels", package_root.parent / "kernels"]
    for folder in candidates:
        if all((folder / rel).is_file() for rel in _SOURCES + _HEADERS):
            return folder
    return None


def cache_root() -> Path:
    if os.environ.get("FIELDKIT_CACHE_DIR"):
        return Path(os.environ["FIELDKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fieldkit"


def _build_key(folder: Path) -> str:
    digest = hashlib.sha256()
    for rel in sorted(_SOURCES + _HEADERS):
        digest.update(rel.encode())
        digest.update((folder / rel).read_bytes())
    digest.update(
        "|".join(
            [torch.__version__, sys.version, platform.machine(), str(_compiler()), " ".join(CFLAGS), " ".join(LDFLAGS)]
        ).encode()
    )
    return digest.hexdigest()[:16]


def _compiler() -> str | None:
    name = os.environ.get("CXX", "c++")
    return shutil.which(name)


def _load() -> ModuleType:
    """Build (or reuse the cached build of) the extension; raises RuntimeError with a reason."""
    global build_seconds
    if os.environ.get("FIELDKIT_NO_NATIVE", "") not in ("", "0"):
        raise RuntimeError("disabled by FIELDKIT_NO_NATIVE")
    folder = kernels_dir()
    if folder is None:
        raise RuntimeError(
            "kernel sources not found (looked in $FIELDKIT_KERNELS_DIR, fieldkit/kernels and <repo>/kernels); "
            "install from a source checkout or set FIELDKIT_KERNELS_DIR"
        )
    if _compiler() is None:
        raise RuntimeError(f"no C++ compiler found ({os.environ.get('CXX', 'c++')} is not on PATH)")
    build_dir = cache_root() / "torch_extensions" / f"{EXTENSION_NAME}-{_build_key(folder)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils.cpp_extension import load

    start = time.perf_counter()
    try:
        module = load(
            name=EXTENSION_NAME,
            sources=[str(folder / rel) for rel in _SOURCES],
            extra_include_paths=[str(folder / "include"), str(folder)],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
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
    """(True, '') when the extension builds/loads, else (False, reason)."""
    try:
        extension()
    except RuntimeError as error:
        return False, str(error)
    return True, ""


def backend():
    from fieldkit.render.backends import Backend

    extension()
    return Backend("cpu", project_gaussians_cpu, composite_tiles_cpu, intersect_tiles_cpu)


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
        v_means, v_quats, v_scales, v_viewmats = extension().project_backward(
            means, quats, scales, world_to_cam, K, width, height, eps2d, radii,
            _dense(v_means2d, radii.shape[:2] + (2,), means), _dense(v_conics, radii.shape[:2] + (3,), means),
            _dense(v_depths, radii.shape[:2], means), bool(ctx.needs_input_grad[3]),
        )
        v_viewmats = v_viewmats if ctx.needs_input_grad[3] else None
        return v_means, v_quats, v_scales, v_viewmats, None, None, None, None, None, None


def _dense(grad: Tensor | None, shape, like: Tensor) -> Tensor:
    if grad is None:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    return grad.contiguous()


def project_gaussians_cpu(
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
    """Native twin of :func:`fieldkit.render.projection.project_gaussians` (same signature).

    Differentiable w.r.t. means, quats, scales and world_to_cam (not K). float32 or float64.
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
def intersect_tiles_cpu(
    means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int, tile_size: int = TILE_SIZE
) -> TileIntersections:
    """Native twin of :func:`fieldkit.render.tiles.intersect_tiles`: the same lists, bit for bit.

    means2d [C,N,2], radii [C,N,2] int32 (0 = culled), depths [C,N].
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


def composite_tiles_cpu(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    isect: TileIntersections,
    width: int,
    height: int,
    background: Tensor,
) -> tuple[Tensor, Tensor]:
    """Native twin of :func:`fieldkit.render.composite.composite_tiles` (same signature).

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
    ids = isect.gaussian_ids.to(torch.int64).contiguous()
    offsets = isect.tile_offsets.to(torch.int64).contiguous()
    return _CompositeTiles.apply(*tensors, ids, offsets, geometry)

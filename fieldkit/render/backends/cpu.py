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



from fieldkit.native_build import NativeExtension
from fieldkit.render.backends.native_ops import native_stages

EXTENSION_NAME = "fieldkit_cpu"
CPU_TILE_SIZE = 32
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

_EXTENSION = NativeExtension(EXTENSION_NAME, _SOURCES, _HEADERS, cflags=CFLAGS, ldflags=LDFLAGS,
                             include_dirs=("include", ""))


# Module API: kernels_dir(), extension() (built on first call; RuntimeError with the reason if it
# cannot be), is_available() -> (ok, reason), and build_seconds (wall time of the build/load here).
kernels_dir = _EXTENSION.kernels_dir
extension = _EXTENSION.module
is_available = _EXTENSION.is_available


def __getattr__(name: str):
    if name == "build_seconds":
        return _EXTENSION.build_seconds
    raise AttributeError(name)


def backend():
    from fieldkit.render.backends import Backend

    extension()
    # 32-pixel tiles: ~10 % faster than 16 here (fewer splats cut at tile borders, fewer gathers);
    # the forward's row masks cover tiles up to 64 pixels wide (wider tiles work, without them).
    return Backend("cpu", project_gaussians_cpu, composite_tiles_cpu, intersect_tiles_cpu, tile_size=CPU_TILE_SIZE)


# The three stages (torch autograd glue shared with the other native backend: native_ops.py)
project_gaussians_cpu, intersect_tiles_cpu, composite_tiles_cpu = native_stages(extension, "cpu")

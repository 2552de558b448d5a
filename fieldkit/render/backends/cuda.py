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

import os
import shutil
from pathlib import Path

import torch

from fieldkit.native_build import NativeExtension
from fieldkit.render.backends.native_ops import native_stages

# FIELDKIT_CUDA_FAST_MATH=1 builds a variant with FMA contraction and nvcc's fast math: faster,
# but no longer bit-equal to the CPU build (parity with the torch reference still holds).
FAST_MATH = os.environ.get("FIELDKIT_CUDA_FAST_MATH", "0") == "1"
EXTENSION_NAME = "fieldkit_cuda_fast" if FAST_MATH else "fieldkit_cuda"
CFLAGS = ["-O3"]
CUDA_FLAGS = ["-O3", "--use_fast_math"] if FAST_MATH else ["-O3", "--fmad=false"]
_SOURCES = ("bindings/cuda_bindings.cpp", "cuda/projection.cu", "cuda/intersect.cu", "cuda/composite.cu")
_HEADERS = (
    "cuda/rasterize_cuda.cuh",
    "bindings/cuda_glue.h",
    "include/fieldkit/common.h",
    "include/fieldkit/projection.h",
    "include/fieldkit/composite.h",
)


def nvcc_path() -> str | None:
    """nvcc from $CUDA_HOME (as torch finds it), else from PATH."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        candidate = Path(CUDA_HOME) / "bin" / "nvcc"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("nvcc")


def _requirements() -> str | None:
    if torch.version.cuda is None:
        return f"this torch build has no CUDA support (torch {torch.__version__})"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if nvcc_path() is None:
        return "nvcc not found (install the CUDA toolkit matching torch.version.cuda, or set CUDA_HOME)"
    return None


def _key_parts() -> list[str]:
    capability = ".".join(map(str, torch.cuda.get_device_capability()))
    return [str(torch.version.cuda), str(nvcc_path()), capability, os.environ.get("TORCH_CUDA_ARCH_LIST", "")]


_EXTENSION = NativeExtension(EXTENSION_NAME, _SOURCES, _HEADERS, cflags=CFLAGS, cuda_cflags=CUDA_FLAGS,
                             include_dirs=("include", "cuda", ""), what="CUDA kernel sources",
                             requirements=_requirements, key_parts=_key_parts)


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
    return Backend("cuda", project_gaussians_cuda, composite_tiles_cuda, intersect_tiles_cuda)


# The three stages (torch autograd glue shared with the other native backend: native_ops.py)
project_gaussians_cuda, intersect_tiles_cuda, composite_tiles_cuda = native_stages(extension, "cuda")

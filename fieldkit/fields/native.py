"""Native hash-grid encoding: ``kernels/hashgrid`` built just in time (CPU: C++/OpenMP; CUDA: nvcc).

Same pattern as the rasterizer's CPU backend (:mod:`fieldkit.render.backends.cpu`): the
extension is compiled with :func:`torch.utils.cpp_extension.load` on first use, once per
process, cached under ``$FIELDKIT_CACHE_DIR`` (default ``~/.cache/fieldkit``) in a folder keyed
by a hash of the sources, torch, Python and flags. Sources are looked up in
``$FIELDKIT_KERNELS_DIR``, ``fieldkit/kernels`` (package data) and ``<repo>/kernels``.
``FIELDKIT_NO_NATIVE=1`` disables it. It computes the same function as
:func:`fieldkit.fields.hashgrid.hash_encode_torch` (float32 or float64), differentiable w.r.t.
the table and the points.

The CPU forward and table gradient are split by level (levels own disjoint rows, so no atomics);
the point gradient is split by point.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from fieldkit.fields.hashgrid import LevelLayout
from fieldkit.native_build import NativeExtension

log = logging.getLogger("fieldkit")

_SOURCES = {
    "cpu": ("hashgrid/bindings_cpu.cpp", "hashgrid/hashgrid_cpu.cpp"),
    "cuda": ("hashgrid/bindings_cuda.cpp", "hashgrid/hashgrid_cuda.cu"),
}
_HEADERS = {
    "cpu": ("hashgrid/hashgrid.h", "hashgrid/hashgrid_cpu.h"),
    "cuda": ("hashgrid/hashgrid.h", "hashgrid/hashgrid_cuda.h"),
}
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
CUDA_FLAGS = ["-O3"]

_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _cuda_requirements() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    from torch.utils.cpp_extension import CUDA_HOME

    return "nvcc / CUDA_HOME not found" if CUDA_HOME is None else None


_EXTENSIONS = {
    kind: NativeExtension(f"fieldkit_hashgrid_{kind}", _SOURCES[kind], _HEADERS[kind], cflags=CFLAGS, ldflags=LDFLAGS,
                          cuda_cflags=CUDA_FLAGS if kind == "cuda" else None, include_dirs=("hashgrid",),
                          what="hash-grid kernel sources", requirements=_cuda_requirements if kind == "cuda" else None)
    for kind in ("cpu", "cuda")
}


def kernels_dir(kind: str = "cpu") -> Path | None:
    return _EXTENSIONS[kind].kernels_dir()


def extension(kind: str = "cpu") -> ModuleType:
    """The compiled extension for 'cpu' or 'cuda' (built on first call); RuntimeError if unavailable."""
    return _EXTENSIONS[kind].module()


def is_available(device: torch.device | str = "cpu") -> tuple[bool, str]:
    return _EXTENSIONS["cuda" if torch.device(device).type == "cuda" else "cpu"].is_available()


_tables: dict[tuple[LevelLayout, str], tuple[Tensor, Tensor]] = {}


def level_tables(layout: LevelLayout, device: torch.device) -> tuple[Tensor, Tensor]:
    """(scales float64 [L], meta int64 [L,4] = resolution, rows, offset, hashed) on the kernel's side."""
    key = (layout, str(device))
    if key not in _tables:
        scales = torch.tensor(layout.scales, dtype=torch.float64)
        meta = torch.tensor([[r, s, o, int(h)] for r, s, o, h in zip(layout.resolutions, layout.sizes, layout.offsets, layout.hashed)],
                            dtype=torch.int64)
        _tables[key] = (scales, meta)  # read on the host by both bindings
    return _tables[key]


class _HashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, scales, meta, kind):
        ext = extension(kind)
        ctx.save_for_backward(x, table)
        ctx.extras = (scales, meta, kind)
        return ext.forward(x, table, scales, meta)

    @staticmethod
    def backward(ctx, grad_out):
        x, table = ctx.saved_tensors
        scales, meta, kind = ctx.extras
        ext = extension(kind)
        grad_out = grad_out.contiguous()
        grad_x = grad_table = None
        if ctx.needs_input_grad[1]:
            grad_table = ext.backward_table(x, grad_out, scales, meta, table.shape[0], table.shape[1])
        if ctx.needs_input_grad[0]:
            grad_x = ext.backward_points(x, table, grad_out, scales, meta)
        return grad_x, grad_table, None, None, None


def hash_encode(x: Tensor, table: Tensor, layout: LevelLayout) -> Tensor:
    """Native twin of :func:`fieldkit.fields.hashgrid.hash_encode_torch`: [N, D] -> [N, L * F]."""
    if x.ndim != 2 or x.shape[1] != layout.dims:
        raise ValueError(f"expected points [N, {layout.dims}], got {tuple(x.shape)}")
    if table.shape != (layout.total_rows, layout.features):
        raise ValueError(f"table must be [{layout.total_rows}, {layout.features}], got {tuple(table.shape)}")
    kind = "cuda" if x.device.type == "cuda" else "cpu"
    scales, meta = level_tables(layout, x.device)
    return _HashEncode.apply(x.to(table.dtype).contiguous(), table.contiguous(), scales, meta, kind)

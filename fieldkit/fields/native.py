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

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import traceback
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from fieldkit.fields.hashgrid import LevelLayout

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

_lock = threading.Lock()
_modules: dict[str, ModuleType] = {}
_failures: dict[str, str] = {}
_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def kernels_dir(kind: str = "cpu") -> Path | None:
    candidates = []
    if os.environ.get("FIELDKIT_KERNELS_DIR"):
        candidates.append(Path(os.environ["FIELDKIT_KERNELS_DIR"]))
    package_root = Path(__file__).resolve().parents[1]  # .../fieldkit
    candidates += [package_root / "kernels", package_root.parent / "kernels"]
    for folder in candidates:
        if all((folder / rel).is_file() for rel in _SOURCES[kind] + _HEADERS[kind]):
            return folder
    return None


def _cache_root() -> Path:
    if os.environ.get("FIELDKIT_CACHE_DIR"):
        return Path(os.environ["FIELDKIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fieldkit"


def _build_key(folder: Path, kind: str) -> str:
    digest = hashlib.sha256()
    for rel in sorted(_SOURCES[kind] + _HEADERS[kind]):
        digest.update(rel.encode())
        digest.update((folder / rel).read_bytes())
    flags = CFLAGS + LDFLAGS + (CUDA_FLAGS if kind == "cuda" else [])
    digest.update("|".join([torch.__version__, sys.version, platform.machine(), " ".join(flags)]).encode())
    return digest.hexdigest()[:16]


def _load(kind: str) -> ModuleType:
    if os.environ.get("FIELDKIT_NO_NATIVE", "") not in ("", "0"):
        raise RuntimeError("disabled by FIELDKIT_NO_NATIVE")
    folder = kernels_dir(kind)
    if folder is None:
        raise RuntimeError("hash-grid kernel sources not found (looked in $FIELDKIT_KERNELS_DIR, fieldkit/kernels, <repo>/kernels)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler found")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            raise RuntimeError("nvcc / CUDA_HOME not found")
    name = f"fieldkit_hashgrid_{kind}"
    build_dir = _cache_root() / "torch_extensions" / f"{name}-{_build_key(folder, kind)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils.cpp_extension import load

    try:
        return load(
            name=name,
            sources=[str(folder / rel) for rel in _SOURCES[kind]],
            extra_include_paths=[str(folder / "hashgrid")],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            extra_cuda_cflags=CUDA_FLAGS if kind == "cuda" else None,
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as error:
        log_path = build_dir / "build_error.log"
        log_path.write_text(f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
        raise RuntimeError(f"building the {name} extension failed; log: {log_path}") from error


def extension(kind: str = "cpu") -> ModuleType:
    """The compiled extension for 'cpu' or 'cuda' (built on first call); RuntimeError if unavailable."""
    if kind in _modules:
        return _modules[kind]
    with _lock:
        if kind not in _modules and kind not in _failures:
            try:
                _modules[kind] = _load(kind)
            except Exception as error:  # remember: do not retry a broken build on every call
                _failures[kind] = str(error)
        if kind not in _modules:
            raise RuntimeError(_failures[kind])
        return _modules[kind]


def is_available(device: torch.device | str = "cpu") -> tuple[bool, str]:
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    try:
        extension(kind)
    except RuntimeError as error:
        return False, str(error)
    return True, ""


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

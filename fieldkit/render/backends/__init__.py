"""Rasterizer backends: the same two differentiable stages, implemented several ways.

A backend provides ``project`` (same signature as :func:`fieldkit.render.projection.project_gaussians`)
and ``composite`` (same as :func:`fieldkit.render.composite.composite_tiles`). The torch backend
is the reference every other backend is tested against.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from fieldkit.render.tiles import TILE_SIZE

log = logging.getLogger("fieldkit")

BACKEND_NAMES = ("auto", "torch", "cpu", "cuda", "gsplat")


def _torch_intersect(*args, **kwargs):
    from fieldkit.render.tiles import intersect_tiles

    return intersect_tiles(*args, **kwargs)


@dataclass(frozen=True)
class Backend:
    """``project`` and ``composite`` are differentiable; ``intersect`` (tile binning) is not and
    must return exactly the lists of :func:`fieldkit.render.tiles.intersect_tiles`."""

    name: str
    project: Callable
    composite: Callable
    intersect: Callable = _torch_intersect
    tile_size: int = TILE_SIZE
    """Tile edge in pixels that ``rasterize`` uses with this backend unless told otherwise."""


def _torch_backend() -> Backend:
    from fieldkit.render.composite import composite_tiles
    from fieldkit.render.projection import project_gaussians
    from fieldkit.render.tiles import intersect_tiles

    return Backend("torch", project_gaussians, composite_tiles, intersect_tiles)


def _native_backend(name: str) -> tuple[Backend | None, str]:
    """Load fieldkit.render.backends.<name>; returns (backend, '') or (None, reason)."""
    try:
        module = importlib.import_module(f"fieldkit.render.backends.{name}")
    except ImportError as error:
        return None, f"{name} backend not built into this install ({error})"
    available, reason = module.is_available()
    if not available:
        return None, reason
    return module.backend(), ""


_resolved: dict[tuple[str, str], Backend] = {}


def get_backend(name: str, device: torch.device | str = "cpu") -> Backend:
    """Backend by name; ``auto`` picks cuda (GPU tensors), else the native CPU build, else torch.

    ``auto`` goes by where the tensors are: CUDA tensors -> cuda, else torch (which runs on the
    GPU too; the cpu backend cannot take GPU tensors); CPU tensors -> cpu, else torch. Not using
    cuda for CPU tensors is expected and silent (one info line when a GPU is present). An explicit
    name that cannot be used raises; ``auto`` warns once, in one line, what it fell back from and
    why.
    """
    device = torch.device(device)
    key = (name, device.type)
    if key in _resolved:
        return _resolved[key]
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "torch":
        backend = _torch_backend()
    elif name != "auto":
        backend, reason = _native_backend(name)
        if backend is None:
            raise RuntimeError(f"backend {name!r} is not available: {reason}")
    else:
        preferred = "cuda" if device.type == "cuda" else "cpu"
        backend, reason = _native_backend(preferred)
        if backend is None:
            backend = _torch_backend()
            log.warning("backend auto: using torch, not %s (%s)", preferred, reason)
        elif preferred == "cpu" and torch.cuda.is_available():
            log.info("backend auto: tensors are on the CPU, using cpu (move them to a GPU for cuda)")
    _resolved[key] = backend
    return backend

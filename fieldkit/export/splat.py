"""antimatter15 ``.splat``: 32 bytes per Gaussian, no header, little-endian (reference §3.3).

Record layout:
  bytes  0-11  position, 3 x float32
  bytes 12-23  linear scale exp(log_scale), 3 x float32
  bytes 24-27  RGBA uint8: RGB = (0.5 + C0 * f_dc) * 255, A = sigmoid(opacity) * 255
  bytes 28-31  rotation uint8: (q / |q|) * 128 + 128, in w, x, y, z order

Bytes are produced like antimatter15's ``convert.py``: clip to [0, 255], then truncate (not round).
The format is lossy: only the DC colour survives (higher SH are dropped), colour and opacity keep
8 bits, rotations about 7 bits per component, and the quaternion is normalised.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from fieldkit.export.ply import SplatFormatError, alpha_to_logit
from fieldkit.io_atomic import atomic_path
from fieldkit.models.gaussians import SH_C0, Splats

__all__ = ["SPLAT_DTYPE", "read_splat", "splat_records", "splat_sort_order", "write_splat"]

PathLike = str | os.PathLike[str]

SPLAT_DTYPE = np.dtype([("position", "<f4", (3,)), ("scale", "<f4", (3,)),
                        ("rgba", "u1", (4,)), ("rotation", "u1", (4,))])
assert SPLAT_DTYPE.itemsize == 32


def _np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _to_bytes(values: np.ndarray) -> np.ndarray:
    """Clip to [0, 255] and truncate to uint8, as antimatter15's convert.py does."""
    return np.clip(values, 0.0, 255.0).astype(np.uint8)


def splat_sort_order(splats: Splats) -> np.ndarray:
    """Indices by descending exp(s0 + s1 + s2) * sigmoid(opacity) (stable; computed in float64)."""
    log_volume = _np64(splats.log_scales).sum(axis=1)
    alpha = 1.0 / (1.0 + np.exp(-_np64(splats.opacity_logits)))
    return np.argsort(-(np.exp(log_volume) * alpha), kind="stable")


def splat_records(splats: Splats, *, sort: bool = True) -> np.ndarray:
    """Structured [N] array of ``SPLAT_DTYPE`` records (sorted like convert.py unless ``sort=False``)."""
    order = splat_sort_order(splats) if sort else np.arange(len(splats))
    records = np.empty(len(splats), SPLAT_DTYPE)
    records["position"] = _np64(splats.means)[order]
    records["scale"] = np.exp(_np64(splats.log_scales)[order])
    rgb = 0.5 + SH_C0 * _np64(splats.sh[:, 0, :])[order]
    alpha = 1.0 / (1.0 + np.exp(-_np64(splats.opacity_logits)[order]))
    records["rgba"] = _to_bytes(np.concatenate([rgb, alpha[:, None]], axis=1) * 255.0)
    quats = _np64(splats.quats)[order]
    unit = quats / np.maximum(np.linalg.norm(quats, axis=1, keepdims=True), 1e-12)
    records["rotation"] = _to_bytes(unit * 128.0 + 128.0)
    return records


def write_splat(path: PathLike, splats: Splats, *, sort: bool = True) -> None:
    """Write ``splats`` as an antimatter15 ``.splat`` file (atomically, DC colour only)."""
    records = splat_records(splats, sort=sort)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(records.tobytes())


def read_splat(path: PathLike) -> Splats:
    """Read a ``.splat`` file into :class:`Splats` (SH degree 0).

    Lossy decode of the uint8 fields, the way viewers read them: colour c/255, alpha a/255
    (opacity logit, with a = 0 / 255 -> -40 / +40), quaternion (b - 128) / 128 (not renormalised),
    log_scale = log(scale) with scale floored at the smallest normal float32 (so 0 gives about -87).
    """
    data = np.fromfile(os.fspath(path), dtype=np.uint8)
    if data.size % SPLAT_DTYPE.itemsize:
        raise SplatFormatError(f"{path}: size {data.size} bytes is not a multiple of 32 (.splat records)")
    records = data.view(SPLAT_DTYPE)
    rgba = records["rgba"].astype(np.float64) / 255.0
    dc = (rgba[:, :3] - 0.5) / SH_C0
    scale = np.maximum(records["scale"].astype(np.float64), np.finfo(np.float32).tiny)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return Splats(
        means=t(records["position"]),
        quats=t((records["rotation"].astype(np.float64) - 128.0) / 128.0),
        log_scales=t(np.log(scale)),
        opacity_logits=t(alpha_to_logit(rgba[:, 3])),
        sh=t(dc[:, None, :]),
    )

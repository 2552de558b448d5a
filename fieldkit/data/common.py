"""Helpers shared by the readers: fitting intrinsics to loaded images, hold-out splits."""

from __future__ import annotations

from typing import Sequence

import torch

from ..cameras import Cameras
from .images import ImageBatch


def cameras_for_images(
    world_to_cam: torch.Tensor, K: torch.Tensor, intrinsics_size: tuple[int, int] | Sequence[tuple[int, int]] | None, batch: ImageBatch
) -> Cameras:
    """float32 Cameras matching the decoded images of ``batch``.

    K [N,3,3] is given for images of ``intrinsics_size`` (W,H) (one size, or one per
    camera; None = the files' own size). It is first rescaled per axis to the files' actual
    size (an ``images_N`` copy), then by the box factor (``Cameras.scaled``).
    """
    K = K.double().clone()
    fw, fh = batch.file_size
    if intrinsics_size is not None:
        sizes = [intrinsics_size] * len(K) if isinstance(intrinsics_size[0], (int, float)) else list(intrinsics_size)
        sx = torch.tensor([fw / float(s[0]) for s in sizes], dtype=torch.float64)
        sy = torch.tensor([fh / float(s[1]) for s in sizes], dtype=torch.float64)
        K[:, 0, :] *= sx[:, None]
        K[:, 1, :] *= sy[:, None]
    cams = Cameras(world_to_cam.double(), K, fw, fh)
    if batch.factor != 1:
        cams = cams.scaled(1.0 / batch.factor)
    w, h = batch.size
    return Cameras(cams.world_to_cam.float(), cams.K.float(), w, h)


def holdout_split(n: int, every: int = 8) -> dict[str, torch.Tensor]:
    """Every ``every``-th item (0, every, 2*every, ...) is test, the rest train (LLFF / 3DGS habit)."""
    idx = torch.arange(n, dtype=torch.int64)
    if every <= 0:
        return {"train": idx, "test": idx[:0]}
    test = idx % every == 0
    return {"train": idx[~test], "test": idx[test]}


def background_tensor(background: Sequence[float]) -> torch.Tensor:
    """[3] float32 background colour, validated."""
    bg = torch.as_tensor(background, dtype=torch.float32).flatten()
    if bg.numel() == 1:
        bg = bg.expand(3).clone()
    if bg.numel() != 3:
        raise ValueError(f"background must be 3 values (RGB in [0,1]), got {list(background)}")
    return bg

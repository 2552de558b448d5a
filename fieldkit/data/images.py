"""Image loading: Pillow decode, alpha compositing, integer box downscale, size checks."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import SceneFormatError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".exr", ".webp")


@dataclass
class ImageBatch:
    """Decoded images of one size.

    rgb: [N,H,W,3] float32 in [0,1], composited on the background when there was alpha.
    alpha: [N,H,W,1] float32 or None when no file had an alpha channel.
    file_size: (width, height) of the files before the box reduction.
    factor: the integer box reduction applied (1 = none).
    """

    rgb: torch.Tensor
    alpha: torch.Tensor | None
    file_size: tuple[int, int]
    factor: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the returned images."""
        return self.rgb.shape[2], self.rgb.shape[1]


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file without decoding its pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as exc:
        raise SceneFormatError(f"{path}: cannot read image ({exc})") from exc


def read_image(path: Path) -> np.ndarray:
    """One image as float32 [H,W,3] or [H,W,4] (RGBA) in [0,1]."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32) / 65535.0
                return np.repeat(arr[..., None], 3, axis=-1)
            if mode == "F":
                arr = np.asarray(im, dtype=np.float32)
                return np.repeat(arr[..., None], 3, axis=-1)
            has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info)
            im = im.convert("RGBA" if has_alpha else "RGB")
            return np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise SceneFormatError(f"{path}: cannot read image ({exc})") from exc


def box_downscale(arr: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks of [H,W,C] (the ragged right/bottom edge is cropped)."""
    if factor == 1:
        return arr
    h, w = arr.shape[0] // factor, arr.shape[1] // factor
    if h == 0 or w == 0:
        raise ValueError(f"cannot downscale a {arr.shape[1]}x{arr.shape[0]} image by {factor}")
    cropped = arr[: h * factor, : w * factor]
    return cropped.reshape(h, factor, w, factor, arr.shape[2]).mean(axis=(1, 3), dtype=np.float32)


def load_images(
    paths: Sequence[Path],
    downscale: int = 1,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    workers: int | None = None,
) -> ImageBatch:
    """Decode ``paths`` (all the same size), composite alpha on ``background``, box-downscale.

    Compositing happens before the reduction, which equals reducing premultiplied colour.
    """
    if downscale < 1 or int(downscale) != downscale:
        raise ValueError(f"downscale must be a positive integer, got {downscale}")
    downscale = int(downscale)
    if not paths:
        raise SceneFormatError("no images to load")
    bg = np.asarray(background, dtype=np.float32).reshape(3)
    paths = [Path(p) for p in paths]
    first_size = image_size(paths[0])

    def decode(path: Path) -> np.ndarray:
        arr = read_image(path)
        if (arr.shape[1], arr.shape[0]) != first_size:
            raise SceneFormatError(
                f"{path}: image is {arr.shape[1]}x{arr.shape[0]} but {paths[0].name} is "
                f"{first_size[0]}x{first_size[1]}; all images of a scene must have the same size"
            )
        if arr.shape[2] == 4:
            a = arr[..., 3:4]
            arr = np.concatenate([arr[..., :3] * a + bg * (1.0 - a), a], axis=-1)
        return box_downscale(arr, downscale)

    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if n_workers > 1 and len(paths) > 1:
        with ThreadPoolExecutor(n_workers) as pool:
            arrays = list(pool.map(decode, paths))
    else:
        arrays = [decode(p) for p in paths]

    h, w = arrays[0].shape[:2]
    rgb = np.empty((len(arrays), h, w, 3), dtype=np.float32)
    any_alpha = any(a.shape[2] == 4 for a in arrays)
    alpha = np.ones((len(arrays), h, w, 1), dtype=np.float32) if any_alpha else None
    for i, a in enumerate(arrays):
        rgb[i] = a[..., :3]
        if alpha is not None and a.shape[2] == 4:
            alpha[i] = a[..., 3:4]
    return ImageBatch(
        rgb=torch.from_numpy(rgb),
        alpha=None if alpha is None else torch.from_numpy(alpha),
        file_size=first_size,
        factor=downscale,
    )


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def resolution_folders(root: Path, base: str = "images") -> list[tuple[Path, int]]:
    """Existing ``base`` and ``base_N`` folders under ``root`` as (folder, N), N=1 for ``base``."""
    found: list[tuple[Path, int]] = []
    if (root / base).is_dir():
        found.append((root / base, 1))
    pattern = re.compile(rf"^{re.escape(base)}_(\d+)$")
    if root.is_dir():
        for child in sorted(root.iterdir()):
            m = pattern.match(child.name)
            if m and child.is_dir():
                found.append((child, int(m.group(1))))
    return sorted(found, key=lambda item: item[1])


def choose_resolution(
    candidates: Sequence[tuple[Path, Path]], target_width: float | None, downscale: int
) -> tuple[Path, int]:
    """Pick the folder whose images best match ``target_width`` and the box factor still needed.

    candidates: (folder, one sample image in it). The winner is the folder whose width,
    after reduction by the nearest integer factor, is closest to the target (log ratio);
    ties go to the smaller factor. With no target width the first candidate is reduced
    by ``downscale``.
    """
    if not candidates:
        raise SceneFormatError("no image folder found")
    if target_width is None:
        return candidates[0][0], downscale
    best: tuple[float, int, Path] | None = None
    for folder, sample in candidates:
        width = image_size(sample)[0]
        factor = max(1, round(width / target_width))
        mismatch = abs(np.log(width / factor / target_width))
        score = (mismatch, factor)
        if best is None or score < best[:2]:
            best = (mismatch, factor, folder)
    assert best is not None
    return best[2], best[1]

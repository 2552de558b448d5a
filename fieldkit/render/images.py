"""Writing rendered images: PNGs and ground-truth | render | error side-by-sides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fieldkit.io_atomic import atomic_path


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H,W,3] float in [0,1] -> uint8 array (rounded, clipped)."""
    return (image.detach().cpu().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def save_png(path: Path, image: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format="PNG")


def error_heatmap(target: torch.Tensor, render: torch.Tensor, max_error: float = 0.25) -> torch.Tensor:
    """Mean absolute error per pixel as a black-red-yellow-white heat map [H,W,3]; saturates at ``max_error``."""
    err = (render.detach().cpu() - target.detach().cpu()).abs().mean(-1).div(max_error).clamp(0, 1)
    return torch.stack([(err * 3).clamp(0, 1), (err * 3 - 1).clamp(0, 1), (err * 3 - 2).clamp(0, 1)], dim=-1)


def save_comparison(path: Path, target: torch.Tensor, render: torch.Tensor) -> None:
    """One PNG: ground truth | render | error heat map, with a 2-pixel white gap."""
    target, render = target.detach().cpu(), render.detach().cpu()
    gap = torch.ones(target.shape[0], 2, 3)
    strip = torch.cat([target, gap, render, gap, error_heatmap(target, render)], dim=1)
    save_png(path, strip)

"""What every method provides to the trainer, the CLI and the viewer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fieldkit.cameras import Cameras


def pick_device(device: str | torch.device = "auto", backend: str | None = None) -> torch.device:
    """``"auto"``: the GPU when torch sees one (unless the backend is the native CPU build), else the
    CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and backend != "cpu" else "cpu")
    return torch.device(device)


class Method(ABC):
    """A model plus how to train, render, save and export it. The trainer knows nothing else."""

    name: str = ""

    @abstractmethod
    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step; returns scalars to log (at least ``loss``)."""

    @abstractmethod
    @torch.no_grad()
    def render(self, cameras: Cameras) -> dict[str, Tensor]:
        """Images for ``cameras``: at least ``rgb`` [C,H,W,3]; ``alpha``/``depth`` [C,H,W,1] if available."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (tensors, numbers, strings only: loaded with weights_only=True)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def export(self, fmt: str, path: Path) -> Path:
        """Write the model in format ``fmt``; returns the written path."""

    export_formats: tuple[str, ...] = ()

    @classmethod
    def load_data(cls, path: Path, downscale: int = 1, background: Tensor | None = None) -> Any:
        """Read the training data this method consumes (posed images by default)."""
        from fieldkit.data import load_scene

        return load_scene(path, downscale=downscale, background=background)

    def held_out_views(self) -> tuple[Tensor, Cameras] | None:
        """(images, cameras) the trainer evaluates on periodically, or None."""
        scene = getattr(self, "scene", None)
        if scene is None or "test" not in getattr(scene, "split", {}):
            return None
        return scene.subset("test")

    def stats(self) -> dict[str, float]:
        """Extra numbers for the progress bar and viewer (e.g. Gaussian count)."""
        return {}

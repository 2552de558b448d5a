"""Pick the reader for a scene folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from .blender import load_blender
from .colmap import MODEL_SUBDIRS, find_model_folder, load_colmap
from .errors import SceneFormatError
from .llff import load_llff
from .nerfstudio import load_nerfstudio
from .scene import Scene

LOADERS: dict[str, Callable[..., Scene]] = {
    "blender": load_blender,
    "nerfstudio": load_nerfstudio,
    "colmap": load_colmap,
    "llff": load_llff,
}

# what detect_format looks for, in order of preference
LOOKED_FOR = (
    "transforms_train.json (Blender synthetic)",
    "transforms.json (nerfstudio)",
    "a COLMAP model: cameras + images .bin/.txt in "
    + ", ".join(s or "the folder itself" for s in MODEL_SUBDIRS),
    "poses_bounds.npy (LLFF)",
)


def detect_format(path: str | Path) -> str:
    """"blender", "nerfstudio", "colmap" or "llff" for a scene folder (or its main file).

    Preference: Blender, nerfstudio, a complete COLMAP model (which carries points and
    the real lens model), then LLFF (which also picks up COLMAP points beside it).
    """
    p = Path(path)
    if p.is_file():
        name = p.name
        if name.startswith("transforms_") and name.endswith(".json"):
            return "blender"
        if name.endswith(".json"):
            return "nerfstudio"
        if name == "poses_bounds.npy":
            return "llff"
        if p.stem in ("cameras", "images", "points3D"):
            return "colmap"
        p = p.parent
    if not p.is_dir():
        raise SceneFormatError(f"{p}: no such scene folder")
    if (p / "transforms_train.json").is_file():
        return "blender"
    if (p / "transforms.json").is_file():
        return "nerfstudio"
    if find_model_folder(p) is not None:
        return "colmap"
    if (p / "poses_bounds.npy").is_file():
        return "llff"
    raise SceneFormatError(f"{p}: unrecognised scene folder; looked for " + "; ".join(LOOKED_FOR))


def load_scene(
    path: str | Path,
    downscale: int = 1,
    background: Sequence[float] | None = None,
    format: str | None = None,
    **kwargs: Any,
) -> Scene:
    """Load any supported scene; ``format`` overrides detection, ``background`` None keeps
    the reader's default (white), other keyword arguments go to the reader."""
    fmt = format or detect_format(path)
    if fmt not in LOADERS:
        raise ValueError(f"unknown scene format {fmt!r}; known: {', '.join(LOADERS)}")
    if background is not None:
        kwargs["background"] = background
    p = Path(path)
    if p.is_file() and fmt in ("colmap", "llff"):
        p = p.parent
    return LOADERS[fmt](p, downscale=downscale, **kwargs)

"""Errors and small parsing helpers shared by the scene readers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np


class SceneFormatError(ValueError):
    """Bad scene input; the message names the file and what is wrong."""


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file; malformed JSON raises with the line and column."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SceneFormatError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SceneFormatError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(data, dict):
        raise SceneFormatError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def require(mapping: dict[str, Any], key: str, where: str) -> Any:
    """``mapping[key]`` or a SceneFormatError naming ``where`` and the missing key."""
    if key not in mapping:
        raise SceneFormatError(f"{where}: missing required key {key!r}")
    return mapping[key]


def as_pose_matrix(value: Any, where: str) -> np.ndarray:
    """A 4x4 (or 3x4, padded) float64 pose from nested lists; wrong shapes raise naming ``where``."""
    try:
        mat = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SceneFormatError(f"{where}: transform_matrix is not a numeric matrix ({exc})") from exc
    if mat.shape == (3, 4):
        mat = np.concatenate([mat, [[0.0, 0.0, 0.0, 1.0]]], axis=0)
    if mat.shape != (4, 4):
        raise SceneFormatError(f"{where}: transform_matrix must be 4x4 (or 3x4), got shape {mat.shape}")
    if not np.all(np.isfinite(mat)):
        raise SceneFormatError(f"{where}: transform_matrix contains NaN or infinity")
    return mat


def keep_existing(paths: Sequence[Path], source: Path | str) -> list[int]:
    """Indices of ``paths`` that exist; warns once (with a count) about the rest.

    Raises SceneFormatError when none of them exists.
    """
    keep = [i for i, p in enumerate(paths) if Path(p).is_file()]
    missing = len(paths) - len(keep)
    if not paths:
        raise SceneFormatError(f"{source}: no frames listed")
    if not keep:
        raise SceneFormatError(
            f"{source}: none of the {len(paths)} listed images exists (first looked for: {paths[0]})"
        )
    if missing:
        first = next(p for p in paths if not Path(p).is_file())
        warnings.warn(
            f"{source}: {missing} of {len(paths)} listed frames are missing on disk and were skipped "
            f"(first missing: {first})",
            stacklevel=3,
        )
    return keep

"""nerfstudio / instant-ngp ``transforms.json`` scenes."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from ..cameras import intrinsics_matrix, opengl_c2w_to_opencv_w2c
from .common import background_tensor, cameras_for_images, holdout_split
from .errors import SceneFormatError, as_pose_matrix, keep_existing, read_json, require
from .images import image_size, load_images
from .scene import Scene
from .undistort import Distortion, undistort_images

PERSPECTIVE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "PERSPECTIVE")
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


def _lookup(frame: dict[str, Any], meta: dict[str, Any], key: str) -> Any:
    """Per-frame value of ``key``, else the shared top-level one, else None."""
    return frame[key] if key in frame else meta.get(key)


def _distortion(frame: dict[str, Any], meta: dict[str, Any], where: str) -> Distortion:
    """nerfstudio distortion: k1..k4 radial polynomial in r^2 (up to r^8), p1, p2 tangential."""
    params = _lookup(frame, meta, "distortion_params")
    if params is not None:
        values = [float(v) for v in params]
        if len(values) != 6:
            raise SceneFormatError(f"{where}: distortion_params must be [k1, k2, k3, k4, p1, p2], got {len(values)} values")
        k = dict(zip(DISTORTION_KEYS, values))
    else:
        k = {key: float(_lookup(frame, meta, key) or 0.0) for key in DISTORTION_KEYS}
    return Distortion(radial=(k["k1"], k["k2"], k["k3"], k["k4"]), p1=k["p1"], p2=k["p2"])


def _intrinsics(frame: dict[str, Any], meta: dict[str, Any], where: str, image: Path) -> tuple[float, ...]:
    """(fx, fy, cx, cy, w, h) of a frame; w/h default to the image's size, fy to fx,
    cx/cy to the centre; fl_x may come from instant-ngp's camera_angle_x."""
    w, h = _lookup(frame, meta, "w"), _lookup(frame, meta, "h")
    if w is None or h is None:
        w, h = image_size(image)
    fx = _lookup(frame, meta, "fl_x")
    if fx is None:
        angle = _lookup(frame, meta, "camera_angle_x")
        if angle is None:
            raise SceneFormatError(f"{where}: missing required key 'fl_x' (per frame or top level)")
        fx = 0.5 * float(w) / math.tan(0.5 * float(angle))
    fy = _lookup(frame, meta, "fl_y")
    if fy is None:
        angle_y = _lookup(frame, meta, "camera_angle_y")
        fy = 0.5 * float(h) / math.tan(0.5 * float(angle_y)) if angle_y is not None else fx
    cx = _lookup(frame, meta, "cx")
    cy = _lookup(frame, meta, "cy")
    try:
        return (
            float(fx), float(fy),
            float(w) / 2 if cx is None else float(cx), float(h) / 2 if cy is None else float(cy),
            int(w), int(h),
        )
    except (TypeError, ValueError) as exc:
        raise SceneFormatError(f"{where}: intrinsics must be numbers ({exc})") from exc


def _norm(p: str) -> str:
    return os.path.normpath(p).replace("\\", "/")


def _downscaled_path(image: Path, downscale: int) -> Path | None:
    """nerfstudio's ``images_N/<name>`` copy of ``images/<name>``, if it exists."""
    candidate = image.parent.with_name(f"{image.parent.name}_{downscale}") / image.name
    return candidate if candidate.is_file() else None


def read_ply_points(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(xyz [P,3], rgb [P,3] in [0,1] or None) from a PLY vertex element."""
    from plyfile import PlyData

    try:
        vertex = PlyData.read(str(path))["vertex"]
    except (OSError, KeyError, ValueError) as exc:
        raise SceneFormatError(f"{path}: cannot read PLY points ({exc})") from exc
    names = vertex.data.dtype.names or ()
    if not {"x", "y", "z"} <= set(names):
        raise SceneFormatError(f"{path}: PLY vertex element has no x, y, z properties")
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=-1).astype(np.float32)
    rgb = None
    if {"red", "green", "blue"} <= set(names):
        rgb = torch.from_numpy(np.stack([vertex["red"], vertex["green"], vertex["blue"]], -1).astype(np.float32) / 255.0)
    return torch.from_numpy(xyz), rgb


def load_nerfstudio(
    path: str | Path,
    downscale: int = 1,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    distortion: Literal["undistort", "ignore", "error"] = "undistort",
    test_every: int = 8,
    load_points: bool = True,
) -> Scene:
    """Read a nerfstudio ``transforms.json`` (folder or file path).

    Intrinsics are shared (top level) or per frame; ``transform_matrix`` is
    camera-to-world with OpenGL axes, already in the frame ``applied_transform``
    describes (recorded in ``metadata`` only). Non-zero OPENCV distortion is undistorted
    by default (``distortion="ignore"`` or ``"error"`` to change that); fisheye and
    equirectangular models are refused. Splits come from ``train_filenames`` /
    ``val_filenames`` / ``test_filenames`` when present, else every ``test_every``-th
    frame (sorted by file name) is test.
    """
    json_path = Path(path)
    if json_path.is_dir():
        json_path = json_path / "transforms.json"
    if not json_path.is_file():
        raise SceneFormatError(f"{json_path}: not found")
    root = json_path.parent
    meta = read_json(json_path)
    model = str(meta.get("camera_model", "OPENCV")).upper()
    if model not in PERSPECTIVE_MODELS:
        raise SceneFormatError(
            f"{json_path}: camera_model {model} is not supported (perspective models only: "
            f"{', '.join(PERSPECTIVE_MODELS)}); undistort or reproject the images first"
        )
    entries = require(meta, "frames", str(json_path))
    if not isinstance(entries, list):
        raise SceneFormatError(f"{json_path}: 'frames' must be a list")

    parsed = []
    for i, frame in enumerate(entries):
        where = f"{json_path}: frames[{i}]"
        if not isinstance(frame, dict):
            raise SceneFormatError(f"{where}: expected an object")
        file_path = str(require(frame, "file_path", where))
        c2w = as_pose_matrix(require(frame, "transform_matrix", where), where)
        parsed.append((file_path, c2w, frame, where))
    parsed.sort(key=lambda item: item[0])

    listed = [root / p[0] for p in parsed]
    keep = keep_existing(listed, json_path)
    parsed = [parsed[i] for i in keep]
    paths = [root / p[0] for p in parsed]

    factor = downscale
    if downscale > 1:
        smaller = [_downscaled_path(p, downscale) for p in paths]
        if all(s is not None for s in smaller):
            paths, factor = [s for s in smaller if s is not None], 1

    intr = [_intrinsics(frame, meta, where, root / fp) for fp, _, frame, where in parsed]
    dists = [_distortion(frame, meta, where) for _, _, frame, where in parsed]
    if any(not d.is_zero for d in dists) and distortion == "error":
        first = next(parsed[i][3] for i, d in enumerate(dists) if not d.is_zero)
        raise SceneFormatError(
            f"{first}: {model} camera with non-zero distortion; pass distortion='undistort' to resample "
            "onto a pinhole camera, or distortion='ignore' to treat it as a pinhole"
        )

    batch = load_images(paths, downscale=factor, background=background)
    w2c = torch.stack([opengl_c2w_to_opencv_w2c(torch.from_numpy(p[1])) for p in parsed])
    vals = torch.tensor([v[:4] for v in intr], dtype=torch.float64)
    K = intrinsics_matrix(vals[:, 0], vals[:, 1], vals[:, 2], vals[:, 3])
    cameras = cameras_for_images(w2c, K, [(v[4], v[5]) for v in intr], batch)

    rgb, alpha = batch.rgb, batch.alpha
    distorted = any(not d.is_zero for d in dists)
    if distorted and distortion == "undistort":
        rgb = undistort_images(rgb, cameras.K, dists).clamp(0, 1)
        if alpha is not None:
            alpha = undistort_images(alpha, cameras.K, dists).clamp(0, 1)

    points = colors = None
    if load_points and meta.get("ply_file_path"):
        ply = root / str(meta["ply_file_path"])
        if not ply.is_file():
            raise SceneFormatError(f"{json_path}: ply_file_path {meta['ply_file_path']!r} not found at {ply}")
        points, colors = read_ply_points(ply)

    return Scene(
        images=rgb,
        cameras=cameras,
        split=_split(meta, [p[0] for p in parsed], test_every),
        background=background_tensor(background),
        points=points,
        point_colors=colors,
        alphas=alpha,
        name=root.name,
        source=json_path,
        metadata={
            "format": "nerfstudio",
            "camera_model": model,
            "applied_transform": meta.get("applied_transform"),
            "distortion": ("undistorted" if distortion == "undistort" else "ignored") if distorted else "none",
            "image_paths": [str(p) for p in paths],
        },
    )


def _split(meta: dict[str, Any], file_paths: list[str], test_every: int) -> dict[str, torch.Tensor]:
    """Index splits from *_filenames lists (matched on normalised relative paths) or hold-out."""
    keys = {s: f"{s}_filenames" for s in ("train", "val", "test")}
    if not any(k in meta for k in keys.values()):
        return holdout_split(len(file_paths), test_every)
    index = {_norm(p): i for i, p in enumerate(file_paths)}
    split = {}
    for name, key in keys.items():
        if key in meta:
            wanted = [_norm(str(p)) for p in meta[key]]
            split[name] = torch.tensor(sorted(index[p] for p in wanted if p in index), dtype=torch.int64)
    split.setdefault("train", torch.zeros(0, dtype=torch.int64))
    split.setdefault("test", torch.zeros(0, dtype=torch.int64))
    return split

"""Blender synthetic (NeRF) scenes: ``transforms_{train,val,test}.json``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ..cameras import focal_from_fov, intrinsics_matrix, opengl_c2w_to_opencv_w2c
from .common import background_tensor, cameras_for_images
from .errors import SceneFormatError, as_pose_matrix, keep_existing, read_json, require
from .images import load_images
from .scene import Scene

SPLITS = ("train", "val", "test")
SCENE_BOX = torch.tensor([[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]])


def frame_image_path(root: Path, file_path: str) -> Path:
    """Image path of a frame: relative to the JSON folder, ".png" appended when there is no suffix."""
    path = root / file_path
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".exr", ".webp", ".bmp", ".tif", ".tiff"):
        path = path.with_name(path.name + ".png")
    return path


def load_blender(
    path: str | Path,
    downscale: int = 1,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    splits: Sequence[str] = SPLITS,
) -> Scene:
    """Read a Blender synthetic scene folder (or one of its transforms_*.json files).

    Poses are camera-to-world with OpenGL axes; focal = 0.5 W / tan(0.5 camera_angle_x),
    principal point at the image centre. RGBA is composited on ``background``.
    """
    root = Path(path)
    if root.is_file():
        root = root.parent
    if not (root / "transforms_train.json").is_file():
        raise SceneFormatError(f"{root}: not a Blender scene (transforms_train.json not found)")

    frames: list[tuple[str, Path, torch.Tensor, float, Path]] = []  # split, image, w2c, fov, json
    listed: list[Path] = []
    for split in splits:
        json_path = root / f"transforms_{split}.json"
        if not json_path.is_file():
            continue
        meta = read_json(json_path)
        fov = require(meta, "camera_angle_x", str(json_path))
        if not isinstance(fov, (int, float)) or not 0 < fov < math.pi:
            raise SceneFormatError(f"{json_path}: camera_angle_x must be an angle in radians in (0, pi), got {fov!r}")
        entries = require(meta, "frames", str(json_path))
        if not isinstance(entries, list):
            raise SceneFormatError(f"{json_path}: 'frames' must be a list")
        for i, frame in enumerate(entries):
            where = f"{json_path}: frames[{i}]"
            if not isinstance(frame, dict):
                raise SceneFormatError(f"{where}: expected an object")
            file_path = require(frame, "file_path", where)
            c2w = as_pose_matrix(require(frame, "transform_matrix", where), where)
            image = frame_image_path(root, str(file_path))
            w2c = opengl_c2w_to_opencv_w2c(torch.from_numpy(c2w))
            frames.append((split, image, w2c, float(fov), json_path))
            listed.append(image)

    keep = keep_existing(listed, root)
    frames = [frames[i] for i in keep]
    batch = load_images([f[1] for f in frames], downscale=downscale, background=background)

    fw, fh = batch.file_size
    focal = [focal_from_fov(f[3], fw) for f in frames]  # square pixels: fy = fx
    K = intrinsics_matrix(torch.tensor(focal), torch.tensor(focal), fw / 2.0, fh / 2.0)
    cameras = cameras_for_images(torch.stack([f[2] for f in frames]), K, None, batch)

    split_names = [f[0] for f in frames]
    split = {
        s: torch.tensor([i for i, name in enumerate(split_names) if name == s], dtype=torch.int64)
        for s in splits
        if s in split_names or s in ("train", "test")
    }
    return Scene(
        images=batch.rgb,
        cameras=cameras,
        split=split,
        background=background_tensor(background),
        alphas=batch.alpha,
        name=root.name,
        source=root,
        scene_box=SCENE_BOX.clone(),
        metadata={"format": "blender", "image_paths": [str(f[1]) for f in frames]},
    )


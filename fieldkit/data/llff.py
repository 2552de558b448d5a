"""LLFF forward-facing captures: ``poses_bounds.npy`` plus ``images`` / ``images_N``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..cameras import intrinsics_matrix, llff_to_opencv_w2c
from .colmap_model import model_file, read_points3d
from .common import background_tensor, cameras_for_images, holdout_split
from .errors import SceneFormatError
from .images import choose_resolution, list_images, load_images, resolution_folders
from .scene import Scene

POINT_FOLDERS = ("colmap_text", "sparse/0", "sparse")


def read_poses_bounds(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``poses_bounds.npy`` -> (OpenCV world-to-camera [N,4,4] float64, hwf [N,3], near/far [N,2]).

    hwf is (height, width, focal) at the full resolution the poses were computed for.
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SceneFormatError(f"{path}: cannot read as a numpy array ({exc})") from exc
    if data.ndim != 2 or data.shape[1] != 17 or data.shape[0] == 0:
        raise SceneFormatError(f"{path}: expected an N x 17 array (3x5 pose + near, far per image), got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise SceneFormatError(f"{path}: contains NaN or infinity")
    poses = torch.from_numpy(data[:, :15].reshape(-1, 3, 5).astype(np.float64))
    w2c = llff_to_opencv_w2c(poses[:, :, :4])
    return w2c, poses[:, :, 4].clone(), torch.from_numpy(data[:, 15:17].astype(np.float64))


def find_points(root: Path) -> Path | None:
    """A COLMAP points3D file next to an LLFF capture (colmap_text/, sparse/0/, sparse/)."""
    for sub in POINT_FOLDERS:
        found = model_file(root / sub, "points3D")
        if found is not None:
            return found
    return None


def load_llff(
    path: str | Path,
    downscale: int = 1,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    test_every: int = 8,
    load_points: bool = True,
) -> Scene:
    """Read an LLFF capture folder (or its poses_bounds.npy).

    The images come from the ``images`` / ``images_N`` folder whose size best matches
    full width / ``downscale`` (only folders holding exactly N images qualify); the
    focal length is scaled by actual width / W. Depth bounds go to ``Scene.near_far``,
    and COLMAP points beside the capture (when present) to ``Scene.points``.
    """
    root = Path(path)
    if root.is_file():
        root = root.parent
    pb_path = root / "poses_bounds.npy"
    if not pb_path.is_file():
        raise SceneFormatError(f"{root}: not an LLFF capture (poses_bounds.npy not found)")
    w2c, hwf, near_far = read_poses_bounds(pb_path)
    n = len(w2c)
    height, width = float(hwf[0, 0]), float(hwf[0, 1])
    if not torch.allclose(hwf[:, :2], hwf[:1, :2]):
        raise SceneFormatError(f"{pb_path}: images of different sizes (hwf column differs) are not supported")

    folders = resolution_folders(root)
    candidates, counts = [], []
    for folder, _ in folders:
        files = list_images(folder)
        counts.append(f"{folder.name}: {len(files)}")
        if len(files) == n:
            candidates.append((folder, files[0]))
    if not candidates:
        found = "; ".join(counts) or "no images or images_N folder"
        raise SceneFormatError(f"{pb_path}: lists {n} poses but no image folder holds {n} images ({found})")
    folder, factor = choose_resolution(candidates, width / downscale, downscale)
    files = list_images(folder)
    batch = load_images(files, downscale=factor, background=background)

    fw, fh = batch.file_size
    focal = hwf[:, 2] * (fw / width)  # LLFF scales focal by the width ratio; keep square pixels
    K = intrinsics_matrix(focal, focal, fw / 2.0, fh / 2.0)
    cameras = cameras_for_images(w2c, K, None, batch)

    points = colors = None
    points_file = find_points(root) if load_points else None
    if points_file is not None:
        pts = read_points3d(points_file)
        if len(pts.ids):
            points = torch.from_numpy(pts.xyz).float()
            colors = torch.from_numpy(pts.rgb.astype(np.float32) / 255.0)
    return Scene(
        images=batch.rgb,
        cameras=cameras,
        split=holdout_split(n, test_every),
        background=background_tensor(background),
        points=points,
        point_colors=colors,
        alphas=batch.alpha,
        name=root.name,
        source=root,
        near_far=near_far.float(),
        metadata={
            "format": "llff",
            "image_folder": str(folder),
            "points_file": None if points_file is None else str(points_file),
            "image_paths": [str(f) for f in files],
        },
    )

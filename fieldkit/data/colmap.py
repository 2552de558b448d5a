"""COLMAP scenes: a sparse model (text or binary) plus an ``images/`` folder."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from ..cameras import colmap_to_w2c, intrinsics_matrix
from .colmap_model import ColmapCamera, ColmapModel, is_complete_model, model_file, read_model
from .common import background_tensor, cameras_for_images, holdout_split
from .errors import SceneFormatError, keep_existing
from .images import choose_resolution, load_images, resolution_folders
from .scene import Scene
from .undistort import Distortion, undistort_images

DistortionMode = Literal["undistort", "ignore", "error"]

# where a scene folder may keep its model, in order of preference
MODEL_SUBDIRS = ("", "sparse/0", "sparse", "colmap_text", "colmap/sparse/0", "distorted/sparse/0")
UNDISTORTABLE = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV")


def find_model_folder(path: str | Path) -> Path | None:
    """The first folder under ``path`` (see MODEL_SUBDIRS) holding a complete model, or None."""
    root = Path(path)
    if root.is_file():
        root = root.parent
    for sub in MODEL_SUBDIRS:
        folder = root / sub if sub else root
        if folder.is_dir() and is_complete_model(folder):
            return folder
    return None


def camera_pinhole(cam: ColmapCamera) -> tuple[float, float, float, float]:
    """(fx, fy, cx, cy) of a COLMAP camera."""
    p = cam.params
    if cam.model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE", "FOV"):
        if cam.model == "FOV":
            return p[0], p[1], p[2], p[3]
        return p[0], p[0], p[1], p[2]
    return p[0], p[1], p[2], p[3]


def camera_distortion(cam: ColmapCamera) -> Distortion:
    """The distortion of an undistortable COLMAP camera model (see UNDISTORTABLE)."""
    p = [float(v) for v in cam.params]
    if cam.model in ("SIMPLE_PINHOLE", "PINHOLE"):
        return Distortion()
    if cam.model == "SIMPLE_RADIAL":
        return Distortion(radial=(p[3],))
    if cam.model == "RADIAL":
        return Distortion(radial=(p[3], p[4]))
    if cam.model == "OPENCV":
        return Distortion(radial=(p[4], p[5]), p1=p[6], p2=p[7])
    if cam.model == "FULL_OPENCV":
        return Distortion(radial=(p[4], p[5], p[8]), rational=(p[9], p[10], p[11]), p1=p[6], p2=p[7])
    raise SceneFormatError(
        f"camera {cam.id}: COLMAP model {cam.model} is not supported (fisheye/FOV); undistort the images "
        "first with `colmap image_undistorter` and load the undistorted model"
    )


def _image_root_candidates(model_folder: Path, image_dir: Path | None) -> list[Path]:
    if image_dir is not None:
        return [Path(image_dir)]
    roots, folder = [], model_folder
    for _ in range(3):  # the model folder, its parent, its grandparent (scene/sparse/0)
        roots.append(folder)
        folder = folder.parent
    return roots


def _pick_image_folder(
    model_folder: Path, names: list[str], target_width: float, downscale: int, image_dir: Path | None
) -> tuple[Path, int]:
    """The images folder (``images`` or ``images_N``) best matching the target width."""
    if image_dir is not None:
        folders = [(Path(image_dir), 1)]
    else:
        folders = []
        for root in _image_root_candidates(model_folder, None):
            folders = resolution_folders(root)
            if folders:
                break
    candidates = []
    for folder, _ in folders:
        sample = next((folder / n for n in names if (folder / n).is_file()), None)
        if sample is not None:
            candidates.append((folder, sample))
    if not candidates:
        looked = [str(f) for f, _ in folders] or [str(r / "images") for r in _image_root_candidates(model_folder, image_dir)]
        raise SceneFormatError(
            f"{model_folder}: none of the {len(names)} images named in the model (e.g. {names[0]}) was found; "
            f"looked in {', '.join(looked)} (pass image_dir=... to point at them)"
        )
    return choose_resolution(candidates, target_width, downscale)


def load_colmap(
    path: str | Path,
    downscale: int = 1,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    distortion: DistortionMode = "undistort",
    image_dir: str | Path | None = None,
    test_every: int = 8,
) -> Scene:
    """Read a COLMAP scene: model in ``path`` itself, ``sparse/0``, ``sparse`` or ``colmap_text``.

    Images come from ``images/`` or the ``images_N`` folder best matching ``downscale``
    next to the model (or ``image_dir``); intrinsics follow the actual image size.
    Distorted models (SIMPLE_RADIAL, RADIAL, OPENCV, FULL_OPENCV) are resampled onto a
    pinhole camera with the same K (``distortion="undistort"``), used as if pinhole
    (``"ignore"``), or refused (``"error"``). Every ``test_every``-th image by name is test.
    """
    if distortion not in ("undistort", "ignore", "error"):
        raise ValueError(f"distortion must be 'undistort', 'ignore' or 'error', got {distortion!r}")
    folder = find_model_folder(path)
    if folder is None:
        looked = ", ".join(str(Path(path) / s) if s else str(path) for s in MODEL_SUBDIRS)
        partial = [s for s in MODEL_SUBDIRS if model_file(Path(path) / s, "cameras") is not None]
        hint = f" ({Path(path) / partial[0]} has cameras but no images.bin/.txt)" if partial else ""
        raise SceneFormatError(f"{path}: no COLMAP model (cameras + images .bin/.txt) in {looked}{hint}")
    model = read_model(folder)
    return scene_from_model(model, downscale, background, distortion, image_dir, test_every, name=_scene_name(folder))


def _scene_name(model_folder: Path) -> str:
    folder = model_folder
    while folder.name in ("0", "sparse", "colmap_text", "colmap", "distorted") and folder.parent != folder:
        folder = folder.parent
    return folder.name


def scene_from_model(
    model: ColmapModel,
    downscale: int = 1,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    distortion: DistortionMode = "undistort",
    image_dir: str | Path | None = None,
    test_every: int = 8,
    name: str = "",
) -> Scene:
    """Build a Scene from a parsed model (see :func:`load_colmap`)."""
    folder = model.folder or Path(".")
    if not model.images:
        raise SceneFormatError(f"{folder}: the COLMAP model has no images")
    images = sorted(model.images.values(), key=lambda im: im.name)
    for im in images:
        if im.camera_id not in model.cameras:
            raise SceneFormatError(f"{folder}: image {im.name} refers to camera {im.camera_id}, not in cameras file")
    used = {im.camera_id: model.cameras[im.camera_id] for im in images}
    sizes = {(c.width, c.height) for c in used.values()}
    if len(sizes) > 1:
        raise SceneFormatError(f"{folder}: cameras of different image sizes {sorted(sizes)} are not supported")
    for cam in used.values():
        if cam.model not in UNDISTORTABLE:
            camera_distortion(cam)  # raises with the model name
        if distortion == "error" and not camera_distortion(cam).is_zero:
            raise SceneFormatError(
                f"{folder}: camera {cam.id} is {cam.model} with non-zero distortion "
                f"{camera_distortion(cam)}; "
                "pass distortion='undistort' to resample the images onto a pinhole camera, or "
                "distortion='ignore' to treat it as a pinhole"
            )
    width, height = sizes.pop()

    names = [im.name for im in images]
    img_folder, factor = _pick_image_folder(folder, names, width / downscale, downscale, image_dir)
    keep = keep_existing([img_folder / n for n in names], img_folder)
    images = [images[i] for i in keep]
    batch = load_images([img_folder / im.name for im in images], downscale=factor, background=background)

    w2c = torch.stack([colmap_to_w2c(torch.from_numpy(im.qvec), torch.from_numpy(im.tvec)) for im in images])
    pinholes = torch.tensor([camera_pinhole(model.cameras[im.camera_id]) for im in images], dtype=torch.float64)
    K = intrinsics_matrix(pinholes[:, 0], pinholes[:, 1], pinholes[:, 2], pinholes[:, 3])
    cameras = cameras_for_images(w2c, K, (width, height), batch)

    rgb, alpha = batch.rgb, batch.alpha
    dists = [camera_distortion(model.cameras[im.camera_id]) for im in images]
    distorted = any(not d.is_zero for d in dists)
    undistorted = distortion == "undistort" and distorted
    if undistorted:
        rgb = undistort_images(rgb, cameras.K, dists).clamp(0, 1)
        if alpha is not None:
            alpha = undistort_images(alpha, cameras.K, dists).clamp(0, 1)

    points = colors = None
    if model.points is not None and len(model.points.ids):
        points = torch.from_numpy(model.points.xyz).float()
        colors = torch.from_numpy(model.points.rgb.astype(np.float32) / 255.0)
    return Scene(
        images=rgb,
        cameras=cameras,
        split=holdout_split(len(images), test_every),
        background=background_tensor(background),
        points=points,
        point_colors=colors,
        alphas=alpha,
        name=name,
        source=folder,
        metadata={
            "format": "colmap",
            "model_folder": str(folder),
            "image_folder": str(img_folder),
            "camera_models": sorted({c.model for c in used.values()}),
            "distortion": ("undistorted" if undistorted else "ignored") if distorted else "none",
            "image_paths": [str(img_folder / im.name) for im in images],
        },
    )

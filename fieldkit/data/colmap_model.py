"""COLMAP sparse models: read and write ``cameras``, ``images``, ``points3D`` (text and binary).

Binary files are little-endian (colmap.github.io/format.html). Point tracks are not
kept: readers skip them and writers write empty tracks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SceneFormatError

# model name -> (binary id, number of parameters)
CAMERA_MODELS: dict[str, tuple[int, int]] = {
    "SIMPLE_PINHOLE": (0, 3),
    "PINHOLE": (1, 4),
    "SIMPLE_RADIAL": (2, 4),
    "RADIAL": (3, 5),
    "OPENCV": (4, 8),
    "OPENCV_FISHEYE": (5, 8),
    "FULL_OPENCV": (6, 12),
    "FOV": (7, 5),
    "SIMPLE_RADIAL_FISHEYE": (8, 4),
    "RADIAL_FISHEYE": (9, 5),
    "THIN_PRISM_FISHEYE": (10, 12),
    "RAD_TAN_THIN_PRISM_FISHEYE": (11, 16),
}
MODEL_BY_ID = {model_id: name for name, (model_id, _) in CAMERA_MODELS.items()}


@dataclass
class ColmapCamera:
    id: int
    model: str
    width: int
    height: int
    params: np.ndarray  # float64


@dataclass
class ColmapImage:
    id: int
    qvec: np.ndarray  # (w, x, y, z) world-to-camera
    tvec: np.ndarray
    camera_id: int
    name: str
    xys: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point3d_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))


@dataclass
class ColmapPoints:
    ids: np.ndarray  # [P] int64
    xyz: np.ndarray  # [P,3] float64
    rgb: np.ndarray  # [P,3] uint8
    error: np.ndarray  # [P] float64


@dataclass
class ColmapModel:
    cameras: dict[int, ColmapCamera]
    images: dict[int, ColmapImage]
    points: ColmapPoints | None
    folder: Path | None = None


# ---------------------------------------------------------------- helpers


def model_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem.bin`` or ``folder/stem.txt``, binary first; None if neither exists."""
    for suffix in (".bin", ".txt"):
        path = Path(folder) / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _data_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of every line, comments blanked."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SceneFormatError(f"{path}: cannot read file ({exc})") from exc
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        out.append((n, "" if line.startswith("#") else line))
    return out


def _floats(fields: list[str], path: Path, lineno: int) -> np.ndarray:
    try:
        return np.array([float(v) for v in fields], dtype=np.float64)
    except ValueError as exc:
        raise SceneFormatError(f"{path}:{lineno}: expected numbers ({exc})") from exc


def _int(value: str, path: Path, lineno: int) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise SceneFormatError(f"{path}:{lineno}: expected an integer, got {value!r}") from exc


class _Reader:
    """Little-endian cursor over a binary file that names the file on truncation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data = path.read_bytes()
        except OSError as exc:
            raise SceneFormatError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
        self.pos = 0

    def read(self, fmt: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise SceneFormatError(f"{self.path}: truncated binary file (needed {size} bytes at offset {self.pos})")
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return values

    def read_string(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise SceneFormatError(f"{self.path}: truncated binary file (unterminated image name)")
        text = self.data[self.pos : end].decode("utf-8")
        self.pos = end + 1
        return text

    def skip(self, nbytes: int) -> None:
        if self.pos + nbytes > len(self.data):
            raise SceneFormatError(f"{self.path}: truncated binary file")
        self.pos += nbytes

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise SceneFormatError(f"{self.path}: {len(self.data) - self.pos} unexpected trailing bytes")


# ---------------------------------------------------------------- cameras


def read_cameras(path: Path) -> dict[int, ColmapCamera]:
    """cameras.txt or cameras.bin -> {camera_id: ColmapCamera}."""
    path = Path(path)
    cameras: dict[int, ColmapCamera] = {}
    if path.suffix == ".bin":
        r = _Reader(path)
        (count,) = r.read("Q")
        for _ in range(count):
            cam_id, model_id, width, height = r.read("iiQQ")
            if model_id not in MODEL_BY_ID:
                raise SceneFormatError(f"{path}: camera {cam_id} has unknown model id {model_id}")
            model = MODEL_BY_ID[model_id]
            n = CAMERA_MODELS[model][1]
            cameras[cam_id] = ColmapCamera(cam_id, model, width, height, np.array(r.read("d" * n)))
        r.finish()
        return cameras
    for lineno, line in _data_lines(path):
        if not line:
            continue
        fields = line.split()
        if len(fields) < 4:
            raise SceneFormatError(f"{path}:{lineno}: expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]")
        model = fields[1]
        if model not in CAMERA_MODELS:
            raise SceneFormatError(f"{path}:{lineno}: unknown camera model {model!r}")
        params = _floats(fields[4:], path, lineno)
        if len(params) != CAMERA_MODELS[model][1]:
            raise SceneFormatError(
                f"{path}:{lineno}: {model} takes {CAMERA_MODELS[model][1]} parameters, got {len(params)}"
            )
        cam_id = _int(fields[0], path, lineno)
        cameras[cam_id] = ColmapCamera(
            cam_id, model, _int(fields[2], path, lineno), _int(fields[3], path, lineno), params
        )
    return cameras


def write_cameras(cameras: dict[int, ColmapCamera], path: Path) -> None:
    """Write cameras.txt or cameras.bin (chosen by suffix)."""
    path = Path(path)
    if path.suffix == ".bin":
        chunks = [struct.pack("<Q", len(cameras))]
        for cam in cameras.values():
            chunks.append(struct.pack("<iiQQ", cam.id, CAMERA_MODELS[cam.model][0], cam.width, cam.height))
            chunks.append(struct.pack("<" + "d" * len(cam.params), *cam.params))
        path.write_bytes(b"".join(chunks))
        return
    lines = ["# CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"]
    for cam in cameras.values():
        params = " ".join(repr(float(p)) for p in cam.params)
        lines.append(f"{cam.id} {cam.model} {cam.width} {cam.height} {params}")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- images


def read_images(path: Path) -> dict[int, ColmapImage]:
    """images.txt or images.bin -> {image_id: ColmapImage}."""
    path = Path(path)
    images: dict[int, ColmapImage] = {}
    if path.suffix == ".bin":
        r = _Reader(path)
        (count,) = r.read("Q")
        for _ in range(count):
            (image_id,) = r.read("i")
            q = np.array(r.read("dddd"))
            t = np.array(r.read("ddd"))
            (cam_id,) = r.read("i")
            name = r.read_string()
            (n_points,) = r.read("Q")
            raw = r.data[r.pos : r.pos + 24 * n_points]
            r.skip(24 * n_points)
            rec = np.frombuffer(raw, dtype=np.dtype([("xy", "<f8", 2), ("id", "<i8")]))
            images[image_id] = ColmapImage(image_id, q, t, cam_id, name, rec["xy"].copy(), rec["id"].copy())
        r.finish()
        return images
    lines = _data_lines(path)
    i = 0
    while i < len(lines):
        lineno, line = lines[i]
        i += 1
        if not line:
            continue
        fields = line.split()
        if len(fields) < 10:
            raise SceneFormatError(
                f"{path}:{lineno}: expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, got {len(fields)} fields"
            )
        values = _floats(fields[1:8], path, lineno)
        # the next line holds the 2D points (possibly empty); it is read positionally
        pts_line = lines[i][1] if i < len(lines) else ""
        pts_lineno = lines[i][0] if i < len(lines) else lineno + 1
        i += 1
        pts = _floats(pts_line.split(), path, pts_lineno) if pts_line else np.zeros(0)
        if len(pts) % 3:
            raise SceneFormatError(f"{path}:{pts_lineno}: POINTS2D must be triples (X, Y, POINT3D_ID)")
        pts = pts.reshape(-1, 3)
        image_id = _int(fields[0], path, lineno)
        images[image_id] = ColmapImage(
            image_id,
            values[:4],
            values[4:7],
            _int(fields[8], path, lineno),
            " ".join(fields[9:]),
            pts[:, :2].copy(),
            pts[:, 2].astype(np.int64),
        )
    return images


def write_images(images: dict[int, ColmapImage], path: Path) -> None:
    """Write images.txt or images.bin (chosen by suffix)."""
    path = Path(path)
    if path.suffix == ".bin":
        chunks = [struct.pack("<Q", len(images))]
        for im in images.values():
            chunks.append(struct.pack("<i4d3di", im.id, *im.qvec, *im.tvec, im.camera_id))
            chunks.append(im.name.encode("utf-8") + b"\x00")
            chunks.append(struct.pack("<Q", len(im.xys)))
            rec = np.zeros(len(im.xys), dtype=np.dtype([("xy", "<f8", 2), ("id", "<i8")]))
            rec["xy"], rec["id"] = im.xys, im.point3d_ids
            chunks.append(rec.tobytes())
        path.write_bytes(b"".join(chunks))
        return
    lines = ["# IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME", "# POINTS2D[] as (X, Y, POINT3D_ID)"]
    for im in images.values():
        pose = " ".join(repr(float(v)) for v in (*im.qvec, *im.tvec))
        lines.append(f"{im.id} {pose} {im.camera_id} {im.name}")
        lines.append(" ".join(f"{x!r} {y!r} {int(p)}" for (x, y), p in zip(im.xys.tolist(), im.point3d_ids)))
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- points


def read_points3d(path: Path) -> ColmapPoints:
    """points3D.txt or points3D.bin -> ColmapPoints (tracks skipped)."""
    path = Path(path)
    ids, xyz, rgb, err = [], [], [], []
    if path.suffix == ".bin":
        r = _Reader(path)
        (count,) = r.read("Q")
        for _ in range(count):
            pid, x, y, z, cr, cg, cb, e, track_len = r.read("Q3d3BdQ")
            r.skip(8 * track_len)
            ids.append(pid)
            xyz.append((x, y, z))
            rgb.append((cr, cg, cb))
            err.append(e)
        r.finish()
    else:
        for lineno, line in _data_lines(path):
            if not line:
                continue
            fields = line.split()
            if len(fields) < 8 or (len(fields) - 8) % 2:
                raise SceneFormatError(
                    f"{path}:{lineno}: expected POINT3D_ID X Y Z R G B ERROR TRACK[] (pairs), got {len(fields)} fields"
                )
            values = _floats(fields[1:8], path, lineno)
            ids.append(_int(fields[0], path, lineno))
            xyz.append(values[:3])
            rgb.append(values[3:6])
            err.append(values[6])
    return ColmapPoints(
        ids=np.asarray(ids, dtype=np.int64).reshape(-1),
        xyz=np.asarray(xyz, dtype=np.float64).reshape(-1, 3),
        rgb=np.asarray(rgb, dtype=np.float64).reshape(-1, 3).clip(0, 255).round().astype(np.uint8),
        error=np.asarray(err, dtype=np.float64).reshape(-1),
    )


def write_points3d(points: ColmapPoints, path: Path) -> None:
    """Write points3D.txt or points3D.bin (chosen by suffix), with empty tracks."""
    path = Path(path)
    if path.suffix == ".bin":
        rec = np.zeros(
            len(points.ids),
            dtype=np.dtype([("id", "<u8"), ("xyz", "<f8", 3), ("rgb", "u1", 3), ("err", "<f8"), ("n", "<u8")]),
        )
        rec["id"], rec["xyz"], rec["rgb"], rec["err"] = points.ids, points.xyz, points.rgb, points.error
        path.write_bytes(struct.pack("<Q", len(rec)) + rec.tobytes())
        return
    lines = ["# POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)"]
    for pid, (x, y, z), (cr, cg, cb), e in zip(points.ids, points.xyz.tolist(), points.rgb.tolist(), points.error):
        lines.append(f"{pid} {x!r} {y!r} {z!r} {cr} {cg} {cb} {float(e)!r}")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- whole model


def is_complete_model(folder: Path) -> bool:
    """True when ``folder`` holds cameras and images (points optional)."""
    return model_file(folder, "cameras") is not None and model_file(folder, "images") is not None


def read_model(folder: Path) -> ColmapModel:
    """Read cameras + images (required) and points3D (optional) from one folder, binary first."""
    folder = Path(folder)
    cam_file = model_file(folder, "cameras")
    img_file = model_file(folder, "images")
    missing = [n for n, f in (("cameras", cam_file), ("images", img_file)) if f is None]
    if missing:
        wanted = ", ".join(f"{m}.bin/.txt" for m in missing)
        raise SceneFormatError(f"{folder}: incomplete COLMAP model, missing {wanted}")
    assert cam_file is not None and img_file is not None
    pts_file = model_file(folder, "points3D")
    return ColmapModel(
        cameras=read_cameras(cam_file),
        images=read_images(img_file),
        points=read_points3d(pts_file) if pts_file is not None else None,
        folder=folder,
    )


def write_model(model: ColmapModel, folder: Path, binary: bool = True) -> None:
    """Write a model as .bin (default) or .txt files into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".bin" if binary else ".txt"
    write_cameras(model.cameras, folder / f"cameras{ext}")
    write_images(model.images, folder / f"images{ext}")
    if model.points is not None:
        write_points3d(model.points, folder / f"points3D{ext}")

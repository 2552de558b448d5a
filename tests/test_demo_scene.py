"""Checks on the shipped demo scene (scenes/demo) and its generator (scenes/make_demo.py)."""

from __future__ import annotations

import colorsys
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = REPO_ROOT / "scenes" / "demo"
GENERATOR = REPO_ROOT / "scenes" / "make_demo.py"


def _load_generator() -> ModuleType:
    """Import scenes/make_demo.py by path (scenes/ is not a package)."""
    spec = importlib.util.spec_from_file_location("fieldkit_make_demo", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return _load_generator()


def _meta(split: str) -> dict:
    return json.loads((DEMO / f"transforms_{split}.json").read_text())


def _rgba(frame: dict) -> np.ndarray:
    return np.asarray(Image.open(DEMO / (frame["file_path"] + ".png")))


def _project(c2w_gl: np.ndarray, point: np.ndarray, width: int, angle_x: float) -> tuple[float, float, float]:
    """Pinhole projection of a world point with an OpenGL camera-to-world: (u, v, depth)."""
    c2w_cv = c2w_gl @ np.diag([1.0, -1.0, -1.0, 1.0])  # -> OpenCV axes (+y down, +z forward)
    w2c = np.linalg.inv(c2w_cv)
    x, y, z = (w2c @ np.append(point, 1.0))[:3]
    f = 0.5 * width / math.tan(0.5 * angle_x)
    return f * x / z + 0.5 * width, f * y / z + 0.5 * width, z


def _hue_deg(rgb: np.ndarray) -> float:
    return 360.0 * colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=float) / 255.0))[0]


def _hue_dist(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def test_committed_files(gen: ModuleType) -> None:
    counts = {"train": 60, "test": 20}
    for split, n in counts.items():
        meta = _meta(split)
        assert meta["camera_angle_x"] == pytest.approx(gen.CAMERA_ANGLE_X)
        assert len(meta["frames"]) == n
        for k, frame in enumerate(meta["frames"]):
            assert frame["file_path"] == f"./{split}/r_{k}"  # no extension, Blender style
            assert np.asarray(frame["transform_matrix"]).shape == (4, 4)
            with Image.open(DEMO / (frame["file_path"] + ".png")) as im:
                assert im.format == "PNG" and im.mode == "RGBA" and im.size == (128, 128)
        assert len(list((DEMO / split).glob("r_*.png"))) == n
    for frame in _meta("val")["frames"]:
        assert (DEMO / (frame["file_path"] + ".png")).is_file()
    assert (DEMO / "README.md").is_file()
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 5 * 1024 * 1024


def test_poses_are_rigid_on_sphere_and_interleaved(gen: ModuleType) -> None:
    azimuths = {}
    for split in ("train", "test"):
        c2w = np.array([f["transform_matrix"] for f in _meta(split)["frames"]])
        rot = c2w[:, :3, :3]
        np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-9)
        np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-9)
        pos = c2w[:, :3, 3]
        np.testing.assert_allclose(np.linalg.norm(pos, axis=1), gen.CAMERA_RADIUS, rtol=1e-9)
        assert (pos[:, 2] > 0).all()  # upper hemisphere
        # Looking at the origin: camera -Z points from the camera to the origin.
        np.testing.assert_allclose(-rot[:, :, 2], -pos / gen.CAMERA_RADIUS, atol=1e-9)
        azimuths[split] = np.sort(np.arctan2(pos[:, 1], pos[:, 0]))
    # Test views interleave with train views: every test azimuth has a train view nearby.
    gaps = np.abs(azimuths["test"][:, None] - azimuths["train"][None, :])
    gaps = np.minimum(gaps, 2 * np.pi - gaps).min(axis=1)
    assert gaps.max() < np.radians(15.0)
    assert np.ptp(azimuths["test"]) > np.radians(300.0)


def test_probe_sphere_projects_where_the_json_says(gen: ModuleType) -> None:
    """Project the red probe sphere with the JSON poses; the image must agree."""
    centre = np.asarray(gen.PROBE_CENTER)
    probe_hue = _hue_deg(255 * np.asarray(gen.PROBE_COLOR))
    checked = 0
    for split in ("train", "test"):
        meta = _meta(split)
        for frame in meta["frames"][::3]:
            img = _rgba(frame)
            w = img.shape[1]
            c2w = np.asarray(frame["transform_matrix"])
            u, v, depth = _project(c2w, centre, w, meta["camera_angle_x"])
            assert depth > 0
            # The world origin (look-at target) lands on the image centre.
            u0, v0, _ = _project(c2w, np.zeros(3), w, meta["camera_angle_x"])
            assert (u0, v0) == pytest.approx((w / 2, w / 2), abs=1e-6)
            r_px = 0.5 * w / math.tan(0.5 * meta["camera_angle_x"]) * gen.PROBE_RADIUS / depth
            assert r_px > 5
            # Points well inside the silhouette (centre, left/right/up/down): opaque, probe hue.
            offsets = [(0.0, 0.0), (-0.6, 0.0), (0.6, 0.0), (0.0, -0.6), (0.0, 0.6)]
            for du, dv in offsets:
                px = img[int(math.floor(v + dv * r_px)), int(math.floor(u + du * r_px))]
                assert px[3] == 255, (frame["file_path"], du, dv, px)
                assert _hue_dist(_hue_deg(px[:3]), probe_hue) < 8.0, (frame["file_path"], du, dv, px)
            # Just outside the silhouette (nothing else in the scene is red; below is the
            # purple pedestal, above and beside are floor, other objects or background).
            for du, dv in [(-1.3, 0.0), (1.3, 0.0), (0.0, -1.3), (0.0, 1.3)]:
                px = img[int(math.floor(v + dv * r_px)), int(math.floor(u + du * r_px))]
                saturated = int(px[:3].max()) - int(px[:3].min()) > 60
                assert px[3] < 255 or not saturated or _hue_dist(_hue_deg(px[:3]), probe_hue) > 20.0, (
                    frame["file_path"], du, dv, px)
            checked += 1
    assert checked >= 20


def test_off_axis_spheres_project_where_the_json_says(gen: ModuleType) -> None:
    """The probe sits on the optical axis' column, so also check off-axis spheres.

    They can be hidden behind other objects in some views, so ask for a large majority;
    a mirrored (wrong-handed) projection gets only a few right by chance.
    """
    for sphere in gen.SPHERES[1:]:
        hue = _hue_deg(255 * np.asarray(sphere.color))
        good = total = 0
        for split in ("train", "test"):
            meta = _meta(split)
            for frame in meta["frames"]:
                img = _rgba(frame)
                u, v, _ = _project(np.asarray(frame["transform_matrix"]), np.asarray(sphere.center),
                                   img.shape[1], meta["camera_angle_x"])
                px = img[int(math.floor(v)), int(math.floor(u))]
                good += bool(px[3] == 255 and _hue_dist(_hue_deg(px[:3]), hue) < 8.0)
                total += 1
        assert good / total > 0.7, (sphere.name, good, total)


def test_floor_corners_bound_the_silhouette(gen: ModuleType) -> None:
    """The opaque region's left/right/bottom extents are those of the projected floor square.

    This pins the focal length (camera_angle_x) to the images: a 5% error in the field of
    view moves these extents by about 3 px.
    """
    half = gen.FLOOR_HALF
    corners = [np.array([sx * half, sy * half, 0.0]) for sx in (-1, 1) for sy in (-1, 1)]
    for split in ("train", "test"):
        meta = _meta(split)
        for frame in meta["frames"]:
            img = _rgba(frame)
            c2w = np.asarray(frame["transform_matrix"])
            uv = np.array([_project(c2w, c, img.shape[1], meta["camera_angle_x"])[:2] for c in corners])
            cols = np.flatnonzero((img[..., 3] > 0).any(axis=0))
            rows = np.flatnonzero((img[..., 3] > 0).any(axis=1))
            # Opaque column j covers the continuous interval [j, j + 1].
            assert cols[0] == pytest.approx(uv[:, 0].min(), abs=1.0), frame["file_path"]
            assert cols[-1] + 1 == pytest.approx(uv[:, 0].max(), abs=1.0), frame["file_path"]
            assert rows[-1] + 1 == pytest.approx(uv[:, 1].max(), abs=1.0), frame["file_path"]


def test_corner_rays_miss_everything() -> None:
    """Corner rays look > 26 deg off-axis; from radius 4 that misses the r=1.5 bounding sphere."""
    for split in ("train", "test"):
        for frame in _meta(split)["frames"]:
            img = _rgba(frame)
            for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
                assert tuple(img[i, j]) == (0, 0, 0, 0), (frame["file_path"], i, j)
            assert img[..., 3].max() == 255 and (img[..., 3] == 0).any()


def test_scene_fits_bounding_sphere(gen: ModuleType) -> None:
    for s in gen.SPHERES:
        assert np.linalg.norm(s.center) + s.radius < 1.5
    for b in gen.BOXES:
        assert np.linalg.norm(b.center) + np.linalg.norm(b.half) < 1.5
    assert math.sqrt(2) * gen.FLOOR_HALF < 1.5


def test_straight_alpha_reproduces_supersampled_render(gen: ModuleType) -> None:
    """Compositing stored RGB*a + bg*(1-a) equals the supersampled premultiplied render."""
    train, _ = gen.camera_poses(4, 2)
    premult, alpha = gen.render_view(train[1], 48)
    rgba = gen.encode_rgba(premult, alpha).astype(float) / 255.0
    assert 0.0 < alpha.mean() < 1.0
    fractional = (alpha > 0) & (alpha < 1)
    assert fractional.sum() > 20  # anti-aliased edges exist
    np.testing.assert_allclose(rgba[..., 3], alpha, atol=0.5 / 255 + 1e-9)
    for bg in (np.zeros(3), np.ones(3), np.array([0.1, 0.9, 0.3])):
        expected = premult + bg * (1.0 - alpha[..., None])
        got = rgba[..., :3] * rgba[..., 3:] + bg * (1.0 - rgba[..., 3:])
        np.testing.assert_allclose(got, expected, atol=1.2 / 255)
    # A pixel ray through the centre sub-sample convention: an unsupersampled render of
    # a pixel equals the trace of the ray with direction ((u-cx)/f, -(v-cy)/f, -1).
    o, d = gen.pixel_rays(train[1], 48, gen.CAMERA_ANGLE_X, 1)
    f = 0.5 * 48 / math.tan(0.5 * gen.CAMERA_ANGLE_X)
    i, j = 10, 37
    d_cam = np.array([(j + 0.5 - 24) / f, -(i + 0.5 - 24) / f, -1.0])
    d_world = train[1][:3, :3] @ d_cam
    np.testing.assert_allclose(d[i, j, 0], d_world / np.linalg.norm(d_world), atol=1e-12)


def test_generator_is_deterministic_and_fast(gen: ModuleType, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        start = time.perf_counter()
        gen.main(["--out", str(out), "--size", "32", "--train", "4", "--test", "2"])
        assert time.perf_counter() - start < 10.0
        runs.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert runs[0] == runs[1]
    assert sum(k.startswith("train/") for k in runs[0]) == 4
    assert sum(k.startswith("test/") for k in runs[0]) == 2
    assert len(json.loads(runs[0]["transforms_train.json"])["frames"]) == 4
    with Image.open(tmp_path / "a" / "test" / "r_1.png") as im:
        assert im.size == (32, 32) and im.mode == "RGBA"

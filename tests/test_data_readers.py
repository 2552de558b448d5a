"""Scene readers on the real data (lego_200, fern) and on small synthetic folders."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_path
from fieldkit.cameras import Cameras, colmap_to_w2c, opengl_c2w_to_opencv_w2c
from fieldkit.data import (
    Scene,
    SceneFormatError,
    detect_format,
    load_blender,
    load_colmap,
    load_llff,
    load_nerfstudio,
    load_scene,
)
from fieldkit.data.colmap import find_model_folder
from fieldkit.data.colmap_model import read_cameras, read_model, read_points3d, write_model
from fieldkit.data.llff import read_poses_bounds
from fieldkit.data.undistort import Distortion, undistort_images

# ------------------------------------------------------------------ helpers


def project(cameras: Cameras, points: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, z) [C,P] of world points through every camera (pixel-centre convention of cameras.py)."""
    w2c = cameras.world_to_cam.double().numpy()
    xc = np.einsum("cij,pj->cpi", w2c[:, :3, :3], points.double().numpy()) + w2c[:, None, :3, 3]
    K = cameras.K.double().numpy()
    z = xc[..., 2]
    u = K[:, None, 0, 0] * xc[..., 0] / z + K[:, None, 0, 2]
    v = K[:, None, 1, 1] * xc[..., 1] / z + K[:, None, 1, 2]
    return u, v, z


def _inside(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    assert scene.points is not None
    u, v, z = project(scene.cameras, scene.points)
    inside = (z > 0) & (u >= 0) & (u < scene.cameras.width) & (v >= 0) & (v < scene.cameras.height)
    return u, v, inside


def inside_fraction(scene: Scene) -> float:
    return float(_inside(scene)[2].mean())


def colour_error(scene: Scene, shuffle: bool = False) -> float:
    """Mean |point colour - pixel colour| (0..255) over projections that land inside."""
    assert scene.point_colors is not None
    u, v, inside = _inside(scene)
    cam, pt = inside.nonzero()
    pixels = scene.images.numpy()[cam, v[inside].astype(int), u[inside].astype(int)]
    colors = scene.point_colors.numpy()
    if shuffle:
        colors = colors[np.random.default_rng(0).permutation(len(colors))]
    return float(np.abs(pixels - colors[pt]).mean() * 255)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def ramp_image(w: int, h: int, seed: int, alpha: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 4 if alpha else 3), dtype=np.uint8)


# ------------------------------------------------------------------ lego_200 (Blender)


@pytest.fixture(scope="module")
def lego() -> Scene:
    return load_blender(shared_path("lego_200"))


def test_lego_splits_size_focal(lego: Scene) -> None:
    assert {k: len(v) for k, v in lego.split.items()} == {"train": 100, "val": 10, "test": 25}
    assert lego.images.shape == (135, 200, 200, 3) and lego.images.dtype == torch.float32
    assert (lego.cameras.width, lego.cameras.height) == (200, 200)
    assert torch.allclose(lego.cameras.K[:, 0, 0], torch.tensor(277.778), atol=1e-3)
    assert torch.allclose(lego.cameras.K[:, 1, 1], torch.tensor(277.778), atol=1e-3)
    assert torch.allclose(lego.cameras.K[:, :2, 2], torch.tensor(100.0))
    assert lego.cameras.world_to_cam.dtype == torch.float32
    assert detect_format(shared_path("lego_200")) == "blender"


def test_lego_cameras_on_sphere_looking_at_origin(lego: Scene) -> None:
    radius = lego.cameras.centers.norm(dim=-1)
    assert torch.allclose(radius, torch.tensor(4.031), atol=1e-3)
    # OpenCV axes: the origin is in front of every camera and near the image centre
    u, v, z = project(lego.cameras, torch.zeros(1, 3))
    assert (z > 0).all()
    assert (np.abs(u - 100) < 20).all() and (np.abs(v - 100) < 20).all()
    # world +z (Blender up) projects upwards in the image (smaller v) for every camera
    _, v_up, _ = project(lego.cameras, torch.tensor([[0.0, 0.0, 0.5]]))
    assert (v_up < v).all()
    centers = lego.cameras.centers[lego.split["train"]].double()
    expected = 1.1 * (centers - centers.mean(0)).norm(dim=-1).max().item()
    assert lego.scene_extent == pytest.approx(expected)
    assert torch.equal(lego.bounds, torch.tensor([[-1.5] * 3, [1.5] * 3]))


def test_lego_composited_on_background(lego: Scene) -> None:
    assert lego.alphas is not None and lego.alphas.shape == (135, 200, 200, 1)
    assert (lego.images[:, 0, 0] == 1.0).all()  # transparent corner on white
    assert torch.equal(lego.background, torch.ones(3))
    black = load_blender(shared_path("lego_200"), background=(0, 0, 0), splits=("val",))
    assert (black.images[:, 0, 0] == 0.0).all()
    # where alpha == 1 the background does not matter
    white_val = lego.images[lego.split["val"]]
    opaque = (black.alphas == 1.0).expand_as(black.images)
    assert opaque.any()
    assert torch.allclose(white_val[opaque], black.images[opaque])
    raw = np.asarray(Image.open(shared_path("lego_200", "val", "r_0.png")), dtype=np.float32) / 255
    expected = raw[..., :3] * raw[..., 3:] + (1 - raw[..., 3:])
    assert np.allclose(white_val[0].numpy(), expected, atol=1e-6)


def test_lego_downscale_box_filter(lego: Scene) -> None:
    half = load_blender(shared_path("lego_200"), downscale=2, splits=("val",))
    assert half.images.shape == (10, 100, 100, 3)
    assert torch.allclose(half.cameras.K[:, 0, 0], torch.tensor(138.8889), atol=1e-3)
    assert torch.allclose(half.cameras.K[:, :2, 2], torch.tensor(50.0))
    full = lego.images[lego.split["val"]]
    box = full.reshape(10, 100, 2, 100, 2, 3).mean(dim=(2, 4))
    assert torch.allclose(half.images, box, atol=1e-6)
    assert torch.allclose(half.cameras.world_to_cam, lego.cameras.world_to_cam[lego.split["val"]])


# ------------------------------------------------------------------ fern (COLMAP text, LLFF, binary)


@pytest.fixture(scope="module")
def fern_colmap() -> Scene:
    return load_colmap(shared_path("fern"))


@pytest.fixture(scope="module")
def fern_colmap_ignored() -> Scene:
    return load_colmap(shared_path("fern"), distortion="ignore")


@pytest.fixture(scope="module")
def fern_llff() -> Scene:
    return load_llff(shared_path("fern"))


def test_fern_colmap_text_model(fern_colmap: Scene) -> None:
    scene = fern_colmap
    assert find_model_folder(shared_path("fern")) == shared_path("fern", "colmap_text")
    assert scene.images.shape == (20, 378, 504, 3)
    assert torch.allclose(scene.cameras.K[:, 0, 0], torch.tensor(407.5658), atol=1e-3)
    assert torch.allclose(scene.cameras.K[:, :2, 2], torch.tensor([252.0, 189.0]))
    assert scene.split["test"].tolist() == [0, 8, 16] and len(scene.split["train"]) == 17
    assert scene.points is not None and scene.points.shape == (10091, 3)
    assert scene.metadata["distortion"] == "undistorted"
    assert inside_fraction(scene) >= 0.9
    box = scene.bounds
    assert (box[0] < box[1]).all()
    inside_box = ((scene.points >= box[0]) & (scene.points <= box[1])).all(-1).double().mean()
    assert 0.9 < inside_box < 1.0


def test_fern_undistortion_improves_colour_agreement(fern_colmap: Scene, fern_colmap_ignored: Scene) -> None:
    undistorted = colour_error(fern_colmap)
    ignored = colour_error(fern_colmap_ignored)
    shuffled = colour_error(fern_colmap, shuffle=True)
    assert undistorted < ignored < 0.75 * shuffled
    assert undistorted < 40


def test_fern_distortion_options(fern_colmap_ignored: Scene) -> None:
    with pytest.raises(SceneFormatError, match="SIMPLE_RADIAL.*distortion='undistort'"):
        load_colmap(shared_path("fern"), distortion="error")
    raw = np.asarray(Image.open(shared_path("fern", "images_8", "image000.png")), dtype=np.float32) / 255
    assert np.allclose(fern_colmap_ignored.images[0].numpy(), raw)
    assert fern_colmap_ignored.metadata["distortion"] == "ignored"


def test_fern_llff_matches_colmap(fern_llff: Scene, fern_colmap: Scene) -> None:
    # float64 conversions agree to 1e-6, the float32 scenes to float precision
    w2c_llff, hwf, near_far = read_poses_bounds(shared_path("fern", "poses_bounds.npy"))
    model = read_model(shared_path("fern", "colmap_text"))
    ims = sorted(model.images.values(), key=lambda im: im.name)
    w2c_colmap = torch.stack([colmap_to_w2c(torch.from_numpy(i.qvec), torch.from_numpy(i.tvec)) for i in ims])
    c_llff = Cameras(w2c_llff, torch.eye(3, dtype=torch.float64), 4032, 3024).centers
    c_colmap = Cameras(w2c_colmap, torch.eye(3, dtype=torch.float64), 504, 378).centers
    assert torch.allclose(c_llff, c_colmap, atol=1e-6, rtol=0)
    assert torch.allclose(w2c_llff, w2c_colmap, atol=1e-6, rtol=0)
    assert torch.allclose(fern_llff.cameras.centers, fern_colmap.cameras.centers, atol=1e-4, rtol=0)
    assert torch.allclose(fern_llff.cameras.K, fern_colmap.cameras.K)
    assert hwf[0].tolist() == pytest.approx([3024, 4032, 3260.526], abs=1e-3)
    assert fern_llff.near_far is not None and fern_llff.near_far.shape == (20, 2)
    assert 16.9 < fern_llff.near_far[:, 0].min() and fern_llff.near_far[:, 0].max() < 19.0
    assert 65.0 < fern_llff.near_far[:, 1].min() and fern_llff.near_far[:, 1].max() < 80.01
    assert fern_llff.split["test"].tolist() == [0, 8, 16]
    assert fern_llff.points is not None and len(fern_llff.points) == 10091
    assert inside_fraction(fern_llff) >= 0.9


def test_fern_detect_and_downscale() -> None:
    fern = shared_path("fern")
    assert detect_format(fern) == "colmap"
    assert detect_format(fern / "poses_bounds.npy") == "llff"
    half = load_scene(fern, downscale=2, distortion="ignore")
    assert half.images.shape == (20, 189, 252, 3)
    assert torch.allclose(half.cameras.K[0, 0, 0], torch.tensor(407.5658 / 2), atol=1e-3)
    assert torch.allclose(half.cameras.K[0, :2, 2], torch.tensor([126.0, 94.5]))
    llff8 = load_llff(fern, downscale=8)  # picks images_8 without further reduction
    assert llff8.images.shape == (20, 378, 504, 3)


def test_fern_binary_cameras_and_points() -> None:
    cams = read_cameras(shared_path("fern", "sparse", "0", "cameras.bin"))
    assert len(cams) == 1
    cam = next(iter(cams.values()))
    assert (cam.model, cam.width, cam.height) == ("SIMPLE_RADIAL", 4032, 3024)
    assert cam.params[0] == pytest.approx(3260.526, abs=1e-3)
    assert cam.params[1:3].tolist() == [2016.0, 1512.0]
    assert cam.params[3] == pytest.approx(0.019750, abs=1e-6)
    text_cam = next(iter(read_cameras(shared_path("fern", "colmap_text", "cameras.txt")).values()))
    assert np.allclose(text_cam.params[:3] * 8, cam.params[:3], atol=1e-6)

    binary = read_points3d(shared_path("fern", "sparse", "0", "points3D.bin"))
    text = read_points3d(shared_path("fern", "colmap_text", "points3D.txt"))
    assert len(binary.ids) == 10091
    order_b, order_t = np.argsort(binary.ids), np.argsort(text.ids)
    assert np.array_equal(binary.ids[order_b], text.ids[order_t])
    assert np.allclose(binary.xyz[order_b], text.xyz[order_t], rtol=1e-12, atol=1e-12)
    assert np.array_equal(binary.rgb[order_b], text.rgb[order_t])
    assert np.allclose(binary.error[order_b], text.error[order_t], rtol=1e-12)
    # sparse/0 has no images.bin: it is not a complete model
    with pytest.raises(SceneFormatError, match="images"):
        read_model(shared_path("fern", "sparse", "0"))


# ------------------------------------------------------------------ synthetic COLMAP text == binary

CAMERAS_TXT = """# CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]
1 PINHOLE 16 12 20.0 21.0 8.0 6.0
7 SIMPLE_PINHOLE 16 12 18.0 7.5 6.5
"""
IMAGES_TXT = """# IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME
# POINTS2D[] as (X, Y, POINT3D_ID)
5 0.9238795325 0.0 0.3826834324 0.0 0.5 -0.25 3.0 1 b.png
1.5 2.5 11 3.0 4.0 -1

2 1.0 0.0 0.0 0.0 0.0 0.0 4.0 7 a.png

9 0.7071067812 0.0 0.0 0.7071067812 1.0 0.0 5.0 1 c.png
7.25 8.5 12
"""
POINTS_TXT = """# POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)
11 0.1 0.2 0.3 255 0 10 0.5 5 0 9 0
12 -1.0 0.5 2.0 1 2 3 1.25 9 0
13 0.0 0.0 0.0 128 128 128 0.75
"""


def write_colmap_text_scene(root: Path) -> Path:
    model = root / "sparse" / "0"
    model.mkdir(parents=True)
    (model / "cameras.txt").write_text(CAMERAS_TXT)
    (model / "images.txt").write_text(IMAGES_TXT)
    (model / "points3D.txt").write_text(POINTS_TXT)
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        write_png(root / "images" / name, ramp_image(16, 12, seed=i))
    return model


def test_colmap_text_model_values(tmp_path: Path) -> None:
    write_colmap_text_scene(tmp_path)
    assert detect_format(tmp_path) == "colmap"
    scene = load_colmap(tmp_path)
    # sorted by name: a (camera 7), b (camera 1), c (camera 1)
    assert [Path(p).name for p in scene.metadata["image_paths"]] == ["a.png", "b.png", "c.png"]
    assert torch.allclose(scene.cameras.K[0], torch.tensor([[18.0, 0, 7.5], [0, 18.0, 6.5], [0, 0, 1]]))
    assert torch.allclose(scene.cameras.K[1], torch.tensor([[20.0, 0, 8.0], [0, 21.0, 6.0], [0, 0, 1]]))
    # centre = -R^T t
    q = torch.tensor([0.9238795325, 0.0, 0.3826834324, 0.0], dtype=torch.float64)
    t = torch.tensor([0.5, -0.25, 3.0], dtype=torch.float64)
    R = colmap_to_w2c(q, t)[:3, :3]
    assert torch.allclose(scene.cameras.centers[1].double(), -R.T @ t, atol=1e-6)
    assert torch.allclose(scene.cameras.centers[0], torch.tensor([0.0, 0.0, -4.0]))
    assert scene.split["test"].tolist() == [0] and scene.split["train"].tolist() == [1, 2]
    assert scene.points is not None and scene.point_colors is not None
    assert torch.allclose(scene.points[0], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(scene.point_colors[0], torch.tensor([1.0, 0.0, 10 / 255]))
    raw = np.asarray(Image.open(tmp_path / "images" / "b.png"), dtype=np.float32) / 255
    assert np.allclose(scene.images[1].numpy(), raw)
    model = read_model(tmp_path / "sparse" / "0")
    assert model.images[5].xys.tolist() == [[1.5, 2.5], [3.0, 4.0]]
    assert model.images[5].point3d_ids.tolist() == [11, -1]
    assert len(model.images[2].xys) == 0


def test_colmap_binary_equals_text(tmp_path: Path) -> None:
    text_dir = write_colmap_text_scene(tmp_path / "text")
    bin_root = tmp_path / "binary"
    write_model(read_model(text_dir), bin_root / "sparse" / "0", binary=True)
    assert sorted(p.name for p in (bin_root / "sparse" / "0").iterdir()) == ["cameras.bin", "images.bin", "points3D.bin"]
    (bin_root / "images").symlink_to(tmp_path / "text" / "images")
    a, b = read_model(text_dir), read_model(bin_root / "sparse" / "0")
    assert a.cameras.keys() == b.cameras.keys() and a.images.keys() == b.images.keys()
    for k in a.cameras:
        assert (a.cameras[k].model, a.cameras[k].width, a.cameras[k].height) == (b.cameras[k].model, b.cameras[k].width, b.cameras[k].height)
        assert np.array_equal(a.cameras[k].params, b.cameras[k].params)
    for k in a.images:
        assert a.images[k].name == b.images[k].name and a.images[k].camera_id == b.images[k].camera_id
        assert np.array_equal(a.images[k].qvec, b.images[k].qvec) and np.array_equal(a.images[k].tvec, b.images[k].tvec)
        assert np.array_equal(a.images[k].xys, b.images[k].xys)
        assert np.array_equal(a.images[k].point3d_ids, b.images[k].point3d_ids)
    assert a.points is not None and b.points is not None
    for field in ("ids", "xyz", "rgb", "error"):
        assert np.array_equal(getattr(a.points, field), getattr(b.points, field))
    st, sb = load_colmap(tmp_path / "text"), load_colmap(bin_root)
    assert torch.equal(st.cameras.world_to_cam, sb.cameras.world_to_cam)
    assert torch.equal(st.cameras.K, sb.cameras.K)
    assert torch.equal(st.points, sb.points) and torch.equal(st.images, sb.images)
    # a text rewrite reads back the same as well
    write_model(b, tmp_path / "again", binary=False)
    c = read_model(tmp_path / "again")
    assert c.points is not None and np.array_equal(c.points.xyz, a.points.xyz)
    assert all(np.array_equal(c.images[k].qvec, a.images[k].qvec) for k in a.images)


def test_colmap_downscale_folder_and_box(tmp_path: Path) -> None:
    write_colmap_text_scene(tmp_path)
    box = load_colmap(tmp_path, downscale=2)
    assert box.images.shape == (3, 6, 8, 3)
    full = load_colmap(tmp_path)
    assert torch.allclose(box.images, full.images.reshape(3, 6, 2, 8, 2, 3).mean(dim=(2, 4)), atol=1e-6)
    assert torch.allclose(box.cameras.K[:, :2], full.cameras.K[:, :2] / 2)
    # an images_2 folder is preferred when it exists; its actual size sets the intrinsics
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        write_png(tmp_path / "images_2" / name, ramp_image(8, 6, seed=10 + i))
    folder = load_colmap(tmp_path, downscale=2)
    assert Path(folder.metadata["image_folder"]).name == "images_2"
    raw = np.asarray(Image.open(tmp_path / "images_2" / "a.png"), dtype=np.float32) / 255
    assert np.allclose(folder.images[0].numpy(), raw)
    assert torch.allclose(folder.cameras.K, box.cameras.K)


def test_colmap_distorted_model_options(tmp_path: Path) -> None:
    model = write_colmap_text_scene(tmp_path)
    (model / "cameras.txt").write_text(
        "1 OPENCV 16 12 20.0 21.0 8.0 6.0 0.1 -0.02 0.001 0.002\n7 SIMPLE_RADIAL 16 12 18.0 7.5 6.5 0.05\n"
    )
    with pytest.raises(SceneFormatError, match="distortion="):
        load_colmap(tmp_path, distortion="error")
    undist = load_colmap(tmp_path)
    ignored = load_colmap(tmp_path, distortion="ignore")
    assert torch.equal(undist.cameras.K, ignored.cameras.K)
    assert not torch.allclose(undist.images, ignored.images)
    (model / "cameras.txt").write_text("1 OPENCV_FISHEYE 16 12 20 21 8 6 0.1 0 0 0\n7 SIMPLE_PINHOLE 16 12 18 7.5 6.5\n")
    with pytest.raises(SceneFormatError, match="OPENCV_FISHEYE"):
        load_colmap(tmp_path)


def test_colmap_missing_model_and_bad_lines(tmp_path: Path) -> None:
    model = write_colmap_text_scene(tmp_path)
    (model / "cameras.txt").write_text("1 PINHOLE 16 12 20.0 21.0 8.0\n")
    with pytest.raises(SceneFormatError, match=r"cameras\.txt:1: PINHOLE takes 4 parameters"):
        load_colmap(tmp_path)
    (model / "images.txt").unlink()
    with pytest.raises(SceneFormatError, match="no COLMAP model"):
        load_colmap(tmp_path)


# ------------------------------------------------------------------ undistortion geometry


def test_undistort_samples_where_the_lens_put_the_ray() -> None:
    w, h = 40, 30
    K = torch.tensor([[35.0, 0, 20.0], [0, 33.0, 15.0], [0, 0, 1]])
    dist = Distortion(radial=(0.08, -0.01), p1=0.002, p2=-0.001)
    # a distorted image whose value is the (continuous) column coordinate / w: bilinear-exact
    ramp = ((torch.arange(w) + 0.5) / w).expand(h, w)[None, :, :, None].expand(1, h, w, 3).contiguous()
    out = undistort_images(ramp, K[None], [dist])[0, :, :, 0].double()
    v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    xd, _ = dist.apply((u.double() - 20.0) / 35.0, (v.double() - 15.0) / 33.0)
    src_u = xd * 35.0 + 20.0
    valid = (src_u > 1) & (src_u < w - 1)
    assert valid.float().mean() > 0.8
    assert torch.allclose(out[valid], (src_u / w)[valid], atol=1e-5)
    x, y = torch.tensor([0.3, -0.2]), torch.tensor([-0.1, 0.25])
    xd, yd = dist.apply(x, y)
    xr, yr = dist.remove(xd, yd)
    assert torch.allclose(xr, x, atol=1e-6) and torch.allclose(yr, y, atol=1e-6)


# ------------------------------------------------------------------ nerfstudio


def _c2w(z: float, x: float = 0.0) -> list[list[float]]:
    return [[1, 0, 0, x], [0, 1, 0, 0], [0, 0, 1, z], [0, 0, 0, 1]]


def test_nerfstudio_per_frame_intrinsics(tmp_path: Path) -> None:
    frames = []
    for i in range(10):
        write_png(tmp_path / "images" / f"frame_{i:03d}.png", ramp_image(16, 12, seed=i))
        # intrinsics written for 32x24 originals: the reader rescales to the 16x12 files
        frames.append(
            {"file_path": f"images/frame_{i:03d}.png", "transform_matrix": _c2w(4.0, x=0.1 * i),
             "fl_x": 30.0 + i, "fl_y": 31.0 + i, "cx": 16.0, "cy": 12.0, "w": 32, "h": 24}
        )
    frames.reverse()  # the reader sorts by file name
    (tmp_path / "transforms.json").write_text(
        json.dumps({"camera_model": "OPENCV", "frames": frames, "applied_transform": np.eye(4)[:3].tolist()})
    )
    assert detect_format(tmp_path) == "nerfstudio"
    scene = load_scene(tmp_path)
    assert scene.images.shape == (10, 12, 16, 3)
    assert torch.allclose(scene.cameras.K[:, 0, 0], (30.0 + torch.arange(10)) / 2)
    assert torch.allclose(scene.cameras.K[:, 1, 1], (31.0 + torch.arange(10)) / 2)
    assert torch.allclose(scene.cameras.K[:, :2, 2], torch.tensor([8.0, 6.0]))
    expected = opengl_c2w_to_opencv_w2c(torch.tensor(_c2w(4.0, x=0.3), dtype=torch.float64)).float()
    assert torch.allclose(scene.cameras.world_to_cam[3], expected)
    assert scene.split["test"].tolist() == [0, 8]
    assert scene.metadata["applied_transform"] == np.eye(4)[:3].tolist()


def test_nerfstudio_split_lists_ply_and_distortion(tmp_path: Path) -> None:
    from plyfile import PlyData, PlyElement

    for i in range(3):
        write_png(tmp_path / "images" / f"{i}.png", ramp_image(16, 12, seed=i, alpha=True))
    meta = {
        "fl_x": 20.0, "fl_y": 20.0, "cx": 8.0, "cy": 6.0, "w": 16, "h": 12, "k1": 0.0, "p1": 0.0,
        "frames": [{"file_path": f"./images/{i}.png", "transform_matrix": _c2w(3.0 + i)} for i in range(3)],
        "train_filenames": ["images/0.png", "images/2.png"],
        "test_filenames": ["images/1.png"],
        "ply_file_path": "sparse_pc.ply",
    }
    vertex = np.array([(0.0, 1.0, 2.0, 255, 0, 51)], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp_path / "sparse_pc.ply"))
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    scene = load_nerfstudio(tmp_path, background=(0, 0, 0))
    assert scene.split["train"].tolist() == [0, 2] and scene.split["test"].tolist() == [1]
    assert scene.points is not None and scene.point_colors is not None
    assert torch.allclose(scene.points, torch.tensor([[0.0, 1.0, 2.0]]))
    assert torch.allclose(scene.point_colors, torch.tensor([[1.0, 0.0, 0.2]]))
    assert scene.alphas is not None
    raw = np.asarray(Image.open(tmp_path / "images" / "1.png"), dtype=np.float32) / 255
    assert np.allclose(scene.images[1].numpy(), raw[..., :3] * raw[..., 3:], atol=1e-6)
    assert scene.metadata["distortion"] == "none"

    meta["k1"] = 0.1
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match=r"transforms\.json: frames\[0\].*distortion"):
        load_nerfstudio(tmp_path, distortion="error")
    undist = load_nerfstudio(tmp_path)
    assert undist.metadata["distortion"] == "undistorted"
    assert not torch.allclose(undist.images, scene.images)
    meta["camera_model"] = "OPENCV_FISHEYE"
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match="OPENCV_FISHEYE"):
        load_nerfstudio(tmp_path)


# ------------------------------------------------------------------ errors and missing frames


def write_blender(root: Path, n: int, missing: set[int] = frozenset()) -> None:
    frames = []
    for i in range(n):
        if i not in missing:
            write_png(root / "train" / f"r_{i}.png", ramp_image(8, 8, seed=i, alpha=True))
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": _c2w(4.0)})
    (root / "transforms_train.json").write_text(json.dumps({"camera_angle_x": 0.7, "frames": frames}, indent=2))


def test_missing_frames_warn_once_with_count(tmp_path: Path) -> None:
    write_blender(tmp_path, 4, missing={1, 3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scene = load_blender(tmp_path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "2 of 4" in messages[0]
    assert len(scene) == 2 and scene.split["train"].tolist() == [0, 1]
    assert scene.cameras.K[0, 0, 0] == pytest.approx(0.5 * 8 / math.tan(0.35))


def test_all_frames_missing_is_an_error(tmp_path: Path) -> None:
    write_blender(tmp_path, 3, missing={0, 1, 2})
    with pytest.raises(SceneFormatError, match="none of the 3 listed images exists"):
        load_blender(tmp_path)


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "transforms_train.json").write_text('{\n  "camera_angle_x": 0.7,\n  "frames": [,]\n}\n')
    with pytest.raises(SceneFormatError, match=r"transforms_train\.json: malformed JSON at line 3"):
        load_blender(tmp_path)
    (tmp_path / "transforms_train.json").unlink()
    (tmp_path / "transforms.json").write_text('{"frames": [}')
    with pytest.raises(SceneFormatError, match=r"transforms\.json: malformed JSON at line 1"):
        load_scene(tmp_path)


def test_bad_keys_shapes_and_images(tmp_path: Path) -> None:
    write_blender(tmp_path, 2)
    meta = json.loads((tmp_path / "transforms_train.json").read_text())
    del meta["frames"][1]["transform_matrix"]
    (tmp_path / "transforms_train.json").write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match=r"frames\[1\]: missing required key 'transform_matrix'"):
        load_blender(tmp_path)
    meta["frames"][1]["transform_matrix"] = np.eye(3).tolist()
    (tmp_path / "transforms_train.json").write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match=r"frames\[1\]: transform_matrix must be 4x4.*\(3, 3\)"):
        load_blender(tmp_path)
    meta["frames"][1]["transform_matrix"] = _c2w(3.0)
    (tmp_path / "transforms_train.json").write_text(json.dumps(meta))
    (tmp_path / "train" / "r_1.png").write_bytes(b"not a png")
    with pytest.raises(SceneFormatError, match=r"r_1\.png: cannot read image"):
        load_blender(tmp_path)
    write_png(tmp_path / "train" / "r_1.png", ramp_image(9, 8, seed=0))
    with pytest.raises(SceneFormatError, match=r"r_1\.png: image is 9x8 but r_0\.png is 8x8"):
        load_blender(tmp_path)
    del meta["camera_angle_x"]
    (tmp_path / "transforms_train.json").write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match="missing required key 'camera_angle_x'"):
        load_blender(tmp_path)


def test_llff_bad_array_and_unknown_folder(tmp_path: Path) -> None:
    np.save(tmp_path / "poses_bounds.npy", np.zeros((3, 15)))
    assert detect_format(tmp_path) == "llff"
    with pytest.raises(SceneFormatError, match=r"poses_bounds\.npy: expected an N x 17 array.*\(3, 15\)"):
        load_scene(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SceneFormatError, match="transforms_train.json.*transforms.json.*COLMAP.*poses_bounds.npy"):
        detect_format(empty)

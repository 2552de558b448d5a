"""Pin every camera conversion on known poses."""

from __future__ import annotations

import math

import pytest
import torch

from fieldkit.cameras import (
    Cameras,
    colmap_to_w2c,
    focal_from_fov,
    intrinsics_matrix,
    llff_to_opencv_w2c,
    look_at_w2c,
    opencv_w2c_to_opengl_c2w,
    opengl_c2w_to_opencv_w2c,
    quat_to_rotmat,
    rigid_inverse,
    rotmat_to_quat,
)


def apply(T: torch.Tensor, p: list[float]) -> torch.Tensor:
    return T[:3, :3] @ torch.tensor(p, dtype=T.dtype) + T[:3, 3]


def random_rotations(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return quat_to_rotmat(torch.randn(n, 4, generator=g, dtype=torch.float64))


def opengl_camera_at_z4() -> torch.Tensor:
    """OpenGL c2w: identity rotation (looks down -Z, +Y up) at (0, 0, 4)."""
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[2, 3] = 4.0
    return c2w


def test_opengl_to_opencv_known_pose() -> None:
    w2c = opengl_c2w_to_opencv_w2c(opengl_camera_at_z4())
    assert torch.allclose(apply(w2c, [0, 0, 0]), torch.tensor([0, 0, 4.0], dtype=torch.float64))
    right = apply(w2c, [1, 0, 0])
    up = apply(w2c, [0, 1, 0])
    assert right[0] > 0 and abs(right[1]) < 1e-12  # world +x is image right
    assert up[1] < 0 and abs(up[0]) < 1e-12  # world up is image up = camera -y
    assert torch.allclose(w2c, torch.diag(torch.tensor([1.0, -1, -1, 1], dtype=torch.float64)) + _t(0, 0, 4))
    # the same camera built by look-at
    assert torch.allclose(w2c, look_at_w2c(torch.tensor([0, 0, 4.0]), torch.zeros(3), torch.tensor([0, 1.0, 0])))


def _t(x: float, y: float, z: float) -> torch.Tensor:
    out = torch.zeros(4, 4, dtype=torch.float64)
    out[:3, 3] = torch.tensor([x, y, z], dtype=torch.float64)
    return out


def test_opengl_round_trip_and_3x4_input() -> None:
    c2w = torch.eye(4, dtype=torch.float64).repeat(5, 1, 1)
    c2w[:, :3, :3] = random_rotations(5)
    c2w[:, :3, 3] = torch.randn(5, 3, dtype=torch.float64)
    w2c = opengl_c2w_to_opencv_w2c(c2w)
    assert torch.allclose(opencv_w2c_to_opengl_c2w(w2c), c2w, atol=1e-12)
    assert torch.allclose(opengl_c2w_to_opencv_w2c(c2w[:, :3]), w2c)
    # camera centre survives the axis flip
    centers = Cameras(w2c, intrinsics_matrix(1.0, 1.0, 0.0, 0.0), 4, 4).centers
    assert torch.allclose(centers, c2w[:, :3, 3], atol=1e-12)


def test_quaternion_round_trip_all_branches() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(200, 4, generator=g, dtype=torch.float64)
    # near-180-degree rotations (w ~ 0) about each axis exercise the x/y/z branches
    q = torch.cat([q, torch.tensor([[1e-4, 1, 0, 0], [1e-4, 0, 1, 0], [1e-4, 0, 0, 1], [0, 0.6, 0.8, 0]], dtype=torch.float64)])
    q = q / q.norm(dim=-1, keepdim=True)
    R = quat_to_rotmat(q)
    eye = torch.eye(3, dtype=torch.float64).expand_as(R)
    assert torch.allclose(R @ R.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(len(R), dtype=torch.float64))
    back = rotmat_to_quat(R)
    assert (back[:, 0] >= 0).all()
    sign = torch.sign((back * q).sum(-1, keepdim=True))
    assert torch.allclose(back, sign * q, atol=1e-10)


def test_quaternion_known_rotation() -> None:
    # 90 degrees about +z (w, x, y, z): x -> y, y -> -x
    s = math.sqrt(0.5)
    R = quat_to_rotmat(torch.tensor([s, 0, 0, s], dtype=torch.float64))
    expected = torch.tensor([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    assert torch.allclose(R, expected, atol=1e-12)
    assert torch.allclose(rotmat_to_quat(expected), torch.tensor([s, 0, 0, s], dtype=torch.float64))


def test_colmap_pose_centre_is_minus_rt_t() -> None:
    s = math.sqrt(0.5)
    w2c = colmap_to_w2c(torch.tensor([s, 0, 0, s]), torch.tensor([1.0, 0, 0]))
    cam = Cameras(w2c, intrinsics_matrix(1.0, 1.0, 0.0, 0.0), 2, 2)
    # R = rot_z(90); centre = -R^T t = -(0, -1, 0)
    assert torch.allclose(cam.centers[0], torch.tensor([0, 1.0, 0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(apply(w2c, [0, 1, 0]), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rigid_inverse(w2c)[:3, 3], cam.centers[0])
    # identity rotation: centre = -t
    w2c = colmap_to_w2c(torch.tensor([1.0, 0, 0, 0]), torch.tensor([1.0, 2, 3]))
    assert torch.allclose(rigid_inverse(w2c)[:3, 3], -torch.tensor([1.0, 2, 3], dtype=torch.float64))


def test_llff_matches_equivalent_opengl_pose() -> None:
    R = random_rotations(6, seed=3)  # OpenGL c2w columns: right, up, back
    centers = torch.randn(6, 3, dtype=torch.float64)
    c2w_gl = torch.eye(4, dtype=torch.float64).repeat(6, 1, 1)
    c2w_gl[:, :3, :3], c2w_gl[:, :3, 3] = R, centers
    right, up, back = R[..., 0], R[..., 1], R[..., 2]
    llff = torch.stack([-up, right, back, centers], dim=-1)  # columns [down, right, back, centre]
    assert torch.allclose(llff_to_opencv_w2c(llff), opengl_c2w_to_opencv_w2c(c2w_gl), atol=1e-12)
    # the known pose: LLFF camera at (0,0,4) looking down -z with world +y up
    pose = torch.tensor([[0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 1, 4]], dtype=torch.float64)
    assert torch.allclose(llff_to_opencv_w2c(pose), opengl_c2w_to_opencv_w2c(opengl_camera_at_z4()))


def test_projection_through_K() -> None:
    w2c = opengl_c2w_to_opencv_w2c(opengl_camera_at_z4())
    K = intrinsics_matrix(100.0, 100.0, 50.0, 40.0)

    def project(p: list[float]) -> torch.Tensor:
        x = K @ apply(w2c, p)
        return x[:2] / x[2]

    assert torch.allclose(project([0, 0, 0]), torch.tensor([50.0, 40.0], dtype=torch.float64))
    assert torch.allclose(project([1, 0, 0]), torch.tensor([75.0, 40.0], dtype=torch.float64))  # right
    assert torch.allclose(project([0, 1, 0]), torch.tensor([50.0, 15.0], dtype=torch.float64))  # up


def test_focal_from_fov_and_scaled() -> None:
    assert focal_from_fov(math.pi / 2, 200) == pytest.approx(100.0)
    assert focal_from_fov(0.6911112070083618, 200) == pytest.approx(277.7778, abs=1e-3)
    cams = Cameras(torch.eye(4), intrinsics_matrix(100.0, 120.0, 50.0, 40.0), 100, 80)
    half = cams.scaled(0.5)
    assert (half.width, half.height) == (50, 40)
    assert torch.allclose(half.K[0], intrinsics_matrix(50.0, 60.0, 25.0, 20.0).to(half.K))

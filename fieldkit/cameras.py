"""Batched pinhole cameras in one convention: OpenCV axes, world-to-camera.

Camera axes: +x right, +y down, +z forward (COLMAP, gsplat). Pixel (row i, column j)
has its centre at continuous coordinate (j + 0.5, i + 0.5), so the projection of a
camera-space point is ``u = fx * x / z + cx`` in that continuous frame.

Every scene reader converts its own convention once, at the edge, with the
converters below; nothing else in the project knows about OpenGL or LLFF axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Right-multiplying a camera-to-world matrix by this flips the camera's Y and Z axes:
# OpenGL/Blender (right, up, backward) <-> OpenCV (right, down, forward).
_OPENGL_TO_OPENCV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


@dataclass
class Cameras:
    """C pinhole cameras of one image size.

    world_to_cam: [C, 4, 4] rigid transforms (OpenCV camera axes).
    K: [C, 3, 3] intrinsics (fx, fy, cx, cy in pixels).
    """

    world_to_cam: Tensor
    K: Tensor
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.world_to_cam.ndim == 2:
            self.world_to_cam = self.world_to_cam[None]
        if self.K.ndim == 2:
            self.K = self.K[None]
        if self.world_to_cam.shape[-2:] != (4, 4):
            raise ValueError(f"world_to_cam must be [C,4,4], got {tuple(self.world_to_cam.shape)}")
        if self.K.shape[-2:] != (3, 3):
            raise ValueError(f"K must be [C,3,3], got {tuple(self.K.shape)}")
        if self.K.shape[0] != self.world_to_cam.shape[0]:
            if self.K.shape[0] == 1:
                self.K = self.K.expand(self.world_to_cam.shape[0], 3, 3).clone()
            else:
                raise ValueError(
                    f"{self.world_to_cam.shape[0]} poses but {self.K.shape[0]} intrinsics"
                )
        self.width = int(self.width)
        self.height = int(self.height)
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")

    def __len__(self) -> int:
        return self.world_to_cam.shape[0]

    def __getitem__(self, index: int | slice | Tensor | list[int]) -> "Cameras":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Cameras(self.world_to_cam[index], self.K[index], self.width, self.height)

    @property
    def device(self) -> torch.device:
        return self.world_to_cam.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Cameras":
        return Cameras(
            self.world_to_cam.to(device=device, dtype=dtype),
            self.K.to(device=device, dtype=dtype),
            self.width,
            self.height,
        )

    @property
    def cam_to_world(self) -> Tensor:
        """[C,4,4] camera-to-world (OpenCV axes)."""
        return rigid_inverse(self.world_to_cam)

    @property
    def centers(self) -> Tensor:
        """[C,3] camera centres in world coordinates."""
        R = self.world_to_cam[:, :3, :3]
        t = self.world_to_cam[:, :3, 3]
        return -(R.transpose(1, 2) @ t[..., None])[..., 0]

    def scaled(self, factor: float) -> "Cameras":
        """Cameras for images resized by ``factor`` (e.g. 0.5 halves width and height)."""
        K = self.K.clone()
        K[:, :2, :] *= factor
        return Cameras(
            self.world_to_cam.clone(),
            K,
            max(1, round(self.width * factor)),
            max(1, round(self.height * factor)),
        )

    @staticmethod
    def cat(cameras: list["Cameras"]) -> "Cameras":
        sizes = {(c.width, c.height) for c in cameras}
        if len(sizes) != 1:
            raise ValueError(f"cannot batch cameras of different image sizes: {sorted(sizes)}")
        return Cameras(
            torch.cat([c.world_to_cam for c in cameras]),
            torch.cat([c.K for c in cameras]),
            cameras[0].width,
            cameras[0].height,
        )


def rigid_inverse(T: Tensor) -> Tensor:
    """Inverse of rigid 4x4 transforms [...,4,4] (rotation transposed, translation moved)."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    out = torch.zeros_like(T)
    Rt = R.transpose(-1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1
    return out


def intrinsics_matrix(fx: float | Tensor, fy: float | Tensor, cx: float | Tensor, cy: float | Tensor) -> Tensor:
    """[...,3,3] pinhole matrix from focal lengths and principal point (pixels)."""
    fx, fy, cx, cy = (torch.as_tensor(v, dtype=torch.float64) for v in (fx, fy, cx, cy))
    fx, fy, cx, cy = torch.broadcast_tensors(fx, fy, cx, cy)
    K = torch.zeros(*fx.shape, 3, 3, dtype=torch.float64)
    K[..., 0, 0] = fx
    K[..., 1, 1] = fy
    K[..., 0, 2] = cx
    K[..., 1, 2] = cy
    K[..., 2, 2] = 1
    return K


def focal_from_fov(fov_radians: float, size_pixels: int) -> float:
    """Focal length in pixels for a field of view spanning ``size_pixels``."""
    return 0.5 * size_pixels / math.tan(0.5 * fov_radians)


def opengl_c2w_to_opencv_w2c(c2w: Tensor) -> Tensor:
    """Blender/OpenGL/nerfstudio camera-to-world [...,4,4] (or [...,3,4]) -> OpenCV world-to-camera."""
    c2w = as_homogeneous(torch.as_tensor(c2w, dtype=torch.float64))
    return rigid_inverse(c2w @ _OPENGL_TO_OPENCV.to(c2w))


def opencv_w2c_to_opengl_c2w(w2c: Tensor) -> Tensor:
    """Inverse of :func:`opengl_c2w_to_opencv_w2c`."""
    w2c = as_homogeneous(torch.as_tensor(w2c, dtype=torch.float64))
    return rigid_inverse(w2c) @ _OPENGL_TO_OPENCV.to(w2c)


def quat_to_rotmat(q: Tensor) -> Tensor:
    """Rotation matrices [...,3,3] from quaternions [...,4] in (w, x, y, z) order (normalised here)."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)


def rotmat_to_quat(R: Tensor) -> Tensor:
    """Quaternions [...,4] (w, x, y, z, w >= 0) from rotation matrices [...,3,3]."""
    R = torch.as_tensor(R)
    m = R.reshape(-1, 3, 3)
    trace = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    candidates = torch.stack(
        [
            torch.stack([1 + trace, m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]], -1),
            torch.stack([m[:, 2, 1] - m[:, 1, 2], 1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2], m[:, 0, 1] + m[:, 1, 0], m[:, 0, 2] + m[:, 2, 0]], -1),
            torch.stack([m[:, 0, 2] - m[:, 2, 0], m[:, 0, 1] + m[:, 1, 0], 1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2], m[:, 1, 2] + m[:, 2, 1]], -1),
            torch.stack([m[:, 1, 0] - m[:, 0, 1], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1], 1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2]], -1),
        ],
        dim=1,
    )  # [B,4 candidates,4]; candidate k is most stable when its k-th component is largest
    diag = torch.stack([trace, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], -1)
    best = diag.argmax(-1)
    q = candidates[torch.arange(m.shape[0]), best]
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[:, :1] < 0, -q, q)
    return q.reshape(*R.shape[:-2], 4)


def colmap_to_w2c(qvec_wxyz: Tensor, tvec: Tensor) -> Tensor:
    """COLMAP image pose (world-to-camera quaternion w,x,y,z and translation) -> [...,4,4]."""
    qvec_wxyz = torch.as_tensor(qvec_wxyz, dtype=torch.float64)
    tvec = torch.as_tensor(tvec, dtype=torch.float64)
    out = torch.zeros(*tvec.shape[:-1], 4, 4, dtype=torch.float64)
    out[..., :3, :3] = quat_to_rotmat(qvec_wxyz)
    out[..., :3, 3] = tvec
    out[..., 3, 3] = 1
    return out


def llff_to_opencv_w2c(poses: Tensor) -> Tensor:
    """LLFF camera-to-world [...,3,4] (rotation columns down, right, backward) -> OpenCV world-to-camera."""
    poses = torch.as_tensor(poses, dtype=torch.float64)
    down, right, back, center = poses[..., 0], poses[..., 1], poses[..., 2], poses[..., 3]
    c2w = torch.zeros(*poses.shape[:-2], 4, 4, dtype=torch.float64)
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = down
    c2w[..., :3, 2] = -back
    c2w[..., :3, 3] = center
    c2w[..., 3, 3] = 1
    return rigid_inverse(c2w)


def as_homogeneous(T: Tensor) -> Tensor:
    """Pad [...,3,4] transforms to [...,4,4]; [...,4,4] pass through."""
    if T.shape[-2:] == (4, 4):
        return T
    if T.shape[-2:] != (3, 4):
        raise ValueError(f"expected [...,3,4] or [...,4,4] transforms, got {tuple(T.shape)}")
    bottom = torch.zeros(*T.shape[:-2], 1, 4, dtype=T.dtype, device=T.device)
    bottom[..., 0, 3] = 1
    return torch.cat([T, bottom], dim=-2)


def look_at_w2c(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """OpenCV world-to-camera [4,4] for a camera at ``eye`` looking at ``target`` (``up`` is world up)."""
    eye, target, up = (torch.as_tensor(v, dtype=torch.float64) for v in (eye, target, up))
    forward = target - eye
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, up)
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return rigid_inverse(c2w)

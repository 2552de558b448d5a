"""Browser camera <-> fieldkit ``Cameras``, and the resolution a view is rendered at.

viser reports a client's camera as ``wxyz`` (rotation camera-to-world), ``position`` (camera
centre), a *vertical* ``fov`` in radians and the canvas size in pixels; its camera axes are
OpenCV's (+x right, +y down, +z forward), the same as :class:`fieldkit.cameras.Cameras`, so
no axis flip is needed. Intrinsics follow the browser's pinhole: ``f = (H/2) / tan(fov/2)``,
principal point at the image centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fieldkit.cameras import Cameras, quat_to_rotmat, rigid_inverse, rotmat_to_quat


@dataclass(frozen=True)
class ViewCamera:
    """One browser camera: pose, vertical field of view and canvas size."""

    wxyz: tuple[float, float, float, float]
    position: tuple[float, float, float]
    fov: float
    width: int
    height: int

    @classmethod
    def from_client(cls, camera) -> "ViewCamera":
        """From a viser ``CameraHandle`` (or anything with the same fields)."""
        return cls(
            tuple(float(v) for v in np.asarray(camera.wxyz).reshape(-1)),
            tuple(float(v) for v in np.asarray(camera.position).reshape(-1)),
            float(camera.fov),
            int(camera.image_width),
            int(camera.image_height),
        )

    def problem(self) -> str | None:
        """Why this camera cannot be rendered, or None when it can (malformed client messages)."""
        values = [*self.wxyz, *self.position, self.fov]
        if len(self.wxyz) != 4 or len(self.position) != 3:
            return "pose has the wrong number of components"
        if not all(math.isfinite(v) for v in values):
            return "pose or fov is not finite"
        if sum(v * v for v in self.wxyz) < 1e-12:
            return "rotation quaternion is zero"
        if not 1e-4 < self.fov < math.pi - 1e-4:
            return f"fov {self.fov} is outside (0, pi)"
        if not (1 <= self.width <= 16384 and 1 <= self.height <= 16384):
            return f"canvas size {self.width}x{self.height} is out of range"
        return None

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def cameras(self, width: int | None = None, height: int | None = None) -> Cameras:
        """A fieldkit camera for this view rendered at ``width`` x ``height`` (default: canvas size)."""
        width = int(width or self.width)
        height = int(height or self.height)
        R = quat_to_rotmat(torch.tensor(self.wxyz, dtype=torch.float64))
        c2w = torch.eye(4, dtype=torch.float64)
        c2w[:3, :3] = R
        c2w[:3, 3] = torch.tensor(self.position, dtype=torch.float64)
        focal = 0.5 * height / math.tan(0.5 * self.fov)
        K = torch.tensor([[focal, 0.0, 0.5 * width], [0.0, focal, 0.5 * height], [0.0, 0.0, 1.0]], dtype=torch.float64)
        return Cameras(rigid_inverse(c2w)[None], K[None], width, height)


def view_from_cameras(cameras: Cameras, index: int = 0) -> ViewCamera:
    """The browser camera that sees what ``cameras[index]`` sees (square pixels, centred principal point)."""
    c2w = rigid_inverse(cameras.world_to_cam[index].double())
    fy = float(cameras.K[index, 1, 1])
    fov = 2.0 * math.atan(0.5 * cameras.height / fy)
    wxyz = rotmat_to_quat(c2w[:3, :3])
    return ViewCamera(
        tuple(float(v) for v in wxyz), tuple(float(v) for v in c2w[:3, 3]), fov, cameras.width, cameras.height
    )


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) with the aspect of ``width`` x ``height`` and the longer side at most ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def moving_size(width: int, height: int, pixels_per_second: float, target_fps: float, min_side: int, max_side: int) -> tuple[int, int]:
    """Resolution for an interactive frame: as many pixels as render in ``1/target_fps`` seconds.

    nerfstudio's rule (``H = sqrt(rays_per_sec / fps / aspect)``), clamped so the longer side
    stays within [min_side, max_side] and never above the canvas.
    """
    aspect = width / height
    budget = max(pixels_per_second / max(target_fps, 1e-3), 1.0)
    h = math.sqrt(budget / aspect)
    w = h * aspect
    longest = max(w, h)
    longest = min(max(longest, min_side), max_side, max(width, height))
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))

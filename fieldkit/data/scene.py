"""The one type every scene reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cameras import Cameras


@dataclass
class Scene:
    """Posed images in OpenCV world-to-camera convention, plus optional sparse points.

    images: [N,H,W,3] float32 in [0,1], RGBA already composited on ``background``.
    cameras: N cameras (float32), OpenCV world-to-camera.
    split: "train", "test" (and "val" when the format has it) -> int64 indices into images.
    background: [3] float32, the colour transparent pixels were composited on.
    points / point_colors: [P,3] sparse points (world frame) and their colours in [0,1].
    alphas: [N,H,W,1] float32 when the images had an alpha channel.
    near_far: [N,2] per-image depth bounds when the format stores them (LLFF).
    scene_box: [2,3] a box the format prescribes (Blender synthetic: [-1.5, 1.5]^3).
    """

    images: torch.Tensor
    cameras: Cameras
    split: dict[str, torch.Tensor]
    background: torch.Tensor
    points: torch.Tensor | None = None
    point_colors: torch.Tensor | None = None
    alphas: torch.Tensor | None = None
    name: str = ""
    source: Path | None = None
    near_far: torch.Tensor | None = None
    scene_box: torch.Tensor | None = None
    metadata: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be [N,H,W,3], got {tuple(self.images.shape)}")
        if len(self.cameras) != n:
            raise ValueError(f"{n} images but {len(self.cameras)} cameras")
        if (self.cameras.width, self.cameras.height) != (self.images.shape[2], self.images.shape[1]):
            raise ValueError(
                f"cameras are {self.cameras.width}x{self.cameras.height} but images are "
                f"{self.images.shape[2]}x{self.images.shape[1]}"
            )
        for key, idx in self.split.items():
            if idx.numel() and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"split {key!r} indexes outside 0..{n - 1}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, split: str) -> tuple[torch.Tensor, Cameras]:
        """(images, cameras) of one split."""
        if split not in self.split:
            raise KeyError(f"scene {self.name!r} has no split {split!r} (has {sorted(self.split)})")
        idx = self.split[split]
        return self.images[idx], self.cameras[idx]

    def _train_centers(self) -> torch.Tensor:
        idx = self.split.get("train")
        cams = self.cameras if idx is None or idx.numel() == 0 else self.cameras[idx]
        return cams.centers.double()

    @property
    def scene_extent(self) -> float:
        """1.1 x the largest distance of a train camera centre from their mean (3DGS getNerfppNorm)."""
        centers = self._train_centers()
        radius = (centers - centers.mean(0)).norm(dim=-1).max().item()
        return 1.1 * radius

    @property
    def bounds(self) -> torch.Tensor:
        """[2,3] axis-aligned box (min, max) for random initialisation.

        Points' 1st/99th percentile box when there are points; else the format's box
        (``scene_box``); else the region the cameras look at (see :func:`look_at_box`).
        """
        if self.points is not None and len(self.points) > 0:
            pts = self.points.detach().cpu().double().numpy()  # numpy: no size limit on quantiles
            return torch.from_numpy(np.percentile(pts, [1.0, 99.0], axis=0)).float()
        if self.scene_box is not None:
            return self.scene_box.float()
        return look_at_box(self.cameras, self.near_far).float()


def look_at_box(cameras: Cameras, near_far: torch.Tensor | None = None) -> torch.Tensor:
    """[2,3] box around the region the cameras look at.

    With depth bounds: the box of all points at the near and far depths along each
    optical axis. Otherwise: the point closest (least squares) to all optical axes,
    with half-size half the median camera distance to it; when the axes are nearly
    parallel (forward-facing captures) the box spans the camera centres pushed one
    camera-spread forward.
    """
    w2c = cameras.world_to_cam.double()
    centers = cameras.centers.double()
    forward = w2c[:, 2, :3]  # third row of R: the camera's +z axis in world coordinates
    if near_far is not None:
        nf = near_far.double()
        pts = torch.cat([centers + forward * nf[:, :1], centers + forward * nf[:, 1:2]])
        return torch.stack([pts.min(0).values, pts.max(0).values])
    eye = torch.eye(3, dtype=torch.float64)
    proj = eye - forward[:, :, None] * forward[:, None, :]  # [C,3,3] projectors off each axis
    A = proj.sum(0)
    b = (proj @ centers[..., None]).sum(0)[:, 0]
    eigmin = torch.linalg.eigvalsh(A)[0].item()
    spread = (centers - centers.mean(0)).norm(dim=-1).max().item()
    if len(cameras) >= 2 and eigmin > 0.05 * len(cameras):
        focus = torch.linalg.solve(A, b)
        if ((focus - centers) * forward).sum(-1).mean() > 0:
            half = 0.5 * (centers - focus).norm(dim=-1).median().item()
            return torch.stack([focus - half, focus + half])
    scale = max(spread, 1e-3)
    pts = torch.cat([centers, centers + forward * scale])
    return torch.stack([pts.min(0).values, pts.max(0).values])

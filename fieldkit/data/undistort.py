"""Lens distortion (OpenCV radial-tangential family) and image undistortion by remapping.

Undistorting an image onto a pinhole camera with the same K needs only the forward
model: each output pixel's ray is distorted to find where to sample the input image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class Distortion:
    """Normalised-coordinate distortion.

    radial: coefficients of r^2, r^4, r^6, r^8 in the numerator (k1, k2, k3, k4 of the
    polynomial model). rational: coefficients of r^2, r^4, r^6 in the denominator
    (OpenCV's k4, k5, k6 of FULL_OPENCV). p1, p2: tangential terms.
    """

    radial: tuple[float, ...] = ()
    rational: tuple[float, ...] = ()
    p1: float = 0.0
    p2: float = 0.0

    @property
    def is_zero(self) -> bool:
        return not any(self.radial) and not any(self.rational) and self.p1 == 0.0 and self.p2 == 0.0

    def apply(self, x: ArrayT, y: ArrayT) -> tuple[ArrayT, ArrayT]:
        """Distort undistorted normalised coordinates (x, y) = (X/Z, Y/Z) (numpy or torch)."""
        r2 = x * x + y * y
        num = 1.0 + 0.0 * r2
        power = 1.0 + 0.0 * r2
        for k in self.radial:
            power = power * r2
            num = num + k * power
        d = num
        if any(self.rational):
            den = 1.0 + 0.0 * r2
            power = 1.0 + 0.0 * r2
            for k in self.rational:
                power = power * r2
                den = den + k * power
            d = num / den
        xd = x * d + 2 * self.p1 * x * y + self.p2 * (r2 + 2 * x * x)
        yd = y * d + self.p1 * (r2 + 2 * y * y) + 2 * self.p2 * x * y
        return xd, yd

    def remove(self, xd: ArrayT, yd: ArrayT, iterations: int = 20) -> tuple[ArrayT, ArrayT]:
        """Undistort normalised coordinates by fixed-point iteration (inverse of :meth:`apply`)."""
        x, y = xd, yd
        for _ in range(iterations):
            fx, fy = self.apply(x, y)
            x = x - (fx - xd)
            y = y - (fy - yd)
        return x, y


def undistortion_grid(K: torch.Tensor, distortion: Distortion, width: int, height: int) -> torch.Tensor:
    """[H,W,2] grid_sample coordinates: where each pinhole pixel samples the distorted image.

    Pixel centres sit at (j + 0.5, i + 0.5) (the cameras.py convention); with
    ``align_corners=False`` grid_sample puts -1 / +1 on the outer pixel edges.
    """
    # numpy (single-threaded) keeps this cheap even when torch's thread pool is contended
    fx, fy, cx, cy = (float(v) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    xd, yd = distortion.apply((u - cx) / fx, (v - cy) / fy)
    grid = np.stack([(xd * fx + cx) / width * 2 - 1, (yd * fy + cy) / height * 2 - 1], axis=-1)
    return torch.from_numpy(grid)


def undistort_images(images: torch.Tensor, K: torch.Tensor, distortions: list[Distortion]) -> torch.Tensor:
    """Resample a batch [N,H,W,C] taken through (K [N,3,3], distortion) onto pinholes with the same K.

    Samples outside an input image are clamped to its border.
    """
    out = images.clone()
    _, h, w, _ = images.shape
    groups: dict[tuple, list[int]] = {}
    for i, dist in enumerate(distortions):
        if not dist.is_zero:
            groups.setdefault((tuple(K[i].flatten().tolist()), dist), []).append(i)
    for (_, dist), members in groups.items():
        grid = undistortion_grid(K[members[0]], dist, w, h).to(images.dtype)
        for start in range(0, len(members), 16):
            idx = members[start : start + 16]
            src = images[idx].permute(0, 3, 1, 2)
            res = F.grid_sample(
                src, grid.expand(len(idx), h, w, 2), mode="bilinear", padding_mode="border", align_corners=False
            )
            out[idx] = res.permute(0, 2, 3, 1)
    return out

"""Lens distortion (OpenCV radial-tangential family) and image undistortion by remapping.

Undistorting an image onto a pinhole camera with the same K needs only the forward
model: each output pixel's ray is distorted to find where to sample the input image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distort undistorted normalised coordinates (x, y) = (X/Z, Y/Z)."""
        r2 = x * x + y * y
        num = torch.ones_like(r2)
        power = torch.ones_like(r2)
        for k in self.radial:
            power = power * r2
            num = num + k * power
        den = torch.ones_like(r2)
        power = torch.ones_like(r2)
        for k in self.rational:
            power = power * r2
            den = den + k * power
        d = num / den
        xd = x * d + 2 * self.p1 * x * y + self.p2 * (r2 + 2 * x * x)
        yd = y * d + self.p1 * (r2 + 2 * y * y) + 2 * self.p2 * x * y
        return xd, yd

    def remove(
        self, xd: torch.Tensor, yd: torch.Tensor, iterations: int = 20
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Undistort normalised coordinates by fixed-point iteration (inverse of :meth:`apply`)."""
        x, y = xd.clone(), yd.clone()
        for _ in range(iterations):
            fx, fy = self.apply(x, y)
            x = x - (fx - xd)
            y = y - (fy - yd)
        return x, y


def undistort_image(image: torch.Tensor, K: torch.Tensor, distortion: Distortion) -> torch.Tensor:
    """Resample [H,W,C] taken through (K, distortion) as seen by a pinhole with the same K.

    Pixel centres sit at (j + 0.5, i + 0.5) (the cameras.py convention); samples outside
    the input are clamped to its border.
    """
    if distortion.is_zero:
        return image
    h, w = image.shape[:2]
    K = K.double()
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float64) + 0.5,
        torch.arange(w, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    xd, yd = distortion.apply((u - cx) / fx, (v - cy) / fy)
    src_u = xd * fx + cx
    src_v = yd * fy + cy
    # grid_sample with align_corners=False puts -1 / +1 on the outer pixel edges.
    grid = torch.stack([src_u / w * 2 - 1, src_v / h * 2 - 1], dim=-1).to(image.dtype)
    out = F.grid_sample(
        image.permute(2, 0, 1)[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[0].permute(1, 2, 0).contiguous()


def undistort_images(images: torch.Tensor, K: torch.Tensor, distortions: list[Distortion]) -> torch.Tensor:
    """Undistort a batch [N,H,W,C] with per-image K [N,3,3] and distortion."""
    out = images.clone()
    for i, dist in enumerate(distortions):
        out[i] = undistort_image(images[i], K[i], dist)
    return out

"""Photometric training losses on images [..., H, W, C] in [0, 1]; each returns a scalar.

SSIM comes from :mod:`fieldkit.metrics` (one implementation: 11-tap Gaussian, sigma 1.5,
'valid' filtering). The Inria 3DGS code zero-pads instead ('same' filtering), so its D-SSIM
term also sees the 5-pixel border; the two agree closely on the interior.
"""

from __future__ import annotations

from torch import Tensor

from fieldkit.metrics import pixel_mask, ssim

__all__ = ["dssim_loss", "gaussian_splat_loss", "l1_loss"]


def l1_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean absolute error; with ``mask`` ([..., H, W] or [..., H, W, 1]) only masked pixels count."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    err = (pred - target).abs()
    if mask is None:
        return err.mean()
    m = pixel_mask(mask, pred.shape, err.dtype)
    return (err.sum(dim=-1) * m).sum() / (m.sum() * pred.shape[-1])


def dssim_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """1 - SSIM, averaged over the images of the batch."""
    return 1.0 - ssim(pred, target, mask).mean()


def gaussian_splat_loss(pred: Tensor, target: Tensor, ssim_lambda: float = 0.2,
                        mask: Tensor | None = None) -> Tensor:
    """The 3DGS photometric loss (1 - lambda) * L1 + lambda * (1 - SSIM), lambda = 0.2 by default."""
    return (1.0 - ssim_lambda) * l1_loss(pred, target, mask) + ssim_lambda * dssim_loss(pred, target, mask)

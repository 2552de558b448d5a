"""S3IM, Stochastic Structural SIMilarity (Xie et al., ICCV 2023), for anything trained on rays.

A batch of B rays (B = patch_height * patch_width, 64 x 64 = 4096 in the paper) is gathered
``repeats`` times — the identity order plus ``repeats - 1`` random permutations — and the
concatenated list is laid out row-major as a virtual image of patch_height x (patch_width *
repeats) pixels, for prediction and target alike. The loss is 1 - SSIM of the two virtual images
with a 4-tap window applied at stride 4 (zero padding 1), so every SSIM window compares 16 rays
that may lie anywhere in the scene. Weight 1.0 on top of the MSE in the paper.

The SSIM itself is the project's one implementation (:func:`fieldkit.metrics.ssim_map`:
Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03), evaluated on the zero-padded virtual images
and read every ``stride`` pixels, which equals a strided convolution with padding. Its 4-tap
window is the symmetric Gaussian (taps at -1.5..1.5); the reference code centres its even
window on tap 2 (taps -2..1), a half-pixel shift of the window.

:func:`s3im_image_loss` is the patch form for methods that render whole images (Gaussian
splatting): a random subset of the image's pixels plays the role of the ray batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fieldkit.metrics import ssim_map

__all__ = ["s3im_image_loss", "s3im_loss"]


def s3im_loss(
    pred: Tensor,
    target: Tensor,
    *,
    kernel_size: int = 4,
    stride: int = 4,
    repeats: int = 10,
    patch_height: int = 64,
    generator: torch.Generator | None = None,
) -> Tensor:
    """1 - SSIM over ``repeats`` randomly re-ordered copies of a ray batch (pred, target [B, C]).

    B must be a multiple of ``patch_height`` (the virtual patch is patch_height x B / patch_height
    per copy). The first copy keeps the batch order; the others are independent permutations.
    """
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"s3im_loss takes pred and target [B, C] of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    B, C = pred.shape
    if B % patch_height:
        raise ValueError(f"S3IM needs a ray batch that is a multiple of patch_height={patch_height}, got {B}")
    gen_device = generator.device if generator is not None else pred.device
    orders = [torch.arange(B, device=pred.device)]
    orders += [torch.randperm(B, generator=generator, device=gen_device).to(pred.device) for _ in range(repeats - 1)]
    index = torch.cat(orders)
    width = B // patch_height * repeats

    def virtual(x: Tensor) -> Tensor:  # row-major layout of the M*B list: [1, H, W*M, C]
        img = x[index].reshape(1, patch_height, width, C)
        pad = (kernel_size - 1) // 2
        return F.pad(img, (0, 0, pad, pad, pad, pad))  # zero padding of H and W

    s = ssim_map(virtual(pred), virtual(target), window_size=kernel_size, sigma=1.5)
    return 1.0 - s[..., ::stride, ::stride].mean()


def s3im_image_loss(
    pred: Tensor,
    target: Tensor,
    *,
    n_rays: int = 4096,
    generator: torch.Generator | None = None,
    **kwargs,
) -> Tensor:
    """Patch form for rendered images [..., H, W, C]: S3IM over ``n_rays`` random pixels."""
    p = pred.reshape(-1, pred.shape[-1])
    t = target.reshape(-1, target.shape[-1])
    n = min(n_rays, p.shape[0])
    patch_height = kwargs.pop("patch_height", 64)
    n -= n % patch_height
    if n == 0:
        raise ValueError(f"image too small for an S3IM patch of height {patch_height}")
    gen_device = generator.device if generator is not None else pred.device
    pick = torch.randperm(p.shape[0], generator=generator, device=gen_device)[:n].to(pred.device)
    return s3im_loss(p[pick], t[pick], patch_height=patch_height, generator=generator, **kwargs)

"""S3IM: virtual-patch layout, strided SSIM against a direct convolution, gradients, Gaussian patch form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fieldkit.losses_s3im import s3im_image_loss, s3im_loss
from fieldkit.metrics import gaussian_window


def direct_strided_ssim(x: torch.Tensor, y: torch.Tensor, k: int = 4, stride: int = 4) -> torch.Tensor:
    """SSIM of [1,C,H,W] images as a strided, zero-padded depthwise convolution (the S3IM reference's form)."""
    c = x.shape[1]
    g = gaussian_window(k, 1.5, dtype=x.dtype)
    w = (g[:, None] * g[None, :]).expand(c, 1, k, k)
    pad = (k - 1) // 2

    def conv(t):
        return F.conv2d(t, w, stride=stride, padding=pad, groups=c)

    mu_x, mu_y = conv(x), conv(y)
    var_x = conv(x * x) - mu_x**2
    var_y = conv(y * y) - mu_y**2
    cov = conv(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean()


def test_identity_order_matches_strided_convolution_of_the_patch():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(4096, 3, generator=gen, dtype=torch.float64)
    target = (pred + 0.1 * torch.randn(4096, 3, generator=gen, dtype=torch.float64)).clamp(0, 1)
    loss = s3im_loss(pred, target, repeats=1)
    # one copy: the batch laid out row-major as a 64 x 64 image
    img = lambda v: v.T.reshape(1, 3, 64, 64)  # noqa: E731
    assert torch.allclose(loss, 1 - direct_strided_ssim(img(pred), img(target)), atol=1e-10)


def test_repeats_tile_shuffled_copies_side_by_side():
    gen = torch.Generator().manual_seed(1)
    pred = torch.rand(128, 3, generator=gen, dtype=torch.float64)
    target = torch.rand(128, 3, generator=gen, dtype=torch.float64)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    loss = s3im_loss(pred, target, repeats=3, patch_height=8, generator=g1)
    index = torch.cat([torch.arange(128)] + [torch.randperm(128, generator=g2) for _ in range(2)])
    img = lambda v: v[index].T.reshape(1, 3, 8, 48)  # noqa: E731  (M*B list, row-major, 8 x (16*3))
    assert torch.allclose(loss, 1 - direct_strided_ssim(img(pred), img(target)), atol=1e-10)


def test_zero_for_identical_batches_grows_with_noise_and_has_gradients():
    gen = torch.Generator().manual_seed(2)
    target = torch.rand(4096, 3, generator=gen)
    assert s3im_loss(target, target).abs() < 1e-6
    losses = []
    for noise in (0.02, 0.1, 0.3):
        pred = (target + noise * torch.randn(4096, 3, generator=gen)).requires_grad_()
        loss = s3im_loss(pred, target, generator=gen)
        loss.backward()
        assert pred.grad is not None and pred.grad.abs().sum() > 0
        losses.append(float(loss.detach()))
    assert losses[0] < losses[1] < losses[2]


def test_batch_must_fill_the_patch():
    with pytest.raises(ValueError, match="multiple of patch_height"):
        s3im_loss(torch.rand(100, 3), torch.rand(100, 3))
    with pytest.raises(ValueError, match="one shape"):
        s3im_loss(torch.rand(64, 3), torch.rand(64, 4))


def test_image_patch_form_for_gaussians():
    gen = torch.Generator().manual_seed(3)
    img = torch.rand(1, 80, 90, 3, generator=gen)
    assert s3im_image_loss(img, img, generator=gen).abs() < 1e-6
    noisy = (img + 0.2 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
    assert s3im_image_loss(noisy, img, generator=gen) > 0.05
    from fieldkit.methods.gs import GSConfig

    assert GSConfig().s3im_weight == 0.0  # off by default

"""PSNR / SSIM / losses against known values, an independent numpy SSIM, scikit-image and gradcheck."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image
from scipy.ndimage import gaussian_filter

from fieldkit.losses import dssim_loss, gaussian_splat_loss, l1_loss
from fieldkit.metrics import lpips_if_available, mean_std, psnr, ssim, ssim_map


def lego(name: str = "r_0.png") -> np.ndarray:
    """A lego_200 test view, RGBA composited onto white, float64 [200, 200, 3] in [0, 1]."""
    rgba = np.asarray(Image.open(shared_path("lego_200", "test", name)), dtype=np.float64) / 255.0
    return rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])


def noisy(img: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0.0, sigma, img.shape), 0.0, 1.0)


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Straightforward SSIM: scipy gaussian_filter (sigma 1.5, truncate 3.5 -> 11 taps) per channel,
    population statistics, then the 5-pixel border cropped (as skimage does) and everything averaged."""
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]

        def blur(img: np.ndarray) -> np.ndarray:
            return gaussian_filter(img, sigma=1.5, truncate=3.5, mode="reflect")

        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(s[5:-5, 5:-5].mean())
    return float(np.mean(values))


# ---------------------------------------------------------------- PSNR


def test_psnr_known_mse() -> None:
    target = torch.rand(2, 3, 16, 20, 3, dtype=torch.float64) * 0.9
    out = psnr(target + 0.1, target)  # MSE = 0.01 -> 20 dB
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, torch.full((2, 3), 20.0, dtype=torch.float64))
    torch.testing.assert_close(psnr(target + 0.01, target), torch.full((2, 3), 40.0, dtype=torch.float64))
    assert psnr(target[0, 0], target[0, 0]).item() == math.inf
    assert psnr(target[0, 0], target[0, 0]).shape == ()


def test_psnr_is_per_image_not_pooled() -> None:
    target = torch.zeros(2, 8, 8, 3, dtype=torch.float64)
    pred = target.clone()
    pred[0] += 0.1  # 20 dB
    pred[1] += 0.01  # 40 dB
    torch.testing.assert_close(psnr(pred, target), torch.tensor([20.0, 40.0], dtype=torch.float64))


def test_psnr_mask_ignores_unmasked_pixels() -> None:
    target = torch.rand(2, 10, 12, 3, dtype=torch.float64) * 0.9
    pred = target + 0.1
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:7, 3:9] = True
    pred[:, ~mask] = torch.rand(int((~mask).sum()), 3, dtype=torch.float64)  # garbage outside
    torch.testing.assert_close(psnr(pred, target, mask), torch.full((2,), 20.0, dtype=torch.float64))
    torch.testing.assert_close(psnr(pred, target, mask[..., None]), torch.full((2,), 20.0, dtype=torch.float64))
    assert (psnr(pred, target) < 19.0).all()


# ---------------------------------------------------------------- SSIM


def test_ssim_identity_and_shapes() -> None:
    x = torch.rand(4, 32, 40, 3)
    out = ssim(x, x)
    assert out.shape == (4,)
    torch.testing.assert_close(out, torch.ones(4), atol=1e-6, rtol=0)
    assert ssim_map(x, x).shape == (4, 22, 30)
    assert ssim(x[0], x[0]).shape == ()
    assert (ssim(x, torch.rand(4, 32, 40, 3)) < 0.2).all()
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(10, 30, 3), torch.rand(10, 30, 3))


@pytest.mark.parametrize("sigma", [0.02, 0.1, 0.3])
def test_ssim_matches_numpy_reference_on_lego(sigma: float) -> None:
    clean = lego("r_0.png")
    dirty = noisy(clean, sigma, seed=1)
    expected = reference_ssim(dirty, clean)
    got64 = ssim(torch.from_numpy(dirty), torch.from_numpy(clean)).item()
    assert abs(got64 - expected) < 1e-10
    got32 = ssim(torch.from_numpy(dirty).float(), torch.from_numpy(clean).float()).item()
    assert abs(got32 - expected) < 1e-4
    # Two different real views: low but valid similarity, same agreement.
    other = lego("r_8.png")
    assert abs(ssim(torch.from_numpy(other), torch.from_numpy(clean)).item() - reference_ssim(other, clean)) < 1e-10


def test_ssim_matches_skimage_on_lego() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    clean = lego("r_0.png")
    batch_pred, expected = [], []
    for seed, sigma in enumerate([0.01, 0.05, 0.2]):
        dirty = noisy(clean, sigma, seed)
        batch_pred.append(dirty)
        expected.append(metrics.structural_similarity(dirty, clean, channel_axis=-1, data_range=1.0,
                                                      gaussian_weights=True, sigma=1.5, use_sample_covariance=False))
    pred = torch.from_numpy(np.stack(batch_pred))
    target = torch.from_numpy(np.stack([clean] * 3))
    got = ssim(pred, target)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-10, rtol=0)
    got32 = ssim(pred.float(), target.float())
    torch.testing.assert_close(got32, torch.tensor(expected, dtype=torch.float32), atol=1e-4, rtol=0)


def test_ssim_mask() -> None:
    pred, target = torch.rand(2, 30, 30, 3, dtype=torch.float64), torch.rand(2, 30, 30, 3, dtype=torch.float64)
    full = torch.ones(30, 30)
    torch.testing.assert_close(ssim(pred, target, full), ssim(pred, target))
    mask = torch.zeros(30, 30, dtype=torch.bool)
    mask[8:20, 10:15] = True
    s = ssim_map(pred, target)  # map pixel (i, j) <-> image pixel (i + 5, j + 5)
    torch.testing.assert_close(ssim(pred, target, mask), s[:, 3:15, 5:10].mean(dim=(-2, -1)))


def test_ssim_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(1, 12, 13, 3, dtype=torch.float64, generator=g).requires_grad_()
    target = torch.rand(1, 12, 13, 3, dtype=torch.float64, generator=g)
    mask = torch.rand(12, 13, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda p: dssim_loss(p, target), (pred,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda p: ssim(p, target, mask), (pred,), eps=1e-6, atol=1e-7, fast_mode=True)
    assert torch.autograd.gradcheck(lambda p: gaussian_splat_loss(p, target), (pred,), eps=1e-6, atol=1e-7,
                                    fast_mode=True)


# ---------------------------------------------------------------- losses and helpers


def test_losses_values() -> None:
    target = torch.rand(2, 20, 20, 3, dtype=torch.float64) * 0.8
    pred = target + 0.1
    torch.testing.assert_close(l1_loss(pred, target), torch.tensor(0.1, dtype=torch.float64))
    s = ssim(pred, target).mean()
    torch.testing.assert_close(dssim_loss(pred, target), 1 - s)
    torch.testing.assert_close(gaussian_splat_loss(pred, target), 0.8 * 0.1 + 0.2 * (1 - s))
    torch.testing.assert_close(gaussian_splat_loss(pred, target, ssim_lambda=0.5), 0.5 * 0.1 + 0.5 * (1 - s))
    assert gaussian_splat_loss(target, target).item() == pytest.approx(0.0, abs=1e-12)
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[:5] = True
    pred[:, ~mask] += 0.5
    torch.testing.assert_close(l1_loss(pred, target, mask), torch.tensor(0.1, dtype=torch.float64))


def test_mean_std() -> None:
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5.0 / 3.0))  # sample std, like ns-eval
    assert mean_std([torch.tensor([1.0, 3.0])], ddof=0) == (2.0, 1.0)
    assert mean_std([7.0]) == (7.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_lpips_none_without_local_package() -> None:
    x = torch.rand(1, 16, 16, 3)
    out = lpips_if_available(x, x)
    if importlib.util.find_spec("lpips") is None:
        assert out is None
    else:
        assert out is None or out.shape == (1,)

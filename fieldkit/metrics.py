"""Image metrics: PSNR, SSIM (differentiable torch, batched), LPIPS when available, mean/std.

Images are ``[..., H, W, C]`` (C = 3 for RGB) with values in [0, 1] (data range 1). Every
metric returns one value per image, shaped like the leading dims ``[...]``.

SSIM follows Wang et al. 2004 with a Gaussian window (11 taps, sigma 1.5), K1 = 0.01,
K2 = 0.03, population (not sample) covariances, and 'valid' filtering: the SSIM map covers only
the (H-10) x (W-10) pixels whose window lies inside the image. This equals
``skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=1,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``, which filters the whole
image with reflected borders and then crops 5 pixels per side before averaging (so the borders
never enter), and the default of ``pytorch_msssim.ssim``. It differs from the Inria 3DGS training
SSIM, which zero-pads ('same' convolution) and averages over all H x W pixels.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_window", "lpips_if_available", "mean_std", "pixel_mask", "psnr", "ssim", "ssim_map"]


def _check_images(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim < 3:
        raise ValueError(f"images must be [..., H, W, C], got shape {tuple(pred.shape)}")


def pixel_mask(mask: Tensor, image_shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Mask [..., H, W] or [..., H, W, 1] -> ``dtype`` [..., H, W] broadcast to images ``image_shape``.

    The mask's leading dims broadcast against the images' (one [H, W] mask for a batch is fine).
    """
    h, w = image_shape[-3], image_shape[-2]
    if mask.ndim >= 3 and tuple(mask.shape[-3:]) == (h, w, 1):
        mask = mask[..., 0]
    if tuple(mask.shape[-2:]) != (h, w):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit images {tuple(image_shape)}")
    return mask.to(dtype).expand(image_shape[:-1])


def psnr(pred: Tensor, target: Tensor, mask: Tensor | None = None, *, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log10(data_range^2 / MSE).

    ``mask`` ([..., H, W] or [..., H, W, 1], bool or weights) restricts the MSE to the masked
    pixels (weighted mean over those pixels and all channels). Identical images give +inf.
    """
    _check_images(pred, target)
    err = (pred - target).square()
    if mask is None:
        mse = err.mean(dim=(-3, -2, -1))
    else:
        m = pixel_mask(mask, pred.shape, err.dtype)
        mse = (err.sum(dim=-1) * m).sum(dim=(-2, -1)) / (m.sum(dim=(-2, -1)) * pred.shape[-1])
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Tensor:
    """Normalised 1-D Gaussian taps exp(-x^2 / 2 sigma^2), x = -(size-1)/2 .. (size-1)/2."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def _blur_valid(x: Tensor, window: Tensor) -> Tensor:
    """Separable 'valid' Gaussian filter of every channel of x [B, C, H, W] (depthwise conv2d)."""
    c, k = x.shape[1], window.numel()
    x = F.conv2d(x, window.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, window.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim_map(pred: Tensor, target: Tensor, *, data_range: float = 1.0, window_size: int = 11,
             sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Per-pixel SSIM averaged over channels: [..., H - window_size + 1, W - window_size + 1].

    Pixel (i, j) of the map is the window centred on image pixel (i + r, j + r), r = window_size // 2.
    """
    _check_images(pred, target)
    *lead, h, w, c = pred.shape
    if h < window_size or w < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size} pixels, got {h}x{w}")
    x = pred.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    y = target.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    window = gaussian_window(window_size, sigma, dtype=pred.dtype, device=pred.device)
    stats = _blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), window)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(c, dim=1)
    var_x = e_xx - mu_x.square()
    var_y = e_yy - mu_y.square()
    cov = e_xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    s = s.mean(dim=1)
    return s.reshape(*lead, *s.shape[-2:])


def ssim(pred: Tensor, target: Tensor, mask: Tensor | None = None, *, data_range: float = 1.0,
         window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Mean SSIM per image (see the module docstring for the exact definition); differentiable.

    ``mask`` ([..., H, W] or [..., H, W, 1], bool or weights) weights the SSIM map by the mask value
    at each window's centre pixel, so only windows centred on masked pixels count (windows may
    still reach into unmasked pixels). An all-zero mask gives NaN.
    """
    s = ssim_map(pred, target, data_range=data_range, window_size=window_size, sigma=sigma, k1=k1, k2=k2)
    if mask is None:
        return s.mean(dim=(-2, -1))
    r = window_size // 2
    m = pixel_mask(mask, pred.shape, s.dtype)
    m = m[..., r : r + s.shape[-2], r : r + s.shape[-1]]
    return (s * m).sum(dim=(-2, -1)) / m.sum(dim=(-2, -1))


# torchvision checkpoints the lpips backbones load (torchvision.models URLs, file names only).
_LPIPS_BACKBONES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
_lpips_models: dict[tuple[str, str], torch.nn.Module] = {}


def _lpips_weights_present(net: str) -> bool:
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None or importlib.util.find_spec("torchvision") is None:
        return False
    linear = Path(spec.origin).parent / "weights" / "v0.1" / f"{net}.pth"
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_BACKBONES[net]
    return linear.is_file() and backbone.is_file()


def lpips_if_available(pred: Tensor, target: Tensor, net: str = "alex") -> Tensor | None:
    """LPIPS per image ([..., H, W, 3] in [0, 1]) when it can run offline, else None.

    Returns None unless the ``lpips`` package (and torchvision) is importable and both its linear
    weights (shipped inside the package) and the torchvision backbone checkpoint are already in
    the local torch hub cache: nothing is ever downloaded. Evaluation only (no gradients).
    """
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS net {net!r}; choose from {sorted(_LPIPS_BACKBONES)}")
    _check_images(pred, target)
    if not _lpips_weights_present(net):
        return None
    key = (net, str(pred.device))
    if key not in _lpips_models:
        import lpips  # type: ignore[import-not-found]

        _lpips_models[key] = lpips.LPIPS(net=net, verbose=False).eval().to(pred.device)
    model = _lpips_models[key]
    *lead, h, w, c = pred.shape
    x = pred.reshape(-1, h, w, c).permute(0, 3, 1, 2).float()
    y = target.reshape(-1, h, w, c).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        out = model(x, y, normalize=True)  # normalize: [0, 1] -> [-1, 1]
    return out.reshape(lead)


def mean_std(values: Iterable[float | Tensor], ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation of a list of per-image values, for eval tables.

    ``ddof=1`` (sample std, like nerfstudio's ns-eval ``*_std``); a single value gives std 0.
    Tensors are flattened, so a list of per-batch tensors works too.
    """
    parts = [np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v, dtype=np.float64).ravel() for v in values]
    arr = np.concatenate(parts) if parts else np.zeros(0)
    if arr.size == 0:
        raise ValueError("mean_std needs at least one value")
    std = float(arr.std(ddof=ddof)) if arr.size > ddof else 0.0
    return float(arr.mean()), std

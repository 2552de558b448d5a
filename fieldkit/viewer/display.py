"""Turning a method's render outputs into 8-bit images for the browser, and splats for three.js."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

RENDER_MODES = ("rgb", "depth", "alpha")
SPLAT_MODE = "splats (in browser)"


@lru_cache(maxsize=1)
def _turbo_lut() -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps["turbo"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H,W,3] float in [0,1] -> uint8 (rounded the way fieldkit.render.images.to_uint8 rounds)."""
    return (image.detach().float().cpu().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def colorize_depth(depth: torch.Tensor, alpha: torch.Tensor | None = None) -> np.ndarray:
    """[H,W,1] depth -> turbo-coloured uint8 [H,W,3]; near is blue, far is red, empty pixels black.

    The range is the 1st..99th percentile of depths where the view is mostly opaque, so a few
    stray far Gaussians do not wash out the picture.
    """
    d = depth.detach().float().cpu()[..., 0]
    a = alpha.detach().float().cpu()[..., 0] if alpha is not None else (d > 0).float()
    valid = (a > 0.5) & torch.isfinite(d) & (d > 0)
    if int(valid.sum()) < 2:
        return np.zeros((*d.shape, 3), dtype=np.uint8)
    values = d[valid]
    if values.numel() > 200_000:
        values = values[torch.linspace(0, values.numel() - 1, 200_000).long()]
    lo, hi = torch.quantile(values, torch.tensor([0.01, 0.99])).tolist()
    t = ((d - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
    rgb = _turbo_lut()[(t * 255).round().long().numpy()]
    weight = a.clamp(0, 1).numpy()[..., None]
    return (rgb * weight + 0.5).astype(np.uint8)


def display_image(outputs: dict[str, torch.Tensor], mode: str) -> tuple[np.ndarray, str | None]:
    """(uint8 [H,W,3] image of the first camera, note) for a render mode.

    ``note`` says why a different mode was shown (the method does not output that channel).
    """
    rgb = outputs["rgb"][0]
    if mode == "depth":
        if outputs.get("depth") is None:
            return to_uint8(rgb), "this method renders no depth; showing rgb"
        alpha = outputs.get("alpha")
        return colorize_depth(outputs["depth"][0], alpha[0] if alpha is not None else None), None
    if mode == "alpha":
        if outputs.get("alpha") is None:
            return to_uint8(rgb), "this method renders no alpha; showing rgb"
        return to_uint8(outputs["alpha"][0].expand(*outputs["alpha"][0].shape[:2], 3)), None
    return to_uint8(rgb), None


def compositing_depth(outputs: dict[str, torch.Tensor]) -> np.ndarray | None:
    """float32 [H,W] depth for the browser to hide scene primitives (frusta) behind the model.

    Pixels the model does not cover (alpha < 0.5) are sent as far away; None when the method
    renders no depth.
    """
    depth = outputs.get("depth")
    if depth is None:
        return None
    d = depth[0, ..., 0].detach().float().cpu()
    alpha = outputs.get("alpha")
    covered = (alpha[0, ..., 0].detach().float().cpu() > 0.5) if alpha is not None else d > 0
    far = torch.full_like(d, 1e3)
    d = torch.where(covered & torch.isfinite(d) & (d > 0), d, far)
    return d.numpy()


def splats_for_browser(splats) -> dict[str, np.ndarray]:
    """viser ``add_gaussian_splats`` arguments from :class:`fieldkit.models.gaussians.Splats`.

    The browser renderer takes DC colour only (no view-dependent SH) and full 3x3 covariances.
    """
    from fieldkit.cameras import quat_to_rotmat
    from fieldkit.models.gaussians import sh_dc_to_rgb

    means = splats.means.detach().float().cpu()
    R = quat_to_rotmat(splats.quats.detach().float().cpu())
    S = torch.exp(splats.log_scales.detach().float().cpu())
    M = R * S[:, None, :]
    cov = M @ M.transpose(1, 2)
    rgb = sh_dc_to_rgb(splats.sh[:, 0].detach().float().cpu()).clamp(0, 1)
    opacity = torch.sigmoid(splats.opacity_logits.detach().float().cpu())[:, None]
    return {
        "centers": means.numpy().astype(np.float32),
        "covariances": cov.numpy().astype(np.float32),
        "rgbs": rgb.numpy().astype(np.float32),
        "opacities": opacity.numpy().astype(np.float32),
    }

"""``fieldkit fit-image img.png``: the smallest demonstration of Coordinate-Aware Modulation.

Fits an image with a coordinate MLP, the CAM paper's image-regression setting: random Fourier
features of the pixel position (256 frequencies, sigma 10) -> 3 hidden layers x 256, ReLU ->
RGB, trained on every pixel with Adam and MSE. With CAM each hidden layer is followed by a
per-pixel LayerNorm without affine and a scale/shift read bilinearly from a 32 x 32 grid over
the image (border padding), initialised to identity and trained 10x faster than the MLP.
By default both variants are trained with the same seed and steps and their PSNRs compared.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import tyro
from torch import Tensor, nn

from fieldkit.fields.cam import ModulatedMLP, ModulationGrid


@dataclass
class FitImageCommand:
    """Fit an image with a coordinate MLP, with and without CAM, and compare PSNR."""

    image: tyro.conf.Positional[Path]
    """Image to fit (PNG/JPEG; alpha is dropped)."""
    steps: int = 2000
    max_size: int = 256
    """Downscale (Lanczos) so the longer side is at most this many pixels; 0 keeps the size."""
    batch: int = 8192
    """Random pixels per step (0: the whole image every step, as the paper; slow on a CPU)."""
    mode: Annotated[str, tyro.conf.arg(help="compare (both), cam, or plain")] = "compare"
    frequencies: int = 256
    sigma: float = 10.0
    hidden: int = 256
    layers: int = 3
    cam_grid: int = 32
    lr: float = 1e-3
    cam_lr_scale: float = 10.0
    seed: int = 0
    output: Annotated[Optional[Path], tyro.conf.arg(aliases=("-o",))] = None
    """Folder for the fitted images and results.json (default: outputs/fit-image/<image stem>)."""


class ImageField(nn.Module):
    """Fourier features -> MLP (optionally CAM-modulated) -> RGB at pixel coordinates in [0, 1]^2.

    Coordinates are pixel centres divided by the longer side (as in the FFN image-regression code
    CAM builds on), so ``sigma`` counts cycles per image side; the CAM grid spans the image.
    """

    def __init__(self, frequencies: int = 256, sigma: float = 10.0, hidden: int = 256, layers: int = 3,
                 cam: bool = False, cam_grid: int = 32, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("B", torch.randn(frequencies, 2, generator=generator) * sigma)
        self.mlp = ModulatedMLP(2 * frequencies, hidden, layers, 3, normalize=cam)
        self.cam = ModulationGrid(layers, (cam_grid, cam_grid)) if cam else None

    def forward(self, coords: Tensor, grid_coords: Tensor | None = None) -> Tensor:
        """coords [N, 2] in [0, 1]; grid_coords [N, 2] in [-1, 1] for the CAM grid (default 2 coords - 1)."""
        proj = 2 * math.pi * coords @ self.B.T
        features = torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1)
        if self.cam is None:
            return self.mlp(features)
        return self.mlp(features, self.cam(grid_coords if grid_coords is not None else coords * 2 - 1))


def load_image(path: Path, max_size: int = 0) -> Tensor:
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        img = Image.open(path).convert("RGB")
    except Exception as error:
        raise ValueError(f"{path}: not a readable image ({error})") from error
    if max_size and max(img.size) > max_size:
        scale = max_size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


def pixel_coords(height: int, width: int) -> tuple[Tensor, Tensor]:
    """Pixel centres (row-major), as ([H*W, 2] (x, y) / longer side in [0, 1], [H*W, 2] in [-1, 1]
    across the image for the CAM grid)."""
    size = max(height, width)
    y, x = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    x, y = x.reshape(-1), y.reshape(-1)
    return torch.stack([x / size, y / size], dim=-1), torch.stack([x / width * 2 - 1, y / height * 2 - 1], dim=-1)


def fit(image: Tensor, *, cam: bool, steps: int, seed: int = 0, lr: float = 1e-3, cam_lr_scale: float = 10.0,
        frequencies: int = 256, sigma: float = 10.0, hidden: int = 256, layers: int = 3, cam_grid: int = 32,
        batch: int = 0, log_every: int = 0) -> dict:
    """Train one variant (on ``batch`` random pixels per step, or all of them when 0); returns
    psnr over the whole image, params, seconds and the fitted image."""
    H, W, _ = image.shape
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear initialisation: same MLP weights for both variants
    model = ImageField(frequencies, sigma, hidden, layers, cam, cam_grid, generator=gen)
    groups = [{"params": list(model.mlp.parameters()), "lr": lr}]
    if model.cam is not None:
        groups.append({"params": list(model.cam.parameters()), "lr": lr * cam_lr_scale})
    optimizer = torch.optim.Adam(groups)
    coords, grid_coords = pixel_coords(H, W)
    target = image.reshape(-1, 3)
    started = time.perf_counter()
    pixels = coords.shape[0]
    for step in range(steps):
        if batch and batch < pixels:
            pick = torch.randint(0, pixels, (batch,), generator=gen)
            pred, goal = model(coords[pick], grid_coords[pick]), target[pick]
        else:
            pred, goal = model(coords, grid_coords), target
        loss = torch.mean((pred - goal) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  {'cam' if cam else 'plain'} step {step + 1}: batch psnr {-10 * math.log10(float(loss.detach())):.2f}", flush=True)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        pred = model(coords, grid_coords).clamp(0, 1)
        mse = float(torch.mean((pred - target) ** 2))
    return {
        "psnr": -10 * math.log10(max(mse, 1e-12)),
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "image": pred.reshape(H, W, 3),
    }


def run_fit_image(cmd: FitImageCommand) -> dict:
    if cmd.mode not in ("compare", "cam", "plain"):
        raise ValueError(f"--mode must be compare, cam or plain, got {cmd.mode!r}")
    image = load_image(cmd.image, cmd.max_size)
    H, W, _ = image.shape
    out_dir = cmd.output or Path("outputs") / "fit-image" / Path(cmd.image).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = {"compare": (False, True), "cam": (True,), "plain": (False,)}[cmd.mode]
    per_step = f"{cmd.batch} random pixels" if cmd.batch and cmd.batch < H * W else "all pixels"
    print(f"Fitting {cmd.image} at {W}x{H} for {cmd.steps} steps of {per_step} ({', '.join('cam' if v else 'plain' for v in variants)})")
    results = {}
    from fieldkit.render.images import save_png

    for use_cam in variants:
        name = "cam" if use_cam else "plain"
        r = fit(image, cam=use_cam, steps=cmd.steps, seed=cmd.seed, lr=cmd.lr, cam_lr_scale=cmd.cam_lr_scale,
                frequencies=cmd.frequencies, sigma=cmd.sigma, hidden=cmd.hidden, layers=cmd.layers,
                cam_grid=cmd.cam_grid, batch=cmd.batch, log_every=max(1, cmd.steps // 5))
        save_png(out_dir / f"{name}.png", r.pop("image"))
        results[name] = r
        print(f"{name:<6} PSNR {r['psnr']:.2f} dB   params {r['params']:,}   {r['seconds']:.1f} s")
    if "cam" in results and "plain" in results:
        gain = results["cam"]["psnr"] - results["plain"]["psnr"]
        extra = results["cam"]["params"] / results["plain"]["params"] - 1
        results["cam_gain_db"] = gain
        print(f"CAM: {gain:+.2f} dB with {100 * extra:.1f}% more parameters")
    (out_dir / "results.json").write_text(json.dumps({"image": str(cmd.image), "size": [W, H], "steps": cmd.steps, **results}, indent=2) + "\n")
    print(f"Wrote {out_dir}")
    return results

"""Radiance fields (``--method nerf``): an Instant-NGP-class field on the volume renderer.

Hash grid -> density MLP -> SH view encoding -> colour MLP (:mod:`fieldkit.models.radiance_field`),
rendered with :mod:`fieldkit.render.volume`: rays through random pixels of all training views,
an occupancy grid refreshed every few steps, stratified samples in occupied cells, early ray
termination. Options: CAM (``--cam/--no-cam``) and the S3IM loss (``--nerf.s3im-weight`` or
``--s3im-weight`` for the chosen method).

Training follows nerfacc's Instant-NGP example: Adam (lr 1e-2, eps 1e-15), 100-step linear
warm-up, x0.33 at 50/75/90 % of the run; MSE on rays against targets re-composited on a random
background colour (scenes with alpha), so empty space learns to be empty.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import tyro
from torch import Tensor

from fieldkit.cameras import Cameras
from fieldkit.data.scene import Scene
from fieldkit.fields.hashgrid import HashGridConfig, per_level_scale_for
from fieldkit.fields.occupancy import OccupancyGrid
from fieldkit.losses_s3im import s3im_loss
from fieldkit.methods.base import Method, pick_device
from fieldkit.models.radiance_field import FieldConfig, RadianceField
from fieldkit.render.volume import SceneSpace, camera_rays, pixel_rays, render_rays


@dataclass
class NerfConfig:
    """Instant-NGP-style radiance field options."""

    cam: Annotated[bool, tyro.conf.arg(aliases=("--cam",))] = True
    """Coordinate-Aware Modulation of the MLPs' hidden layers (scale/shift grids, LayerNorm); on by
    default: +0.75 dB on lego_200 at 1000 steps for 0.22 % more parameters (about 25 % more CPU per step)."""
    cam_coord: str = "xyz"
    """CAM coordinate: xyz (3-D grid over the scene cube, all hidden layers) or dir (view direction, colour MLP)."""
    cam_resolution: tuple[int, ...] = (16, 16, 16)
    """CAM grid size per coordinate axis (3 values for xyz, 2 for dir)."""
    cam_lr_scale: float = 10.0
    """CAM grids learn this many times faster than the MLPs (the paper: 10x)."""
    cam_normalize: bool = True
    """LayerNorm (no affine) before each modulation, as CAM pairs with feature normalisation."""
    s3im_weight: float = 0.0
    """Weight of the S3IM loss added to the MSE (the paper uses 1.0); 0 disables it."""
    s3im_repeats: int = 10
    s3im_kernel: int = 4
    s3im_stride: int = 4
    s3im_patch_height: int = 64
    rays_per_batch: int = 4096
    """Rays in the first step (64 x 64 = 4096 is S3IM's virtual patch); then see target_samples."""
    target_samples: int = 1 << 16
    """Adapt the rays per step (in multiples of 64) so each step renders about this many samples
    (nerfacc's dynamic batch); 0 keeps rays_per_batch fixed."""
    max_rays_per_batch: int = 1 << 14
    n_levels: int = 8
    n_features_per_level: int = 4
    """8 levels x 4 features: instant-ngp's current NeRF grid (since 2023), half the lookups of 16 x 2."""
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    finest_resolution: int = 1024
    """Finest hash-grid level across the scene cube (sets the per-level scale)."""
    hidden: int = 64
    geo_features: int = 15
    density_layers: int = 1
    color_layers: int = 2
    lr: float = 1e-2
    weight_decay: float = 1e-6
    """L2 on the MLP weights (instant-ngp's 1e-6)."""
    warmup_steps: int = 100
    samples_per_diagonal: int = 256
    """Render step = scene-box diagonal / this (bounded); the cube side / this for contracted scenes."""
    grid_resolution: int = 128
    """Occupancy grid cells per axis."""
    grid_update_every: int = 16
    grid_warmup_steps: int = 256
    grid_cells_per_update: int = 1 << 16
    occupancy_threshold: float = 0.01
    """A cell is empty when its opacity over one render step stays below this (or below the mean)."""
    early_stop_eps: float = 1e-4
    random_background: bool = True
    """Train against targets re-composited on random colours (needs images with alpha)."""
    contract: str = "auto"
    """auto: bounded box when the format gives one (Blender), else contraction; or 'box' / 'contract'."""
    far: float = 1e3
    """Far limit (in box half-sizes) for contracted scenes."""
    outer_samples: int = 48
    """Samples per ray outside the box, uniform in disparity (contracted scenes)."""
    eval_chunk: int = 8192
    implementation: str = "auto"
    """Hash-grid implementation: auto, torch, native (C++/CUDA kernel), tcnn (overridden by --backend)."""

    def field_config(self) -> FieldConfig:
        grid = HashGridConfig(
            self.n_levels, self.n_features_per_level, self.log2_hashmap_size, self.base_resolution,
            per_level_scale_for(self.finest_resolution, self.base_resolution, self.n_levels),
        )
        return FieldConfig(
            grid=grid, hidden=self.hidden, density_layers=self.density_layers, color_layers=self.color_layers,
            geo_features=self.geo_features, cam=self.cam, cam_coord=self.cam_coord,
            cam_resolution=tuple(self.cam_resolution), cam_normalize=self.cam_normalize,
            implementation=self.implementation,
        )


_BACKEND_TO_IMPLEMENTATION = {"auto": None, "torch": "torch", "cpu": "native", "cuda": "native", "gsplat": None}


def scene_space_for(scene: Scene, mode: str = "auto") -> SceneSpace:
    """The box fields live in: the format's box (Blender) or, for captures without one, a box
    around what the training cameras see, contracted beyond it."""
    if mode not in ("auto", "box", "contract"):
        raise ValueError(f"contract must be auto, box or contract, got {mode!r}")
    if scene.scene_box is not None and mode in ("auto", "box"):
        return SceneSpace.from_box(scene.scene_box.float(), contracted=False)
    box = _frustum_box(scene) if scene.near_far is not None else scene.bounds.float()
    return SceneSpace.from_box(box, contracted=(mode != "box"))


def _frustum_box(scene: Scene) -> Tensor:
    """Box around the training frusta between the near bound and twice the near bound (LLFF-style captures).

    Forward-facing captures put most detail close to the near bound; the contraction handles the rest.
    """
    idx = scene.split.get("train", torch.arange(len(scene)))
    cams = scene.cameras[idx]
    nf = scene.near_far[idx].double()
    W, H = cams.width, cams.height
    corners = torch.tensor([[0, 0], [W, 0], [0, H], [W, H], [W / 2, H / 2]], dtype=torch.float64)
    K = cams.K.double()
    pts = []
    c2w = cams.cam_to_world.double()
    for depth_col, factor in ((0, 1.0), (0, 2.0)):
        d = nf[:, depth_col] * factor
        x = (corners[None, :, 0] - K[:, None, 0, 2]) / K[:, None, 0, 0] * d[:, None]
        y = (corners[None, :, 1] - K[:, None, 1, 2]) / K[:, None, 1, 1] * d[:, None]
        cam_pts = torch.stack([x, y, d[:, None].expand_as(x), torch.ones_like(x)], dim=-1)
        pts.append((c2w[:, None] @ cam_pts[..., None])[..., :3, 0].reshape(-1, 3))
    pts = torch.cat(pts + [cams.centers.double()])
    lo, hi = pts.min(0).values, pts.max(0).values
    pad = 0.05 * (hi - lo)
    return torch.stack([lo - pad, hi + pad]).float()


def lr_factor(step: int, max_steps: int, warmup: int) -> float:
    """Linear warm-up from 0.01, then x0.33 at 50 %, 75 % and 90 % of the run (nerfacc's NGP schedule)."""
    factor = 0.01 + 0.99 * min(1.0, step / max(warmup, 1)) if warmup > 0 else 1.0
    for milestone in (0.5, 0.75, 0.9):
        if step >= int(milestone * max_steps):
            factor *= 0.33
    return factor


class NeRF(Method):
    """Train a hash-grid radiance field on posed images."""

    name = "nerf"
    export_formats = ("mesh",)

    def __init__(self, config: NerfConfig, scene: Scene, *, max_steps: int, backend: str = "auto", seed: int = 0,
                 device: str | torch.device = "auto"):
        self.config = config
        self.scene = scene
        self.max_steps = max_steps
        self.device = pick_device(device, backend)
        self.generator = torch.Generator().manual_seed(seed)
        field_config = config.field_config()
        implementation = _BACKEND_TO_IMPLEMENTATION.get(backend)
        if implementation is not None and config.implementation == "auto":
            field_config.implementation = implementation
        self.model = RadianceField(field_config, generator=self.generator).to(self.device)
        self.space = scene_space_for(scene, config.contract).to(self.device)
        self.grid = OccupancyGrid(config.grid_resolution, self.device)
        if self.space.contracted:
            self.step_size = float(2 * self.space.half_size.max()) * math.sqrt(3) / config.samples_per_diagonal
        else:
            self.step_size = float(2 * self.space.half_size.norm()) / config.samples_per_diagonal
        self.background = scene.background.to(self.device).float()

        idx = scene.split.get("train", torch.arange(len(scene)))
        self.train_images = scene.images[idx].to(self.device)
        self.train_alphas = scene.alphas[idx].to(self.device) if scene.alphas is not None else None
        self.train_cameras = scene.cameras[idx].to(self.device)
        if self.space.contracted:
            self.near = 0.0
            self.far = float(config.far * self.space.half_size.max())
            if scene.near_far is not None:
                self.near = float(scene.near_far[idx, 0].min()) * 0.9
        else:
            self.near, self.far = 0.0, 1e10
        self.optimizer = self._make_optimizer()
        self.rays_per_batch = config.rays_per_batch

    # -- set-up -----------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Adam:
        c = self.config
        groups = [
            {"params": self.model.grid_parameters(), "lr": c.lr, "name": "grid", "base_lr": c.lr, "weight_decay": 0.0},
            {"params": self.model.mlp_parameters(), "lr": c.lr, "name": "mlp", "base_lr": c.lr, "weight_decay": c.weight_decay},
        ]
        if self.model.cam is not None:
            lr = c.lr * c.cam_lr_scale
            groups.append({"params": self.model.cam_parameters(), "lr": lr, "name": "cam", "base_lr": lr, "weight_decay": 0.0})
        try:  # the fused kernel is ~10x faster on CPU for a multi-million-entry table
            return torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15, fused=True)
        except (RuntimeError, TypeError):
            return torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)

    def n_params(self) -> int:
        return self.model.n_params()

    # -- training ---------------------------------------------------------------------------
    def _density_fn(self, points: Tensor):
        return self.model.density(points, return_encoding=True)

    def _update_grid(self, step: int) -> None:
        c = self.config
        if step % c.grid_update_every != 0:
            return
        warm = step < c.grid_warmup_steps
        n = c.grid_cells_per_update
        self.grid.update(
            lambda u: self.model.density(u) * self.step_size,
            threshold=c.occupancy_threshold,
            n_uniform=4 * n if warm else n,
            n_occupied=0 if warm else n,
            generator=self.generator,
        )

    def _sample_batch(self) -> tuple[Tensor, Tensor, Tensor | None]:
        n_img, H, W = self.train_images.shape[:3]
        B = self.rays_per_batch
        flat = torch.randint(0, n_img * H * W, (B,), generator=self.generator).to(self.device)
        img, rem = flat // (H * W), flat % (H * W)
        row, col = rem // W, rem % W
        target = self.train_images[img, row, col]
        alpha = self.train_alphas[img, row, col] if self.train_alphas is not None else None
        return torch.stack([img, row, col], dim=-1), target, alpha

    def _render(self, rays, background: Tensor, stratified: bool):
        return render_rays(
            self.model, rays, self.space, self.step_size, background=background, density_fn=self._density_fn,
            occupancy=self.grid, near=self.near, far=self.far, outer_samples=self.config.outer_samples,
            stratified=stratified, generator=self.generator, early_stop_eps=self.config.early_stop_eps,
        )

    def train_step(self, step: int) -> dict[str, float]:
        c = self.config
        self.model.train()
        factor = lr_factor(step, self.max_steps, c.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self._update_grid(step)
        pix, target, alpha = self._sample_batch()
        rays = pixel_rays(self.train_cameras, pix[:, 0], pix[:, 2], pix[:, 1])
        if c.random_background and alpha is not None:
            bg = torch.rand(len(rays), 3, generator=self.generator).to(self.device)
            target = target + (1.0 - alpha) * (bg - self.background)
        else:
            bg = self.background
        out = self._render(rays, bg, stratified=True)
        mse = torch.mean((out.rgb - target) ** 2)
        loss = mse
        stats: dict[str, float] = {}
        if c.s3im_weight > 0:
            s3im = s3im_loss(out.rgb, target, kernel_size=c.s3im_kernel, stride=c.s3im_stride, repeats=c.s3im_repeats,
                             patch_height=c.s3im_patch_height, generator=self.generator)
            loss = loss + c.s3im_weight * s3im
            stats["s3im"] = float(s3im.detach())
        self.optimizer.zero_grad(set_to_none=True)
        if out.n_samples > 0:
            loss.backward()
            self.optimizer.step()
        if c.target_samples > 0 and out.n_samples > 0:  # nerfacc's dynamic batch, in multiples of 64 rays
            want = self.rays_per_batch * c.target_samples / out.n_samples
            self.rays_per_batch = int(min(max(64, round(want / 64) * 64), c.max_rays_per_batch))
        stats.update({
            "loss": float(loss.detach()),
            "rays": float(len(target)),
            "psnr": float(-10 * torch.log10(mse.detach().clamp_min(1e-10))),
            "samples_per_ray": out.n_samples / len(target),
        })
        return stats

    @torch.no_grad()
    def render(self, cameras: Cameras) -> dict[str, Tensor]:
        self.model.eval()
        outs = []
        cameras = cameras.to(self.device)
        for i in range(len(cameras)):
            rays = camera_rays(cameras, i)
            parts = [self._render(rays[j : j + self.config.eval_chunk], self.background, stratified=False)
                     for j in range(0, len(rays), self.config.eval_chunk)]
            H, W = cameras.height, cameras.width
            outs.append({
                "rgb": torch.cat([p.rgb for p in parts]).reshape(1, H, W, 3).clamp(0, 1),
                "alpha": torch.cat([p.opacity for p in parts]).reshape(1, H, W, 1),
                "depth": torch.cat([p.depth for p in parts]).reshape(1, H, W, 1),
            })
        return {k: torch.cat([o[k] for o in outs]) for k in ("rgb", "alpha", "depth")}

    def stats(self) -> dict[str, float]:
        return {"occupied_pct": 100.0 * self.grid.occupancy_fraction()}

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "grid": self.grid.state_dict(),
            "space": self.space.state(),
            "generator": self.generator.get_state(),
            "rays_per_batch": self.rays_per_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict({k: v.to(self.device) for k, v in state["model"].items()})
        self.optimizer = self._make_optimizer()
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.grid.load_state_dict(state["grid"])
        if "space" in state:
            self.space = SceneSpace.from_state(state["space"]).to(self.device)
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.rays_per_batch = int(state.get("rays_per_batch", self.config.rays_per_batch))

    def export(self, fmt: str, path: Path) -> Path:
        if fmt != "mesh":
            raise ValueError(f"method nerf exports mesh, not {fmt!r}")
        from fieldkit.export.mesh import export_field_mesh

        path = Path(path)
        return export_field_mesh(self, path if path.suffix.lower() == ".ply" else path.with_suffix(".ply"))


def config_to_dict(config: NerfConfig) -> dict[str, Any]:
    return asdict(config)

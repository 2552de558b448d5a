"""3D Gaussian splatting (``--method gs``): the 3DGS recipe on the project's rasterizer."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fieldkit.cameras import Cameras
from fieldkit.data.scene import Scene
from fieldkit.losses import gaussian_splat_loss
from fieldkit.methods.base import Method, pick_device
from fieldkit.models.gaussians import Splats, rgb_to_sh_dc
from fieldkit.optim.densify import Densifier, DensifyConfig, prune_extent
from fieldkit.optim.levenberg_marquardt import LMConfig
from fieldkit.optim.schedules import exponential_decay
from fieldkit.render import rasterize

PARAM_NAMES = ("means", "quats", "log_scales", "opacity_logits", "sh_dc", "sh_rest")


@dataclass
class GSConfig:
    """Gaussian splatting options (3DGS defaults unless noted)."""

    sh_degree: int = 3
    """Highest spherical-harmonic degree; raised by one every ``sh_degree_interval`` steps."""
    sh_degree_interval: int = 1000
    """Steps per SH degree at 30k steps (scaled to the run length)."""
    init_random_points: int = 20_000
    """Random initial Gaussians when the scene has no sparse points (3DGS uses 100k on Blender; fewer is much faster on a CPU)."""
    init_opacity: float = 0.1
    ssim_lambda: float = 0.2
    s3im_weight: float = 0.0
    """Weight of the S3IM loss (patch form: 4096 random pixels of the rendered view); 0 disables it."""
    lr_means: float = 1.6e-4
    lr_means_final: float = 1.6e-6
    """Position learning rates (x scene extent), decayed log-linearly over the run."""
    lr_sh_dc: float = 2.5e-3
    lr_sh_rest: float = 2.5e-3 / 20
    lr_opacity: float = 0.05
    lr_scales: float = 0.005
    lr_quats: float = 0.001
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    optimizer: Literal["adam", "lm"] = "adam"
    """adam, or lm: Adam through densification, then Levenberg-Marquardt for the last lm.iterations steps (3DGS-LM)."""
    lm: LMConfig = field(default_factory=LMConfig)
    scale_schedule_to_steps: bool = True
    """Stretch densification and SH schedules (written for 30k steps) to --max-steps."""


def _nearest_neighbour_scale(points: Tensor) -> Tensor:
    """Per point sqrt(mean squared distance to its 3 nearest neighbours) (3DGS scale init)."""
    from scipy.spatial import cKDTree

    pts = points.detach().cpu().double().numpy()
    k = min(4, len(pts))
    if k < 2:
        return torch.full((len(pts),), 0.01)
    dist, _ = cKDTree(pts).query(pts, k=k)
    mean_sq = (dist[:, 1:] ** 2).mean(axis=1)
    return torch.from_numpy(np.sqrt(np.maximum(mean_sq, 1e-14))).float()


def initial_splats(scene: Scene, config: GSConfig, generator: torch.Generator) -> Splats:
    """Gaussians at the scene's sparse points, or uniformly random inside its bounds."""
    if scene.points is not None and len(scene.points) > 0:
        means = scene.points.float()
        colors = scene.point_colors.float() if scene.point_colors is not None else torch.full_like(means, 0.5)
    else:
        low, high = scene.bounds
        means = low + (high - low) * torch.rand(config.init_random_points, 3, generator=generator)
        colors = torch.rand(config.init_random_points, 3, generator=generator)
    n = len(means)
    sh = torch.zeros(n, (config.sh_degree + 1) ** 2, 3)
    sh[:, 0] = rgb_to_sh_dc(colors)
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1
    log_scales = torch.log(_nearest_neighbour_scale(means))[:, None].repeat(1, 3)
    opacity_logits = torch.full((n,), math.log(config.init_opacity / (1 - config.init_opacity)))
    return Splats(means, quats, log_scales, opacity_logits, sh)


class GaussianSplatting(Method):
    """Train Gaussians on posed images with Adam, the 3DGS loss and adaptive density control."""

    name = "gs"
    export_formats = ("ply", "splat", "lod")

    def __init__(self, config: GSConfig, scene: Scene, *, max_steps: int, backend: str = "auto", seed: int = 0, device: str | torch.device = "auto"):
        self.config = config
        self.scene = scene
        self.max_steps = max_steps
        self.backend = backend
        self.device = pick_device(device, backend)
        self.generator = torch.Generator().manual_seed(seed)
        densify = config.densify.scaled_to(max_steps) if config.scale_schedule_to_steps else config.densify
        self.sh_interval = max(1, round(config.sh_degree_interval * max_steps / 30_000)) if config.scale_schedule_to_steps else config.sh_degree_interval
        self.scene_extent = scene.scene_extent
        self.train_images, self.train_cameras = scene.subset("train")
        self.train_images = self.train_images.to(self.device)
        self.train_cameras = self.train_cameras.to(self.device)
        self.background = scene.background.to(self.device).float()
        self._order: list[int] = []

        splats = initial_splats(scene, config, self.generator)
        self.params = {
            "means": splats.means,
            "quats": splats.quats,
            "log_scales": splats.log_scales,
            "opacity_logits": splats.opacity_logits,
            "sh_dc": splats.sh[:, :1],
            "sh_rest": splats.sh[:, 1:],
        }
        self.params = {k: torch.nn.Parameter(v.to(self.device).contiguous()) for k, v in self.params.items()}
        self.optimizer = self._make_optimizer()
        self.densifier = Densifier(densify, self.scene_extent, len(splats), self.device,
                                   prune_extent(self.scene_extent, self.train_cameras.centers, self.params["means"]))
        self.lm_phase = None
        if config.optimizer == "lm":
            from fieldkit.optim.levenberg_marquardt import SplatLMPhase

            self.lm_phase = SplatLMPhase(config.lm, max_steps, densify.stop_step, self.device)

    def _make_optimizer(self) -> torch.optim.Adam:
        c = self.config
        lrs = {
            "means": c.lr_means * self.scene_extent,
            "quats": c.lr_quats,
            "log_scales": c.lr_scales,
            "opacity_logits": c.lr_opacity,
            "sh_dc": c.lr_sh_dc,
            "sh_rest": c.lr_sh_rest,
        }
        groups = [{"params": [self.params[name]], "lr": lrs[name], "name": name} for name in PARAM_NAMES]
        return torch.optim.Adam(groups, lr=0.0, eps=1e-15)

    # -- training ---------------------------------------------------------------------------

    def active_sh_degree(self, step: int) -> int:
        return min(self.config.sh_degree, step // self.sh_interval)

    def _next_view(self) -> int:
        if not self._order:
            self._order = torch.randperm(len(self.train_cameras), generator=self.generator).tolist()
        return self._order.pop()

    def _render_params(self, cameras: Cameras, sh_degree: int):
        p = self.params
        return rasterize(
            p["means"],
            p["quats"],
            torch.exp(p["log_scales"]),
            torch.sigmoid(p["opacity_logits"]),
            torch.cat([p["sh_dc"], p["sh_rest"]], dim=1),
            cameras,
            sh_degree=sh_degree,
            background=self.background,
            backend=self.backend,
        )

    def train_step(self, step: int) -> dict[str, float]:
        if self.lm_phase is not None and self.lm_phase.active(step):
            stats = self.lm_phase.train_step(self, step)
            if stats is not None:
                return stats
        view = self._next_view()
        camera = self.train_cameras[view]
        target = self.train_images[view : view + 1]
        for group in self.optimizer.param_groups:
            if group["name"] == "means":
                group["lr"] = exponential_decay(
                    step, self.config.lr_means * self.scene_extent, self.config.lr_means_final * self.scene_extent, self.max_steps
                )
        out = self._render_params(camera, self.active_sh_degree(step))
        loss = gaussian_splat_loss(out.rgb, target, self.config.ssim_lambda)
        if self.config.s3im_weight > 0:
            from fieldkit.losses_s3im import s3im_image_loss

            loss = loss + self.config.s3im_weight * s3im_image_loss(out.rgb, target, generator=self.generator)
        loss.backward()
        if out.means2d.grad is not None:
            self.densifier.observe(out.means2d.grad, out.radii, camera.width, camera.height)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        white = bool(torch.all(self.background == 1.0))
        changes = self.densifier.step(step + 1, self.params, self.optimizer, white_background=white)
        with torch.no_grad():
            mse = torch.mean((out.rgb.detach().clamp(0, 1) - target) ** 2)
        stats = {"loss": float(loss.detach()), "psnr": float(-10 * torch.log10(mse.clamp_min(1e-10)))}
        stats.update({k: float(v) for k, v in changes.items()})
        return stats

    @torch.no_grad()
    def render(self, cameras: Cameras) -> dict[str, Tensor]:
        outs = [self._render_params(cameras[i].to(self.device), self.config.sh_degree) for i in range(len(cameras))]
        return {
            "rgb": torch.cat([o.rgb for o in outs]).clamp(0, 1),
            "alpha": torch.cat([o.alpha for o in outs]),
            "depth": torch.cat([o.depth for o in outs]),
        }

    def stats(self) -> dict[str, float]:
        return {"gaussians": float(self.params["means"].shape[0])}

    # -- persistence --------------------------------------------------------------------------

    def splats(self) -> Splats:
        p = {k: v.detach().cpu() for k, v in self.params.items()}
        return Splats(p["means"], p["quats"], p["log_scales"], p["opacity_logits"], torch.cat([p["sh_dc"], p["sh_rest"]], dim=1))

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.detach().cpu() for k, v in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "order": list(self._order),
            "densifier": {k: getattr(self.densifier, k).detach().cpu() for k in ("grad_sum", "visible_count", "max_radius")},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.params = {k: torch.nn.Parameter(v.to(self.device).contiguous()) for k, v in state["params"].items()}
        self.optimizer = self._make_optimizer()
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self._order = list(state.get("order", []))
        self.densifier._reset_stats(self.params["means"].shape[0], self.device)
        for key, value in state.get("densifier", {}).items():  # statistics gathered since the last refine
            setattr(self.densifier, key, value.to(self.device))

    def hierarchy(self):
        """A level-of-detail tree over the current Gaussians (``fieldkit.models.hierarchy``)."""
        from fieldkit.models.hierarchy import hierarchy_from_splats

        return hierarchy_from_splats(self.splats())

    def export(self, fmt: str, path: Path) -> Path:
        from fieldkit.export import write_ply, write_splat

        if fmt == "lod":
            from fieldkit.export.lod import write_lod

            return write_lod(path, self.hierarchy(), background=self.background, **self._lod_options())
        writers = {"ply": write_ply, "splat": write_splat}
        if fmt not in writers:
            raise ValueError(f"method {self.name} exports {', '.join(self.export_formats)}, not {fmt!r}")
        writers[fmt](path, self.splats())
        return Path(path)

    def _lod_options(self) -> dict[str, Any]:
        return {}


def config_to_dict(config: GSConfig) -> dict[str, Any]:
    return asdict(config)

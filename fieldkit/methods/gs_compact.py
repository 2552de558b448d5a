"""Compact Gaussians (``--method gs-compact``): Compact-3DGS (Lee et al., CVPR 2024) on the 3DGS recipe.

Differences from ``gs`` (see docs/compact.md):
* a learnable volume mask per Gaussian (straight-through, multiplies scale and opacity), a mask
  loss λ_m·mean(σ(m)) (λ_m shrinks for runs longer than ``mask_reference_steps``), and hard pruning of σ(m) <= 0.01 at every densification refine and every
  ``mask_prune_every`` steps afterwards;
* colour from a shared hash-grid field at the contracted centre + an MLP on the view direction and
  a few per-Gaussian features (``color_features``, 4 by default; no per-Gaussian SH), plus a per-Gaussian
  RGB offset (``color_residual``, on by default) and, optionally, per-Gaussian SH coefficients of
  degrees 1..D (``sh_residual_degree``);
* residual VQ of scale (after exp), unit rotation (and the SH residual) for the last ``rvq_steps`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fieldkit.cameras import Cameras
from fieldkit.data.scene import Scene
from fieldkit.fields.hashgrid import HashGridConfig
from fieldkit.losses import gaussian_splat_loss
from fieldkit.methods.base import pick_device
from fieldkit.methods.gs import GaussianSplatting, GSConfig, initial_splats
from fieldkit.models.compact import ColorField, ResidualVQ, gaussian_sh, straight_through_mask, MASK_EPS
from fieldkit.models.gaussians import Splats
from fieldkit.optim.adam_surgery import replace_rows
from fieldkit.optim.densify import Densifier, DensifyConfig, REFERENCE_STEPS, prune_extent
from fieldkit.optim.schedules import exponential_decay
from fieldkit.render import rasterize


@dataclass
class CompactConfig:
    """Compact Gaussians options (Compact-3DGS NeRF-Synthetic defaults unless noted)."""

    init_random_points: int = 20_000
    init_opacity: float = 0.1
    ssim_lambda: float = 0.2
    lr_means: float = 1.6e-4
    lr_means_final: float = 1.6e-6
    lr_opacity: float = 0.05
    lr_scales: float = 0.005
    lr_quats: float = 0.001
    lambda_mask: float = 0.01
    """Mask loss weight for a run of ``mask_reference_steps`` steps (Compact-3DGS: 4e-3 synthetic, 5e-4 real scenes,
    at 30k steps). Longer runs use lambda_mask * mask_reference_steps / max_steps (see mask_reference_steps)."""
    mask_reference_steps: int = 3000
    """The mask loss only pushes masks down (the opacity and scale absorb the photometric pull on the straight-through
    mask), so its effect grows with the step count: at 10k steps and weight 0.01 it pruned lego from 60k to 2k
    Gaussians (26.6 dB). The weight is therefore divided by max_steps / mask_reference_steps for longer runs
    (never raised for shorter ones); 0 turns the scaling off."""
    mask_lr: float = 0.01
    mask_prune_every: int = 1000
    """Hard-prune masked Gaussians this often (at 30k steps; scaled) after densification."""
    hash_levels: int = 16
    hash_features: int = 2
    hash_log2_size: int = 11
    """log2 hash-table size T (Compact-3DGS: 19 real, 16 synthetic). Small here: with the per-Gaussian colour
    offsets the field mainly carries view dependence, and at CPU-scale Gaussian counts the table would dominate the file."""
    hash_base_resolution: int = 16
    hash_per_level_scale: float = 1.447
    mlp_hidden: int = 64
    net_lr: float = 0.01
    net_warmup: int = 100
    net_lr_steps: tuple[int, ...] = (20000, 27000)
    """Steps (of 30k; scaled to the run) at which the colour field's learning rate is multiplied by 0.33
    (Compact-3DGS: 5k, 15k, 25k; at 3000-step runs that left the field 500 steps at full rate, -0.5 dB on lego)."""
    rvq_stages: int = 2
    rvq_codebook_size: int = 256
    """2 stages x 256 codes (16 bits) per quantised vector; Compact-3DGS uses 6 x 64 (36 bits). On lego a third
    stage is worth about 0.05 dB each for scale and rotation (a third more index bytes)."""
    rvq_steps: int = 1000
    """Residual VQ is on for the last rvq_steps (of 30k; scaled to the run, at least 10)."""
    rvq_lr: float = 1e-4
    rvq_kmeans_iters: int = 5
    color_residual: bool = True
    """Add a per-Gaussian colour offset (3 values, 6 bits each in the .fkc) to the field's output: the field
    keeps the view dependence, the offset the detail a small hash table cannot hold."""
    lr_color_residual: float = 0.0025
    color_output: str = "sigmoid"
    """How the field's MLP output becomes colour: sigmoid (colour in (0, 1), mapped to the SH DC coefficient) or
    linear (the output is the DC coefficient, Compact-3DGS). With linear, the renderer's clamp at 0 let the
    shared field drift negative on fern until every Gaussian was black (an irreversible collapse, -6.9 dB)."""
    sh_residual_degree: int = 0
    """Per-Gaussian SH coefficients of degrees 1..D added to the field's colour (residual-VQ'd like the
    geometry in the .fkc); 0: all view dependence comes from the field (Compact-3DGS)."""
    lr_sh_residual: float = 0.0025 / 20
    color_features: int = 4
    """Per-Gaussian feature inputs to the colour MLP (6 bits each in the .fkc, like the colour offsets), so view
    dependence can vary per Gaussian and not only as smoothly as the hash grid: +0.4 dB on lego for 0.6 B per
    Gaussian per feature (8 features: +0.07 dB more); 0: none (Compact-3DGS)."""
    lr_color_features: float = 0.005
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    scale_schedule_to_steps: bool = True


class CompactGaussians(GaussianSplatting):
    """3DGS with a volume mask, a hash-grid colour field and residual VQ of the geometry."""

    name = "gs-compact"
    export_formats = ("ply", "splat", "compact", "lod")

    def __init__(self, config: CompactConfig, scene: Scene, *, max_steps: int, backend: str = "auto", seed: int = 0, device: str | torch.device = "auto"):
        self.config = config
        self.scene = scene
        self.max_steps = max_steps
        self.backend = backend
        self.device = pick_device(device, backend)
        self.generator = torch.Generator().manual_seed(seed)
        scale = config.scale_schedule_to_steps
        densify = config.densify.scaled_to(max_steps) if scale else config.densify
        self.densify_config = densify
        self.scene_extent = scene.scene_extent
        self.train_images, self.train_cameras = scene.subset("train")
        self.train_images = self.train_images.to(self.device)
        self.train_cameras = self.train_cameras.to(self.device)
        self.background = scene.background.to(self.device).float()
        self._order: list[int] = []
        self.lm_phase = None
        self.rvq_start = max_steps - max(10, config.rvq_steps * max_steps // REFERENCE_STEPS) if scale else max_steps - config.rvq_steps
        self.prune_every = max(densify.interval, config.mask_prune_every * max_steps // REFERENCE_STEPS) if scale else config.mask_prune_every
        ref = config.mask_reference_steps
        self.lambda_mask = config.lambda_mask * (min(1.0, ref / max_steps) if ref > 0 else 1.0)
        self.net_milestones = [m * max_steps // REFERENCE_STEPS if scale else m for m in config.net_lr_steps]

        splats = initial_splats(scene, GSConfig(sh_degree=0, init_random_points=config.init_random_points, init_opacity=config.init_opacity), self.generator)
        n = len(splats)
        params = {
            "means": splats.means,
            "quats": splats.quats,
            "log_scales": splats.log_scales,
            "opacity_logits": splats.opacity_logits,
            "mask_logits": torch.ones(n),
        }
        if config.color_residual:  # start from the initial points' colours, as gs does
            params["color_residual"] = splats.sh[:, 0, :].clone()
        if config.color_features > 0:
            params["color_features"] = torch.zeros(n, config.color_features)
        if config.sh_residual_degree > 0:
            params["sh_residual"] = torch.zeros(n, (config.sh_residual_degree + 1) ** 2 - 1, 3)
        self.params = {k: torch.nn.Parameter(v.to(self.device).contiguous()) for k, v in params.items()}
        self.optimizer = self._make_optimizer()
        low, high = scene.bounds
        self._make_field((low + high) / 2, ((high - low) / 2).clamp_min(1e-6), config.color_output, config.color_features)
        self.rvq_scale = ResidualVQ(3, config.rvq_stages, config.rvq_codebook_size).to(self.device)
        self.rvq_rot = ResidualVQ(4, config.rvq_stages, config.rvq_codebook_size).to(self.device)
        sh_dim = 3 * ((config.sh_residual_degree + 1) ** 2 - 1)
        self.rvq_sh = ResidualVQ(sh_dim, config.rvq_stages, config.rvq_codebook_size).to(self.device) if sh_dim else None
        self.rvq_optimizer = self._make_rvq_optimizer()
        self.rvq_active = False
        self.densifier = Densifier(densify, self.scene_extent, n, self.device,
                                   prune_extent(self.scene_extent, self.train_cameras.centers, self.params["means"]))

    def _make_field(self, center: Tensor, half_extent: Tensor, output: str, n_features: int) -> None:
        """The colour field (hash grid from the config) and its optimiser."""
        c = self.config
        grid = HashGridConfig(c.hash_levels, c.hash_features, c.hash_log2_size, c.hash_base_resolution, c.hash_per_level_scale)
        self.field = ColorField(grid, c.mlp_hidden, center, half_extent, generator=self.generator, output=output,
                                extra_dim=n_features).to(self.device)
        self.field_optimizer = torch.optim.Adam(self.field.parameters(), lr=c.net_lr, eps=1e-15)

    def _make_optimizer(self) -> torch.optim.Adam:
        c = self.config
        lrs = {"means": c.lr_means * self.scene_extent, "quats": c.lr_quats, "log_scales": c.lr_scales,
               "opacity_logits": c.lr_opacity, "mask_logits": c.mask_lr, "color_residual": c.lr_color_residual, "sh_residual": c.lr_sh_residual,
               "color_features": c.lr_color_features}
        groups = [{"params": [self.params[name]], "lr": lrs[name], "name": name} for name in self.params]
        return torch.optim.Adam(groups, lr=0.0, eps=1e-15)

    # -- model ---------------------------------------------------------------------------------

    def geometry(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(means, unit quats, scales, opacities) after mask and (when on) residual VQ."""
        p = self.params
        scales = torch.exp(p["log_scales"])
        quats = p["quats"] / p["quats"].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if self.rvq_active:
            scales, _ = self.rvq_scale(scales)
            quats, _ = self.rvq_rot(quats)
        mask = straight_through_mask(p["mask_logits"])
        return p["means"], quats, scales * mask[:, None], torch.sigmoid(p["opacity_logits"]) * mask

    def sh_residual(self) -> Tensor | None:
        """Per-Gaussian SH coefficients of degrees 1..D [N, (D+1)^2-1, 3] (VQ'd when the VQ is on), or None."""
        if "sh_residual" not in self.params:
            return None
        rest = self.params["sh_residual"]
        if self.rvq_active:
            return self.rvq_sh(rest.flatten(1))[0].view_as(rest)
        return rest

    def _render_params(self, cameras: Cameras, sh_degree: int = 0):
        means, quats, scales, opacities = self.geometry()
        sh = gaussian_sh(self.field(means, cameras.centers[0].to(means), self.params.get("color_features")),
                         self.params.get("color_residual"), self.sh_residual())
        return rasterize(means, quats, scales, opacities, sh, cameras, sh_degree=self.config.sh_residual_degree,
                         background=self.background, backend=self.backend)

    def _make_rvq_optimizer(self) -> torch.optim.Adam:
        books = [vq.codebooks for vq in (self.rvq_scale, self.rvq_rot, self.rvq_sh) if vq is not None]
        return torch.optim.Adam(books, lr=self.config.rvq_lr)

    def active_sh_degree(self, step: int) -> int:
        return 0

    # -- training ------------------------------------------------------------------------------

    def _net_lr(self, step: int) -> float:
        lr = self.config.net_lr * min(1.0, (step + 1) / max(1, self.config.net_warmup))
        return lr * 0.33 ** sum(step >= m for m in self.net_milestones)

    @torch.no_grad()
    def prune_masked(self) -> int:
        keep = torch.sigmoid(self.params["mask_logits"]) > MASK_EPS
        removed = int((~keep).sum())
        if removed:
            empty = {name: p.detach()[:0] for name, p in self.params.items()}
            replace_rows(self.optimizer, self.params, keep, empty)
            self.densifier._reset_stats(self.params["means"].shape[0], self.device)
        return removed

    def start_rvq(self) -> None:
        with torch.no_grad():
            scales = torch.exp(self.params["log_scales"])
            quats = self.params["quats"] / self.params["quats"].norm(dim=-1, keepdim=True).clamp_min(1e-12)
            self.rvq_scale.init_kmeans(scales, self.config.rvq_kmeans_iters, self.generator)
            self.rvq_rot.init_kmeans(quats, self.config.rvq_kmeans_iters, self.generator)
            if self.rvq_sh is not None:
                self.rvq_sh.init_kmeans(self.params["sh_residual"].flatten(1), self.config.rvq_kmeans_iters, self.generator)
        self.rvq_optimizer = self._make_rvq_optimizer()
        self.rvq_active = True

    def train_step(self, step: int) -> dict[str, float]:
        if step >= self.rvq_start and not self.rvq_active:
            self.start_rvq()
        view = self._next_view()
        camera = self.train_cameras[view]
        target = self.train_images[view : view + 1]
        for group in self.optimizer.param_groups:
            if group["name"] == "means":
                group["lr"] = exponential_decay(step, self.config.lr_means * self.scene_extent, self.config.lr_means_final * self.scene_extent, self.max_steps)
        for group in self.field_optimizer.param_groups:
            group["lr"] = self._net_lr(step)
        out = self._render_params(camera)
        loss = gaussian_splat_loss(out.rgb, target, self.config.ssim_lambda)
        loss = loss + self.lambda_mask * torch.sigmoid(self.params["mask_logits"]).mean()
        loss.backward()
        if out.means2d.grad is not None:
            self.densifier.observe(out.means2d.grad, out.radii, camera.width, camera.height)
        self.optimizer.step()
        self.field_optimizer.step()
        if self.rvq_active:
            self.rvq_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.field_optimizer.zero_grad(set_to_none=True)
        self.rvq_optimizer.zero_grad(set_to_none=True)
        done = step + 1
        white = bool(torch.all(self.background == 1.0))
        changes = self.densifier.step(done, self.params, self.optimizer, white_background=white)
        d = self.densify_config
        refined = "pruned" in changes
        if refined or (done >= d.stop_step and done % self.prune_every == 0):
            changes["mask_pruned"] = self.prune_masked()
        with torch.no_grad():
            mse = torch.mean((out.rgb.detach().clamp(0, 1) - target) ** 2)
        stats = {"loss": float(loss.detach()), "psnr": float(-10 * torch.log10(mse.clamp_min(1e-10)))}
        stats.update({k: float(v) for k, v in changes.items()})
        return stats

    @torch.no_grad()
    def render(self, cameras: Cameras) -> dict[str, Tensor]:
        outs = [self._render_params(cameras[i].to(self.device)) for i in range(len(cameras))]
        return {"rgb": torch.cat([o.rgb for o in outs]).clamp(0, 1), "alpha": torch.cat([o.alpha for o in outs]),
                "depth": torch.cat([o.depth for o in outs])}

    def stats(self) -> dict[str, float]:
        live = torch.sigmoid(self.params["mask_logits"].detach()) > MASK_EPS
        return {"gaussians": float(int(live.sum()))}

    # -- persistence ---------------------------------------------------------------------------

    @torch.no_grad()
    def baked_dc(self, means: Tensor, extra: Tensor | None = None, n_views: int = 16) -> Tensor:
        """View-independent DC per Gaussian: the colour field averaged over training-camera directions."""
        feats = self.field.features(means)
        centers = self.train_cameras.centers.to(means)
        pick = torch.linspace(0, len(centers) - 1, min(n_views, len(centers))).round().long()
        return torch.stack([self.field.decode(feats, means - centers[i], extra) for i in pick]).mean(0)

    @torch.no_grad()
    def splats(self) -> Splats:
        """Live Gaussians with baked degree-0 colour (mask applied, VQ'd geometry when on)."""
        means, quats, scales, opacities = self.geometry()
        live = torch.sigmoid(self.params["mask_logits"]) > MASK_EPS
        means, quats, scales, opacities = means[live], quats[live], scales[live], opacities[live]
        offsets, rest = self.params.get("color_residual"), self.sh_residual()
        extra = self.params["color_features"][live] if "color_features" in self.params else None
        sh = gaussian_sh(self.baked_dc(means, extra), None if offsets is None else offsets[live], None if rest is None else rest[live])
        op = opacities.clamp(1e-6, 1 - 1e-6)
        return Splats(means.cpu(), quats.cpu(), torch.log(scales.clamp_min(1e-12)).cpu(), torch.log(op / (1 - op)).cpu(), sh.cpu())

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "field": {k: v.detach().cpu() for k, v in self.field.state_dict().items()},
            "field_output": self.field.output,
            "field_optimizer": self.field_optimizer.state_dict(),
            "rvq": {"scale": self.rvq_scale.state_dict(), "rot": self.rvq_rot.state_dict(), "active": self.rvq_active,
                    **({"sh": self.rvq_sh.state_dict()} if self.rvq_sh is not None else {})},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # params, optimizer, generator, order, densifier statistics
        params = state["params"]
        n_features = int(params["color_features"].shape[1]) if "color_features" in params else 0
        if n_features != self.field.extra_dim:  # saved with another colour-features setting (or before the option: none)
            self.config.color_features = n_features
            self._make_field(self.field.center, self.field.half_extent, self.field.output, n_features)
        self.field.load_state_dict(state["field"])
        self.field.output = state.get("field_output", "linear")  # checkpoints from before the option: linear
        if "field_optimizer" in state:
            self.field_optimizer.load_state_dict(state["field_optimizer"])
        rvq = state.get("rvq")
        if rvq:
            self.rvq_scale.load_state_dict(rvq["scale"])
            self.rvq_rot.load_state_dict(rvq["rot"])
            if self.rvq_sh is not None:
                self.rvq_sh.load_state_dict(rvq["sh"])
            self.rvq_active = bool(rvq["active"])
            self.rvq_optimizer = self._make_rvq_optimizer()

    def export(self, fmt: str, path: Path) -> Path:
        if fmt == "compact":
            from fieldkit.export.compact import write_compact

            write_compact(path, self)
            return Path(path)
        return super().export(fmt, path)  # ply, splat, lod of the decoded Gaussians

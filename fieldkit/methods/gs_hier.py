"""Hierarchical Gaussians (``--method gs-hier``): 3DGS training, then a level-of-detail tree.

Training is exactly ``gs``. The LOD tree (:mod:`fieldkit.models.hierarchy`) is built from the
trained Gaussians at the end of training and whenever a run is loaded (it is cheap: ~2 s for 100k
Gaussians on one CPU core), and ``render(cameras)`` draws each camera's tau-cut, so eval, render and
the viewer all see the level-of-detail image. ``--gs-hier.lod-tau 0`` renders full detail.
Exports: ``lod`` (the ``.fklod`` tree, docs/lod.md) besides the ``gs`` formats (leaves only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fieldkit.cameras import Cameras
from fieldkit.methods.gs import GaussianSplatting, GSConfig


@dataclass
class HierConfig(GSConfig):
    """gs options plus the level-of-detail cut."""

    lod_tau: float = 1.0
    """Cut threshold in pixels: a tree node is drawn instead of its children once its projected box
    extent is below tau (0: every trained Gaussian, i.e. the gs render)."""
    lod_blend: bool = True
    """Blend cut nodes with their parents near the switch (smooth level changes)."""


class HierarchicalGaussians(GaussianSplatting):
    """3DGS whose renders go through a level-of-detail cut of a tree built over the trained Gaussians."""

    name = "gs-hier"
    export_formats = ("ply", "splat", "lod")

    def __init__(self, config: HierConfig, scene, *, max_steps: int, backend: str = "auto", seed: int = 0, device: str | torch.device = "auto"):
        super().__init__(config, scene, max_steps=max_steps, backend=backend, seed=seed, device=device)
        self._hierarchy = None
        self.last_cut_counts: list[int] = []

    # the tree follows the parameters: dropped after every step and on load, rebuilt on demand
    def train_step(self, step: int) -> dict[str, float]:
        self._hierarchy = None
        return super().train_step(step)

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self._hierarchy = None

    def after_training(self, run_dir: Path) -> None:
        self.hierarchy()

    def hierarchy(self):
        """The LOD tree of the current Gaussians (built on first use, kept until they change)."""
        if self._hierarchy is None:
            self._hierarchy = super().hierarchy().to(self.device)
        return self._hierarchy

    @torch.no_grad()
    def render(self, cameras: Cameras, tau: float | None = None) -> dict[str, Tensor]:
        from fieldkit.render.lod import render_lod

        tau = self.config.lod_tau if tau is None else tau
        out = render_lod(self.hierarchy(), cameras.to(self.device), tau, blend=self.config.lod_blend,
                         background=self.background, backend=self.backend, sh_degree=self.config.sh_degree)
        self.last_cut_counts = out.counts
        return {"rgb": out.rgb.clamp(0, 1), "alpha": out.alpha, "depth": out.depth}

    def stats(self) -> dict[str, float]:
        stats = super().stats()
        if self.last_cut_counts:
            stats["lod_gaussians"] = float(self.last_cut_counts[-1])
        return stats

    def _lod_options(self) -> dict:
        return {"tau": self.config.lod_tau}

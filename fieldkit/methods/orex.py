"""OReX (``--method orex``): watertight shapes from planar cross-sections with a neural occupancy field.

Sawdayee, Vaxman, Bermano, "OReX: Object Reconstruction from Planar Cross-sections Using Neural Fields",
CVPR 2023, rebuilt from its description (the original code has no license): the iterative-estimation
network (:mod:`fieldkit.models.occupancy`), coarse-to-fine samples around the contours
(:mod:`fieldkit.shapes.sampling`), BCE on every pass plus the gradient hinge that removes ripples, and a
zero-level-set mesher (:mod:`fieldkit.shapes.meshing`).

The paper trains 650 epochs of 16k-point batches on a GPU; the defaults here keep its network, sampling
and losses but spread its six refinement levels over ``max_steps`` optimiser steps of ``batch_size``
points, so a 15-plane input trains in a few minutes on a laptop CPU (see docs/orex.md for numbers).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fieldkit.cameras import Cameras
from fieldkit.methods.base import Method
from fieldkit.models.occupancy import OccupancyNetwork
from fieldkit.shapes.csl import CrossSections, read_csl
from fieldkit.shapes.sampling import SamplingConfig, ScaledHull, level_samples

MESH_SUFFIXES = (".obj", ".ply", ".stl", ".glb")


@dataclass
class OReXConfig:
    """OReX options (the paper's values unless noted)."""

    width: int = 64
    depth: int = 7
    """Hidden layers of the MLP."""
    hidden_state: int = 32
    frequencies: int = 5
    """Learnable positional-encoding frequencies (initialised 2^0 .. 2^(n-1))."""
    iterations: int = 10
    """Passes of the shared MLP, each refining the previous logit; all are supervised."""
    batch_size: int = 2048
    """Points per step (paper 16384; smaller batches and more steps suit a CPU). Default steps: 2000."""
    lr: float = 1e-2
    weight_decay: float = 3e-4
    """Adam's (coupled, L2) weight decay. The paper's 1e-3 suits its 650 epochs; at this budget it holds the fit
    to thin parts back (hand_ok: contour fidelity 0.987, Chamfer above the baseline's), and 0 lets the
    interpolation between planes go lumpy (eight_15 IoU 0.976 -> 0.964): docs/orex.md."""
    lr_final: float = 1e-4
    """Learning rate at the last step (exponential decay from ``lr``; the paper ends near 1e-5 after 650 epochs)."""
    level_weights: tuple[float, ...] = (50, 50, 100, 100, 150, 200)
    """Share of the steps spent at each refinement level (the paper's epochs per level)."""
    window: int = 3
    """Train on the samples of the current level and the previous ``window - 1`` levels."""
    hinge_lambda: float = 1e-4
    hinge_alpha: float = 100.0
    """Gradient hinge: lambda * mean(max(|grad f| - alpha, 0)) on the last pass's logit (removes ripples)."""
    hinge_points: int = 256
    """Points of each batch the hinge is computed on (0: all of them, as in the paper). A random eighth gives
    the same regulariser in expectation; its second-order pass still costs about a quarter of a step."""
    dtype: Literal["float32", "float64"] = "float32"
    """The paper runs in float64; float32 gave the same shapes here (docs/orex.md) at lower cost."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    mesh_resolution: int = 256
    """Cells along the longest side of the meshing box (cubic cells)."""
    mesh_coarse_resolution: int = 64
    """First, dense pass of the coarse-to-fine grid evaluation."""
    mesh_drop_unsupported: bool = True
    """Drop mesh components that touch no input contour (floaters the data cannot support)."""
    mesh_refine: bool = True
    """Move mesh vertices onto the zero level set with the field's gradient (Newton steps)."""
    threads: int = 1
    """torch CPU threads for this run (0: leave torch's default). The MLP's matrices are small: one thread
    is as fast as two on an idle laptop and ~10x faster when other jobs share the cores (no spin-waiting)."""
    ensemble: int = 2
    """Networks trained independently (seeds seed, seed + 1, ...) whose logits are averaged, one thread each:
    on two cores 2 networks take 1.1x the wall time of one. The mean cancels part of each network's error
    between the planes: IoU +0.004 to +0.010 over the better member on the three reference inputs (docs/orex.md)."""
    export_after_training: bool = True
    """Write exports/mesh.obj and mesh.png into the run folder when training ends."""


class OReX(Method):
    name = "orex"
    export_formats = ("mesh", "obj", "ply", "stl", "glb")
    default_max_steps = 2000

    def __init__(self, config: OReXConfig, scene: CrossSections, max_steps: int = 2000, backend: str = "auto", seed: int = 0):
        if config.ensemble < 1:
            raise ValueError(f"--orex.ensemble must be >= 1, got {config.ensemble}")
        self.config = config
        self.source = scene
        self.max_steps = max(int(max_steps), 1)
        self.seed = seed
        self.centre, self.scale = scene.normalization()
        self.cs = scene.transformed(self.centre, self.scale)
        self.hull = ScaledHull.of(self.cs.all_vertices(), config.sampling.hull_margin)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.dtype = torch.float64 if config.dtype == "float64" else torch.float32
        self.members = [_Member(config, self.cs, self.hull, seed + k, self.dtype) for k in range(config.ensemble)]
        weights = np.asarray(config.level_weights, dtype=np.float64)
        self.level_ends = np.round(np.cumsum(weights) / weights.sum() * self.max_steps).astype(int)
        self._level = 0
        self._mesh_cache: tuple[tuple, Any, dict] | None = None
        self._pool_executor: ThreadPoolExecutor | None = None

    @property
    def model(self) -> OccupancyNetwork:
        """The first network of the ensemble (the only one with ``--orex.ensemble 1``)."""
        return self.members[0].model

    @property
    def models(self) -> list[OccupancyNetwork]:
        return [m.model for m in self.members]

    # ------------------------------------------------------------------------------------------ data

    @classmethod
    def load_data(cls, path: Path, downscale: int = 1, background: Tensor | None = None) -> CrossSections:
        """The cross-sections of a ``.csl`` file, or of the single ``.csl`` in a folder."""
        return read_csl(path)

    def held_out_views(self):
        return None

    # -------------------------------------------------------------------------------------- training

    def level_at(self, step: int) -> int:
        return int(min(np.searchsorted(self.level_ends, step, side="right"), len(self.level_ends) - 1))

    def learning_rate(self, step: int) -> float:
        c = self.config
        return c.lr * (c.lr_final / c.lr) ** (min(step, self.max_steps) / self.max_steps)

    def train_step(self, step: int) -> dict[str, float]:
        self._level = level = self.level_at(step)
        lr = self.learning_rate(step)
        if len(self.members) == 1:
            results = [self.members[0].step(level, step, lr)]
        else:  # the networks are independent: one thread each (torch ops release the GIL)
            if self._pool_executor is None:
                workers = min(len(self.members), max(1, os.cpu_count() or 1))
                self._pool_executor = ThreadPoolExecutor(workers, thread_name_prefix="orex-member")
            results = list(self._pool_executor.map(lambda m: m.step(level, step, lr), self.members))
        stats = {key: float(np.mean([r[key] for r in results])) for key in results[0]}
        return {**stats, "lr": lr, "level": level}

    def stats(self) -> dict[str, float]:
        return {"level": self._level}

    @torch.no_grad()
    def render(self, cameras: Cameras) -> dict[str, Tensor]:
        raise NotImplementedError("orex reconstructs a shape, not images: use `fieldkit export RUN --format mesh` (or eval --reference)")

    # ---------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"centre": torch.as_tensor(self.centre, dtype=torch.float64), "scale": float(self.scale)}
        if len(self.members) == 1:  # the single-network layout of earlier runs
            return {"model": self.model.state_dict(), "optimizer": self.members[0].optimizer.state_dict(), **state}
        return {"members": [{"model": m.model.state_dict(), "optimizer": m.optimizer.state_dict()} for m in self.members], **state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = state["members"] if "members" in state else [state]
        if len(parts) != len(self.members):
            # the checkpoint decides how many networks the field averages (a run's config may predate --orex.ensemble)
            self.members = self.members[: len(parts)] + [
                _Member(self.config, self.cs, self.hull, self.seed + k, self.dtype) for k in range(len(self.members), len(parts))]
        for member, part in zip(self.members, parts):
            member.model.load_state_dict(part["model"])
            if "optimizer" in part:
                member.optimizer.load_state_dict(part["optimizer"])
        self._mesh_cache = None

    # ------------------------------------------------------------------------------------ the field

    def field_normalised(self, points: np.ndarray) -> np.ndarray:
        """Last-pass logit (> 0 inside) in the normalised frame, averaged over the ensemble's networks and
        clipped to the padded hull of the contours."""
        self._eval_mode()
        x = torch.from_numpy(np.asarray(points)).to(self.dtype)
        logits = torch.stack([model.logits(x) for model in self.models]).mean(dim=0).double().numpy()
        return np.minimum(logits, -self.config.hinge_alpha * self.hull.signed_distance(points))

    def _eval_mode(self) -> None:
        for model in self.models:
            model.eval()

    def _mean_logit(self, x: Tensor) -> Tensor:
        """Differentiable last-pass logit averaged over the networks (the field the mesher follows)."""
        return torch.stack([model(x, all_passes=False) for model in self.models]).mean(dim=0)

    def inside(self, points: np.ndarray) -> np.ndarray:
        """In/out of points in the input's own coordinates."""
        return self.field_normalised((np.asarray(points, np.float64) - self.centre) / self.scale) > 0

    def _project(self, verts: np.ndarray, spacing: float, steps: int = 2) -> np.ndarray:
        """Newton steps along the gradient onto the zero level set, at most half a cell each."""
        self._eval_mode()
        x = torch.from_numpy(verts).to(self.dtype)
        hull_limited = self.config.hinge_alpha * -self.hull.signed_distance(verts) < 4.0  # surface set by the hull
        movable = torch.from_numpy(~hull_limited)
        for _ in range(steps):
            out = []
            for start in range(0, len(x), 65536):
                chunk = x[start : start + 65536].clone().requires_grad_(True)
                with torch.enable_grad():
                    f = self._mean_logit(chunk)
                    (g,) = torch.autograd.grad(f.sum(), chunk)
                step = -(f.detach() / g.pow(2).sum(-1).clamp_min(1e-12))[:, None] * g
                length = step.norm(dim=-1, keepdim=True)
                step = step * torch.clamp(0.5 * spacing / length.clamp_min(1e-12), max=1.0)
                out.append(chunk.detach() + step)
            moved = torch.cat(out)
            x = torch.where(movable[:, None], moved, x)
        return x.double().numpy()

    def mesh(self, resolution: int | None = None, refine: bool | None = None):
        """(trimesh mesh in the input's coordinates, info) of the zero level set."""
        from fieldkit.shapes.meshing import extract_mesh, mesh_report, oriented_mesh

        resolution = resolution or self.config.mesh_resolution
        refine = self.config.mesh_refine if refine is None else refine
        key = (resolution, refine)
        if self._mesh_cache is not None and self._mesh_cache[0] == key:
            return self._mesh_cache[1], self._mesh_cache[2]
        started = time.perf_counter()
        alpha = self.config.hinge_alpha
        mesh, info = extract_mesh(
            self.field_normalised,
            self.hull.lo,
            self.hull.hi,
            resolution=resolution,
            coarse_resolution=self.config.mesh_coarse_resolution,
            near=lambda h: min(0.5 * alpha * h, 4.0),
            project=self._project if refine else None,
            support=self.cs.all_vertices() if self.config.mesh_drop_unsupported else None,
        )
        mesh = oriented_mesh(mesh.vertices * self.scale + self.centre, mesh.faces)
        info = {**info, "spacing": info["spacing"] * self.scale, "seconds": time.perf_counter() - started, **mesh_report(mesh)}
        self._mesh_cache = (key, mesh, info)
        return mesh, info

    # --------------------------------------------------------------------------------------- output

    def export(self, fmt: str, path: Path) -> Path:
        """``mesh`` (format from the file suffix: .obj .ply .stl .glb; default .obj) or one of those names."""
        from fieldkit.io_atomic import atomic_path

        path = Path(path)
        if fmt not in self.export_formats:
            raise ValueError(f"orex exports {', '.join(self.export_formats)}, not {fmt!r}")
        if fmt != "mesh":
            path = path.with_suffix("." + fmt)
        elif path.suffix.lower() not in MESH_SUFFIXES:
            path = path.with_suffix(".obj")
        mesh, info = self.mesh()
        if len(mesh.faces) == 0:
            raise ValueError("the trained field is empty (no point inside): nothing to export; train longer or check the contours")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            mesh.export(str(tmp), file_type=path.suffix.lower().lstrip("."))
        print(f"mesh: {info['vertices']} vertices, {info['faces']} faces, watertight={info['watertight']}, grid {info['grid']} in {info['seconds']:.1f} s")
        return path

    def after_training(self, run_dir: Path) -> None:
        """Mesh the result into the run folder (exports/mesh.obj and mesh.png)."""
        if not self.config.export_after_training:
            return
        from fieldkit.shapes.preview import save_mesh_views

        run_dir = Path(run_dir)
        out = self.export("mesh", run_dir / "exports" / "mesh.obj")
        mesh, info = self.mesh()
        save_mesh_views(mesh, run_dir / "mesh.png", f"{self.source.name}: OReX, {info['faces']} faces, watertight={info['watertight']}", contours=self.source, up_axis=_up_axis(self.source))
        print(f"Wrote {out} and {run_dir / 'mesh.png'}")

    # ----------------------------------------------------------------------------------- evaluation

    def evaluate(self, reference: Path | None = None, iou_resolution: int = 128, samples: int = 100_000) -> dict[str, Any]:
        """Shape metrics in eval.json's shape: {"results": {...}, "mesh": {...}}."""
        from fieldkit.shapes.metrics import shape_metrics

        mesh, info = self.mesh()
        reference = Path(reference) if reference is not None else find_reference(self.source)
        results = shape_metrics(mesh, self.source, self.inside, reference, iou_resolution=iou_resolution, samples=samples)
        results["mesh_seconds"] = info["seconds"]
        return {"results": results, "reference": str(reference) if reference else None, "mesh": info}


class _Member:
    """One network of the ensemble, trained on its own draw of samples and batches (its own seed)."""

    def __init__(self, config: OReXConfig, cs: CrossSections, hull: ScaledHull, seed: int, dtype: torch.dtype):
        self.config, self.cs, self.hull, self.seed, self.dtype = config, cs, hull, seed, dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = OccupancyNetwork(config.width, config.depth, config.hidden_state, config.frequencies, config.iterations).to(dtype)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self._datasets: dict[int, tuple[Tensor, Tensor]] = {}
        self._pool: tuple[int, Tensor, Tensor] | None = None

    def _dataset(self, level: int) -> tuple[Tensor, Tensor]:
        if level not in self._datasets:
            rng = np.random.default_rng([self.seed, level])
            points, labels = level_samples(self.cs, level, rng, self.config.sampling, self.hull)
            self._datasets[level] = (torch.from_numpy(points).to(self.dtype), torch.from_numpy(labels).to(self.dtype))
        return self._datasets[level]

    def _training_pool(self, level: int) -> tuple[Tensor, Tensor]:
        if self._pool is None or self._pool[0] != level:
            used = range(max(0, level - self.config.window + 1), level + 1)
            for old in [k for k in self._datasets if k not in used]:
                del self._datasets[old]
            parts = [self._dataset(k) for k in used]
            self._pool = (level, torch.cat([p for p, _ in parts]), torch.cat([lab for _, lab in parts]))
        return self._pool[1], self._pool[2]

    def step(self, level: int, step: int, lr: float) -> dict[str, float]:
        """One Adam step on a batch of the level's samples: BCE on every pass plus the gradient hinge."""
        c = self.config
        points, labels = self._training_pool(level)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        pick = torch.randint(len(points), (c.batch_size,), generator=generator)
        x, y = points[pick], labels[pick]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        hinge_all = c.hinge_lambda > 0 and c.hinge_points <= 0
        x = x.requires_grad_(hinge_all)
        passes = self.model(x)
        bce = torch.stack([F.binary_cross_entropy_with_logits(logit, y) for logit in passes]).mean()
        loss = bce
        hinge = torch.zeros((), dtype=self.dtype)
        if c.hinge_lambda > 0:
            if hinge_all:
                xh, last = x, passes[-1]
            else:
                xh = x[: c.hinge_points].detach().requires_grad_(True)
                last = self.model(xh, all_passes=False)
            (grad,) = torch.autograd.grad(last.sum(), xh, create_graph=True)
            hinge = torch.relu(grad.norm(dim=-1) - c.hinge_alpha).mean()
            loss = loss + c.hinge_lambda * hinge
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            hard = (y != 0.5)
            accuracy = ((passes[-1][hard] > 0) == (y[hard] > 0.5)).float().mean()
        return {"loss": loss.item(), "bce": bce.item(), "hinge": hinge.item(), "accuracy": accuracy.item()}


def _up_axis(cs: CrossSections) -> int:
    """The axis most plane normals follow (slices are usually stacked along 'up')."""
    normals = np.abs(np.stack([p.unit_normal for p in cs.planes]))
    return int(np.argmax(normals.sum(axis=0)))


def find_reference(cs: CrossSections) -> Path | None:
    """``reference/<name>*.stl|obj|ply`` beside the ``.csl`` (the layout of OReX's csl_with_ref), if present."""
    if not cs.source:
        return None
    folder = Path(cs.source).parent / "reference"
    if not folder.is_dir():
        return None
    for candidate in sorted(folder.iterdir()):
        if candidate.is_file() and candidate.stem in (cs.name, cs.name + "_scaled") and candidate.suffix.lower() in MESH_SUFFIXES:
            resolved = candidate.resolve()
            if folder.resolve() in resolved.parents:  # never follow a link out of the folder
                return resolved
    return None

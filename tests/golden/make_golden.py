#!/usr/bin/env python3
"""Golden images for the rendering regression tests: fixed checkpoints on the demo scene.

Every method gets a *fixed checkpoint* on the demo scene:

* ``gs``: built here without training and without any random numbers, so it is identical on
  every machine and every torch version: about 2,900 Gaussians placed analytically on the demo
  scene's own geometry (``scenes/make_demo.py``: spheres, boxes, checkered floor) as flat discs
  tangent to the surfaces, coloured with the scene's Lambertian shading, with a small degree-1
  SH term so view-dependent colour is exercised too.
* ``gs-compact``: the same analytic discs (degree 0) as the starting point, then
  ``COMPACT_STEPS`` seeded training steps of a small Compact-3DGS model (8-level hash-grid colour
  field, 32-wide MLP, volume mask; residual VQ of scale and rotation is on for the last 10
  steps, so the checkpoint renders through the VQ path).
* ``nerf``: ``NERF_STEPS`` seeded training steps of a tiny hash-grid radiance field (8 levels,
  2^12 rows, 32-wide MLPs, CAM on an 8^3 grid, 32^3 occupancy grid).

Training is seeded and runs on one CPU thread, so it is repeatable on one machine; it is not
bit-identical across CPUs and torch versions, so the trained weights are stored, not retrained
at test time: ``tests/golden/checkpoints/<method>.pt`` holds the method config and the state
needed to render (no optimiser state), every floating tensor in float16 (the fixed checkpoint
*is* the float16 values, loaded back as float32).

``CASES[method](folder, backend)`` writes a complete run folder (config.json + checkpoints/)
for the method; ``fieldkit regress`` and the tests load it like any other run. The golden PNGs
are the run's first ``VIEWS`` demo test views rendered by each available backend, stored in
``tests/golden/<method>-<backend>/`` with a manifest (for trained methods it records the
checkpoint's sha256, so PNGs and checkpoint cannot drift apart unnoticed). A backend without
its own folder is compared with ``<method>-torch`` (the reference backend every native one
must match). For ``nerf`` the backend picks the hash-grid implementation: torch (reference),
cpu (native C++ kernel), cuda (native CUDA kernel); gsplat does not apply.

Regenerate (only when a pixel change is intended, and say why in the commit)::

    python tests/golden/make_golden.py            # all methods, all available backends
    python tests/golden/make_golden.py --methods nerf gs-compact --train   # retrain the stored checkpoints first
    python tests/golden/make_golden.py --check    # compare instead of writing; exit 1 on drift
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import math
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

GOLDEN_DIR = Path(__file__).resolve().parent
REPO_ROOT = GOLDEN_DIR.parents[1]
DEMO = REPO_ROOT / "scenes" / "demo"
SPLIT = "test"
VIEWS = 4
"""The first VIEWS demo test views (128x128) are rendered."""
BACKENDS = ("torch", "cpu", "cuda", "gsplat")
METHOD_BACKENDS = {"nerf": ("torch", "cpu", "cuda")}
"""Backends that apply to a method, where not all of BACKENDS (nerf: hash-grid implementations)."""
CHECKPOINTS = GOLDEN_DIR / "checkpoints"
"""Stored fixed checkpoints of the trained methods (``<method>.pt``)."""
SEED = 0


def _demo_module():
    """scenes/make_demo.py, imported by path (it holds the scene's constants)."""
    spec = importlib.util.spec_from_file_location("fieldkit_make_demo_for_golden", REPO_ROOT / "scenes" / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _frame_to_quat(normals: np.ndarray) -> np.ndarray:
    """(w,x,y,z) of rotations whose local z axis is ``normals`` [N,3] (unit), deterministic tangents."""
    from fieldkit.cameras import rotmat_to_quat

    n = normals / np.linalg.norm(normals, axis=1, keepdims=True)
    helper = np.where(np.abs(n[:, 2:3]) < 0.9, np.array([[0.0, 0.0, 1.0]]), np.array([[1.0, 0.0, 0.0]]))
    t1 = np.cross(helper, n)
    t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
    t2 = np.cross(n, t1)
    R = np.stack([t1, t2, n], axis=2)  # columns
    return rotmat_to_quat(torch.from_numpy(R)).numpy()


def _fibonacci_sphere(count: int) -> np.ndarray:
    k = np.arange(count) + 0.5
    z = 1.0 - 2.0 * k / count
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = k * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def demo_splats(sh_degree: int = 1):
    """The gs fixed checkpoint: Gaussians on the demo scene's surfaces (no randomness)."""
    from fieldkit.models.gaussians import Splats, rgb_to_sh_dc

    demo = _demo_module()
    light = np.asarray(demo.LIGHT_DIR, dtype=np.float64)
    means, normals, albedo, radius = [], [], [], []

    def add(points, nrm, color, spacing):
        means.append(points)
        normals.append(nrm)
        albedo.append(np.broadcast_to(np.asarray(color, dtype=np.float64), points.shape).copy() if np.ndim(color) == 1 else color)
        radius.append(np.full(len(points), spacing))

    for sphere in demo.SPHERES:
        count = int(round(900 * (sphere.radius / 0.28) ** 2))
        dirs = _fibonacci_sphere(count)
        spacing = math.sqrt(4 * math.pi * sphere.radius**2 / count)
        add(np.asarray(sphere.center) + sphere.radius * dirs, dirs, sphere.color, spacing)
    for box in demo.BOXES:
        cy, sy = math.cos(box.yaw), math.sin(box.yaw)
        rot = np.array([[cy, -sy, 0.0], [sy, cy, 0.0], [0.0, 0.0, 1.0]])
        half = np.asarray(box.half)
        for axis in range(3):
            for sign in (-1.0, 1.0):
                if axis == 2 and sign < 0:
                    continue  # the bottom face sits on the floor
                u, v = [a for a in range(3) if a != axis]
                nu = max(2, int(round(half[u] / 0.03)))
                nv = max(2, int(round(half[v] / 0.03)))
                gu, gv = np.meshgrid((np.arange(nu) + 0.5) / nu * 2 - 1, (np.arange(nv) + 0.5) / nv * 2 - 1, indexing="ij")
                local = np.zeros((gu.size, 3))
                local[:, u] = gu.ravel() * half[u]
                local[:, v] = gv.ravel() * half[v]
                local[:, axis] = sign * half[axis]
                nrm = np.zeros_like(local)
                nrm[:, axis] = sign
                spacing = 2 * max(half[u] / nu, half[v] / nv)
                add(local @ rot.T + np.asarray(box.center), nrm @ rot.T, box.color, spacing)
    n_floor = 32
    g = (np.arange(n_floor) + 0.5) / n_floor * 2 - 1
    fx, fy = np.meshgrid(g * demo.FLOOR_HALF, g * demo.FLOOR_HALF, indexing="ij")
    floor = np.stack([fx.ravel(), fy.ravel(), np.zeros(fx.size)], axis=1)
    check = (np.floor((floor[:, 0] + demo.FLOOR_HALF) / (2 * demo.FLOOR_HALF) * demo.FLOOR_CHECKS)
             + np.floor((floor[:, 1] + demo.FLOOR_HALF) / (2 * demo.FLOOR_HALF) * demo.FLOOR_CHECKS)) % 2
    floor_colors = np.where(check[:, None] == 0, np.asarray(demo.FLOOR_COLORS[0]), np.asarray(demo.FLOOR_COLORS[1]))
    add(floor, np.tile([0.0, 0.0, 1.0], (len(floor), 1)), floor_colors, 2 * demo.FLOOR_HALF / n_floor)

    means = np.concatenate(means)
    normals = np.concatenate(normals)
    albedo = np.concatenate(albedo)
    radius = np.concatenate(radius)
    shade = demo.AMBIENT + demo.DIFFUSE * np.clip(normals @ light, 0.0, None)
    colors = np.clip(albedo * shade[:, None], 0.0, 1.0)
    n = len(means)
    scales = np.stack([0.6 * radius, 0.6 * radius, 0.08 * radius], axis=1)
    sh = np.zeros((n, (sh_degree + 1) ** 2, 3))
    sh[:, 0] = rgb_to_sh_dc(torch.from_numpy(colors)).numpy()
    if sh_degree >= 1:  # a mild, deterministic view-dependent tint
        sh[:, 1] = 0.08 * normals[:, [1]]
        sh[:, 2] = 0.08 * normals[:, [2]] * np.array([1.0, 0.5, 0.0])
        sh[:, 3] = -0.06 * normals[:, [0]]
    opacity = np.full(n, 0.92)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    return Splats(
        as_t(means), as_t(_frame_to_quat(normals)), as_t(np.log(scales)), as_t(np.log(opacity / (1 - opacity))), as_t(sh)
    )


def build_gs_run(folder: Path, backend: str = "torch") -> Path:
    """A gs run folder on the demo scene whose only checkpoint is :func:`demo_splats`."""
    from fieldkit.methods.gs import GSConfig
    from fieldkit.runs import RunRecord, write_record
    from fieldkit.trainer import checkpoint_path

    splats = demo_splats()
    config = GSConfig(sh_degree=1, init_random_points=64)
    record = RunRecord(
        method="gs",
        data=str(DEMO),
        data_options={"downscale": 1, "background": None},
        method_config=dataclasses.asdict(config),
        max_steps=1,
        seed=0,
        backend=backend,
        trainer={},
        created="golden",
        fieldkit_version="golden",
    )
    folder = Path(folder)
    write_record(folder, record)
    params = {
        "means": splats.means,
        "quats": splats.quats,
        "log_scales": splats.log_scales,
        "opacity_logits": splats.opacity_logits,
        "sh_dc": splats.sh[:, :1].contiguous(),
        "sh_rest": splats.sh[:, 1:].contiguous(),
    }
    path = checkpoint_path(folder, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 0, "method": "gs", "state": {"params": params}}, path)
    return folder


# -- trained fixed checkpoints: nerf and gs-compact -------------------------------------------------

NERF_STEPS = 200
NERF_CONFIG = {
    "cam": True, "cam_resolution": (8, 8, 8),
    "n_levels": 8, "n_features_per_level": 2, "log2_hashmap_size": 12, "base_resolution": 16, "finest_resolution": 256,
    "hidden": 32, "geo_features": 7, "density_layers": 1, "color_layers": 2,
    "rays_per_batch": 1024, "target_samples": 1 << 15, "max_rays_per_batch": 8192, "warmup_steps": 10,
    "grid_resolution": 32, "grid_update_every": 4, "grid_warmup_steps": 16, "grid_cells_per_update": 4096,
    "samples_per_diagonal": 96,
}
"""NerfConfig overrides of the nerf golden model (about 70k parameters)."""

COMPACT_STEPS = 200
COMPACT_CONFIG = {
    "init_random_points": 16,  # replaced by the analytic discs before training
    "hash_levels": 8, "hash_features": 2, "hash_log2_size": 11, "mlp_hidden": 32, "net_warmup": 10,
    "rvq_stages": 4, "rvq_codebook_size": 32,
    # pinned at the values the stored checkpoint was trained with (the method's defaults moved since)
    "lambda_mask": 4e-3, "color_features": 0,
}
"""CompactConfig overrides of the gs-compact golden model (the schedule is scaled to COMPACT_STEPS:
no densification, residual VQ on for the last 10 steps)."""


@contextlib.contextmanager
def _seeded_one_thread():
    """Global torch RNG seeded with SEED (nn.Linear initialisation draws from it), restored after;
    torch and OpenMP on one thread, so reductions add in the same order whatever the core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            yield
    finally:
        torch.set_num_threads(before)


def train_nerf(steps: int = NERF_STEPS, backend: str = "auto"):
    """The nerf golden model: ``steps`` seeded steps on the demo scene (CPU, one thread)."""
    from fieldkit.data import load_scene
    from fieldkit.methods.nerf import NeRF, NerfConfig

    with _seeded_one_thread():
        method = NeRF(NerfConfig(**NERF_CONFIG), load_scene(DEMO), max_steps=steps, backend=backend, seed=SEED, device="cpu")
        for step in range(steps):
            method.train_step(step)
    return method


def train_compact(steps: int = COMPACT_STEPS, backend: str = "auto"):
    """The gs-compact golden model: the analytic discs of :func:`demo_splats` (degree 0) as the
    initial Gaussians, then ``steps`` seeded steps on the demo scene (CPU, one thread)."""
    from fieldkit.data import load_scene
    from fieldkit.methods.gs_compact import CompactConfig, CompactGaussians

    with _seeded_one_thread():
        method = CompactGaussians(CompactConfig(**COMPACT_CONFIG), load_scene(DEMO), max_steps=steps, backend=backend, seed=SEED,
                                  device="cpu")
        splats = demo_splats(sh_degree=0)
        params = {"means": splats.means, "quats": splats.quats, "log_scales": splats.log_scales,
                  "opacity_logits": splats.opacity_logits, "mask_logits": torch.ones(len(splats.means))}
        method.params = {k: torch.nn.Parameter(v.contiguous()) for k, v in params.items()}
        method.optimizer = method._make_optimizer()
        method.densifier._reset_stats(len(splats.means), method.device)
        for step in range(steps):
            method.train_step(step)
    return method


def _render_state(method) -> dict:
    """What rendering needs from a trained method's state_dict (no optimiser, RNG or statistics)."""
    state = method.state_dict()
    if method.name == "nerf":
        return {k: state[k] for k in ("model", "grid", "space", "rays_per_batch")}
    return {k: state[k] for k in ("params", "field", "rvq")}


def _map_floats(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype).contiguous() if value.is_floating_point() else value.contiguous()
    if isinstance(value, dict):
        return {k: _map_floats(v, dtype) for k, v in value.items()}
    return value


def _trained_with(model) -> str:
    """Which implementation trained the model (recorded in the checkpoint, for information)."""
    if model.name == "nerf":
        return f"hash grid {model.model.encoding.resolved_implementation()}"
    from fieldkit.render.backends import get_backend

    return f"rasterizer {get_backend(model.backend).name}, hash grid {model.field.grid.resolved_implementation()}"


TRAINERS: dict[str, tuple[Callable, int]] = {"nerf": (train_nerf, NERF_STEPS), "gs-compact": (train_compact, COMPACT_STEPS)}
"""Trained methods: method -> (seeded trainer, steps)."""


def checkpoint_file(method: str) -> Path:
    return CHECKPOINTS / f"{method}.pt"


def write_checkpoint(method: str) -> Path:
    """Train ``method``'s golden model with the seed and store its render state (float16)."""
    from fieldkit.io_atomic import atomic_path

    trainer, steps = TRAINERS[method]
    model = trainer(steps)
    config = dataclasses.asdict(model.config)
    record = {
        "format": "fieldkit-golden-checkpoint/1",
        "method": method,
        "method_config": config,
        "max_steps": steps,
        "seed": SEED,
        "trained_with": _trained_with(model),
        "torch_version": str(torch.__version__),
        "state": _map_floats(_render_state(model), torch.float16),
    }
    buffer = io.BytesIO()  # saved through a buffer: the archive's inner folder is then always "archive/",
    torch.save(record, buffer)  # not the temporary file's name, so the same weights give the same bytes
    path = checkpoint_file(method)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


def checkpoint_sha256(method: str) -> str:
    return hashlib.sha256(checkpoint_file(method).read_bytes()).hexdigest()


def read_checkpoint(method: str) -> dict:
    path = checkpoint_file(method)
    if not path.exists():
        raise FileNotFoundError(f"no fixed checkpoint {path}; make it with python tests/golden/make_golden.py --methods {method} --train")
    return torch.load(path, map_location="cpu", weights_only=True)


def build_trained_run(method: str, folder: Path, backend: str = "torch") -> Path:
    """A run folder on the demo scene whose only checkpoint is the stored fixed one (as float32)."""
    from fieldkit.runs import RunRecord, write_record
    from fieldkit.trainer import checkpoint_path

    stored = read_checkpoint(method)
    record = RunRecord(
        method=method,
        data=str(DEMO),
        data_options={"downscale": 1, "background": None},
        method_config=stored["method_config"],
        max_steps=int(stored["max_steps"]),
        seed=int(stored["seed"]),
        backend=backend,
        trainer={},
        created="golden",
        fieldkit_version="golden",
    )
    folder = Path(folder)
    write_record(folder, record)
    step = int(stored["max_steps"])
    path = checkpoint_path(folder, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "method": method, "state": _map_floats(stored["state"], torch.float32)}, path)
    return folder


def build_nerf_run(folder: Path, backend: str = "torch") -> Path:
    return build_trained_run("nerf", folder, backend)


def build_compact_run(folder: Path, backend: str = "torch") -> Path:
    return build_trained_run("gs-compact", folder, backend)


CASES: dict[str, Callable[[Path, str], Path]] = {"gs": build_gs_run, "gs-compact": build_compact_run, "nerf": build_nerf_run}
"""method -> builder of its fixed-checkpoint run folder. New methods add a line here."""


def golden_folder(method: str, backend: str) -> Path:
    return GOLDEN_DIR / f"{method}-{backend}"


def references_for(method: str, backend: str) -> Path:
    """The backend's own goldens if they exist, else the torch (reference backend) goldens."""
    own = golden_folder(method, backend)
    return own if own.is_dir() else golden_folder(method, "torch")


def backend_available(name: str, method: str = "gs") -> tuple[bool, str]:
    """(usable here, why not) for ``method`` on ``name``: a rasterizer backend, or for nerf the
    hash-grid implementation it selects (torch; cpu/cuda: the native C++/CUDA kernel)."""
    if name not in METHOD_BACKENDS.get(method, BACKENDS):
        return False, f"not a {method} backend (it has {', '.join(METHOD_BACKENDS.get(method, BACKENDS))})"
    if method == "nerf":
        if name == "torch":
            return True, ""
        from fieldkit.fields import native

        return native.is_available(name)
    from fieldkit.render.backends import get_backend

    try:
        get_backend(name)
    except Exception as error:
        return False, str(error)
    return True, ""


def render_case(method: str, backend: str, workdir: Path) -> dict[str, np.ndarray]:
    """Build the method's fixed run in ``workdir`` and render the golden views with ``backend``."""
    from fieldkit.regress import render_views
    from fieldkit.runs import load_run

    return render_run(CASES[method](Path(workdir) / f"{method}-run", backend), backend)


def render_run(run: Path, backend: str) -> dict[str, np.ndarray]:
    """Render the golden views of a run folder (a fixed run, possibly edited by a test) with ``backend``."""
    from fieldkit.regress import render_views
    from fieldkit.runs import load_run

    model, scene, _, _ = load_run(run, backend)
    _, cameras = scene.subset(SPLIT)
    return render_views(model, cameras, SPLIT, VIEWS)


def main(argv: list[str] | None = None) -> int:
    from fieldkit.regress import compare_to_references, format_table, write_references

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the stored goldens instead of writing")
    parser.add_argument("--methods", nargs="*", default=list(CASES))
    parser.add_argument("--backends", nargs="*", default=list(BACKENDS))
    parser.add_argument("--train", action="store_true",
                        help="retrain the stored fixed checkpoints of the trained methods (nerf, gs-compact) first; "
                             "without it a missing one is trained, an existing one is kept")
    args = parser.parse_args(argv)
    failed = False
    if not args.check:
        for method in args.methods:
            if method in TRAINERS and (args.train or not checkpoint_file(method).exists()):
                path = write_checkpoint(method)
                print(f"{method}: trained {TRAINERS[method][1]} steps (seed {SEED}) -> {path} ({path.stat().st_size // 1024} KiB)")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for backend in args.backends:
                ok, reason = backend_available(backend, method)
                if not ok:
                    print(f"{method}-{backend}: skipped ({reason})")
                    continue
                renders = render_case(method, backend, Path(tmp) / backend)
                if args.check:
                    result = compare_to_references(renders, references_for(method, backend))
                    print(f"{method}-{backend}:\n{format_table(result)}")
                    failed |= not result.passed
                else:
                    info = {"method": method, "backend": backend, "split": SPLIT, "scene": "scenes/demo", "made_by": "tests/golden/make_golden.py"}
                    if method in TRAINERS:
                        info["checkpoint"] = str(checkpoint_file(method).relative_to(REPO_ROOT))
                        info["checkpoint_sha256"] = checkpoint_sha256(method)
                    paths = write_references(renders, golden_folder(method, backend), info)
                    print(f"{method}-{backend}: wrote {len(paths)} goldens to {golden_folder(method, backend)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

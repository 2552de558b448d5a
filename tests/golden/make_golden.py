#!/usr/bin/env python3
"""Golden images for the rendering regression tests: fixed checkpoints on the demo scene.

Every method gets a *fixed checkpoint* built here without training and without any random
numbers, so it is identical on every machine and every torch version:

* ``gs``: about 2,900 Gaussians placed analytically on the demo scene's own geometry
  (``scenes/make_demo.py``: spheres, boxes, checkered floor) as flat discs tangent to the
  surfaces, coloured with the scene's Lambertian shading, with a small degree-1 SH term so
  view-dependent colour is exercised too.

``build_run(method, folder)`` writes a complete run folder (config.json + checkpoints/) for
the method; ``fieldkit regress`` and the tests load it like any other run. The golden PNGs
are the run's first ``VIEWS`` demo test views rendered by each available backend, stored in
``tests/golden/<method>-<backend>/`` with a manifest. A backend without its own folder is
compared with ``<method>-torch`` (the reference backend every native one must match).

Regenerate (only when a pixel change is intended, and say why in the commit)::

    python tests/golden/make_golden.py            # all methods, all available backends
    python tests/golden/make_golden.py --check    # compare instead of writing; exit 1 on drift
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
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


CASES: dict[str, Callable[[Path, str], Path]] = {"gs": build_gs_run}
"""method -> builder of its fixed-checkpoint run folder. New methods add a line here."""


def golden_folder(method: str, backend: str) -> Path:
    return GOLDEN_DIR / f"{method}-{backend}"


def references_for(method: str, backend: str) -> Path:
    """The backend's own goldens if they exist, else the torch (reference backend) goldens."""
    own = golden_folder(method, backend)
    return own if own.is_dir() else golden_folder(method, "torch")


def backend_available(name: str) -> tuple[bool, str]:
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

    run = CASES[method](Path(workdir) / f"{method}-run", backend)
    model, scene, _, _ = load_run(run, backend)
    _, cameras = scene.subset(SPLIT)
    return render_views(model, cameras, SPLIT, VIEWS)


def main(argv: list[str] | None = None) -> int:
    from fieldkit.regress import compare_to_references, format_table, write_references

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the stored goldens instead of writing")
    parser.add_argument("--methods", nargs="*", default=list(CASES))
    parser.add_argument("--backends", nargs="*", default=list(BACKENDS))
    args = parser.parse_args(argv)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for backend in args.backends:
                ok, reason = backend_available(backend)
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
                    paths = write_references(renders, golden_folder(method, backend), info)
                    print(f"{method}-{backend}: wrote {len(paths)} goldens to {golden_folder(method, backend)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

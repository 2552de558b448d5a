"""Radiance fields vs Gaussians on lego_200 with equal step budgets: CAM and S3IM ablations.

    python benchmarks/fields.py                         # all six variants, default step budgets
    python benchmarks/fields.py --nerf-steps 3000 --gs-steps 3000 --threads 2
    python benchmarks/fields.py --variants nerf nerf+cam --json out.json
    python benchmarks/fields.py --mesh                  # also meshes (marching cubes / TSDF) and Chamfer
    python benchmarks/fields.py --variants nerf nerf+s3im --train-views 20   # sparse views (S3IM's regime)

Every variant trains from the same seed for the same number of steps (nerf variants share one
budget, gs variants another) and is evaluated on all test views. The table reports test PSNR and
SSIM (fieldkit.metrics), trainable parameters, training wall time and process CPU time (on a
shared machine wall time depends on the neighbours; CPU time does not), and seconds per step.

With ``--mesh`` each run is meshed (nerf: marching cubes on density; gs: TSDF fusion of rendered
depth) and compared with the only reference geometry lego_200 ships: the 800 x 800 depth render
of test view r_0 (``depth_normal_sample_800``). That PNG is an 8-bit visualisation; it is read
as distance from the camera centre along each pixel's ray = 8 (1 - v / 255) scene units (v > 0
marks the object; Cycles' depth pass is radial). The benchmark checks this reading against the
run's own rendered distance and prints the fit (a trained field agrees to about 0.02 units,
against 0.07 for the planar-depth reading). The
Chamfer distance is the mean of completeness (reference points to the mesh surface) and accuracy
(mesh surface points not hidden behind the reference surface in that view, to the reference
points), in scene units (the lego is about 2.5 units tall).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fieldkit.data import load_scene  # noqa: E402
from fieldkit.metrics import psnr, ssim  # noqa: E402

VARIANTS = {
    "nerf": ("nerf", {"cam": False, "s3im_weight": 0.0}),
    "nerf+cam": ("nerf", {"cam": True, "s3im_weight": 0.0}),
    "nerf+s3im": ("nerf", {"cam": False, "s3im_weight": 1.0}),
    "nerf+cam+s3im": ("nerf", {"cam": True, "s3im_weight": 1.0}),
    "gs": ("gs", {"s3im_weight": 0.0}),
    "gs+s3im": ("gs", {"s3im_weight": 1.0}),
}


def build(variant: str, scene, steps: int, seed: int, nerf_overrides: dict, s3im_weight: float | None = None):
    kind, options = VARIANTS[variant]
    if s3im_weight is not None and options["s3im_weight"] > 0:
        options = {**options, "s3im_weight": s3im_weight}
    torch.manual_seed(seed)
    if kind == "nerf":
        from fieldkit.methods.nerf import NeRF, NerfConfig

        config = replace(NerfConfig(**nerf_overrides), **options)
        return NeRF(config, scene, max_steps=steps, seed=seed)
    from fieldkit.methods.gs import GaussianSplatting, GSConfig

    return GaussianSplatting(replace(GSConfig(), **options), scene, max_steps=steps, seed=seed)


def fewer_train_views(scene, count: int):
    """The scene with ``count`` evenly spaced training views (sparse-view runs); test views unchanged."""
    train = scene.split["train"]
    if not 0 < count <= len(train):
        raise SystemExit(f"--train-views must be in 1..{len(train)}, got {count}")
    keep = train[torch.linspace(0, len(train) - 1, count).round().long()]
    return replace(scene, split={**scene.split, "train": keep})


def n_params(method) -> int:
    if hasattr(method, "n_params"):
        return int(method.n_params())
    return int(sum(p.numel() for p in method.params.values()))


@torch.no_grad()
def evaluate(method, scene) -> dict:
    images, cameras = scene.subset("test")
    psnrs, ssims = [], []
    started = time.perf_counter()
    for i in range(len(cameras)):
        rgb = method.render(cameras[i])["rgb"].cpu().clamp(0, 1)
        psnrs.append(float(psnr(rgb, images[i : i + 1])[0]))
        ssims.append(float(ssim(rgb, images[i : i + 1])[0]))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "render_s_per_view": (time.perf_counter() - started) / len(cameras)}


def train(method, steps: int, log_every: int, name: str) -> dict:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    curve = []
    for step in range(steps):
        stats = method.train_step(step)
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            wall = time.perf_counter() - wall0
            curve.append({"step": step + 1, "train_psnr": stats.get("psnr"), "wall_s": wall, "cpu_s": time.process_time() - cpu0})
            print(f"  [{name}] step {step + 1}/{steps}  train psnr {stats.get('psnr', float('nan')):.2f}  "
                  f"{wall:.0f} s wall, {time.process_time() - cpu0:.0f} s cpu", flush=True)
    return {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0, "curve": curve}


# -- geometry against the depth sample --------------------------------------------------------


def reference_points(data: Path, scene) -> tuple[np.ndarray, dict]:
    """World points of the lego depth sample (view r_0 at 800 px) and the camera it was taken from."""
    from PIL import Image

    from fieldkit.render.volume import camera_rays

    png = np.asarray(Image.open(data / "depth_normal_sample_800" / "r_0_depth_0001.png")).astype(np.float64)
    value = png[..., 0]
    mask = value > 0
    distance = 8.0 * (1.0 - value / 255.0)  # along the ray, from the camera centre
    images, cameras = scene.subset("test")
    cam = cameras[0].scaled(800 / cameras.width)  # test r_0, intrinsics at 800 px
    rays = camera_rays(cam)
    origins = rays.origins.double().numpy().reshape(800, 800, 3)
    dirs = rays.directions.double().numpy().reshape(800, 800, 3)
    pts = origins[mask] + dirs[mask] * distance[mask][:, None]
    return pts, {"camera": cam, "distance": distance, "mask": mask, "center": origins[0, 0]}


def depth_reading_check(method, ref: dict) -> dict:
    """Compare the run's rendered distance at r_0 with the PNG reading (200 px, both masks)."""
    from fieldkit.render.volume import camera_rays

    cam = ref["camera"].scaled(0.25)
    out = method.render(cam)
    z_scale = camera_rays(cam).z_scale.reshape(200, 200).cpu().numpy().astype(np.float64)
    ours = out["depth"][0, ..., 0].cpu().numpy().astype(np.float64) / z_scale
    alpha = out["alpha"][0, ..., 0].cpu().numpy()
    distance = ref["distance"].reshape(200, 4, 200, 4).mean(axis=(1, 3))
    mask = ref["mask"].reshape(200, 4, 200, 4).all(axis=(1, 3)) & (alpha > 0.95)
    diff = ours[mask] - distance[mask]
    a, b = np.polyfit(distance[mask], ours[mask], 1)
    return {"median_abs_diff": float(np.median(np.abs(diff))), "fit_slope": float(a), "fit_offset": float(b), "pixels": int(mask.sum())}


def chamfer(verts: np.ndarray, faces: np.ndarray, ref_pts: np.ndarray, ref: dict, samples: int = 200_000, seed: int = 0) -> dict:
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    tri = verts[faces]
    areas = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    pick = rng.choice(len(tri), size=samples, p=areas / areas.sum())
    u, v = rng.random(samples), rng.random(samples)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tri[pick]
    surf = t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])
    ref_sub = ref_pts[rng.choice(len(ref_pts), size=min(samples, len(ref_pts)), replace=False)]
    completeness = cKDTree(surf).query(ref_sub, workers=-1)[0]
    # mesh points visible in the reference view: in front of (or off) the reference surface
    cam = ref["camera"]
    w2c = cam.world_to_cam[0].double().numpy()
    K = cam.K[0].double().numpy()
    pc = surf @ w2c[:3, :3].T + w2c[:3, 3]
    col = np.floor(K[0, 0] * pc[:, 0] / pc[:, 2] + K[0, 2]).astype(int)
    row = np.floor(K[1, 1] * pc[:, 1] / pc[:, 2] + K[1, 2]).astype(int)
    inside = (pc[:, 2] > 0) & (col >= 0) & (col < 800) & (row >= 0) & (row < 800)
    visible = inside.copy()
    idx = np.nonzero(inside)[0]
    on_object = ref["mask"][row[idx], col[idx]]
    dist = np.linalg.norm(surf[idx] - ref["center"], axis=-1)
    behind = on_object & (dist > ref["distance"][row[idx], col[idx]] + 0.02)
    visible[idx[behind]] = False
    accuracy = cKDTree(ref_sub).query(surf[visible], workers=-1)[0]
    return {"chamfer": float(0.5 * (completeness.mean() + accuracy.mean())), "completeness": float(completeness.mean()),
            "accuracy": float(accuracy.mean()), "faces": int(len(faces))}


def mesh_metrics(method, scene, data: Path, resolution: int) -> dict:
    from fieldkit.export.mesh import field_mesh, tsdf_mesh

    ref_pts, ref = reference_points(data, scene)
    result = {"depth_reading": depth_reading_check(method, ref)}
    if hasattr(method, "space"):
        verts, faces, _ = field_mesh(method, resolution)
        result["marching_cubes"] = chamfer(verts, faces, ref_pts, ref) if len(faces) else None
    verts, faces, _ = tsdf_mesh(method, scene, resolution=resolution, max_views=50, box=scene.scene_box)
    result["tsdf"] = chamfer(verts, faces, ref_pts, ref) if len(faces) else None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "lego_200")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--nerf-steps", type=int, default=2000)
    parser.add_argument("--gs-steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nerf", type=json.loads, default={}, help='NerfConfig overrides as JSON, e.g. \'{"log2_hashmap_size": 17}\'')
    parser.add_argument("--s3im-weight", type=float, default=None, help="S3IM weight of the +s3im variants (default: the paper's 1.0)")
    parser.add_argument("--mesh", action="store_true", help="mesh each run and report Chamfer against the depth sample")
    parser.add_argument("--mesh-resolution", type=int, default=192)
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--save", type=Path, default=None, help="write each trained model's state to DIR/<variant>.pt")
    parser.add_argument("--train-views", type=int, default=0,
                        help="train on this many evenly spaced training views only (0: all); the test views stay")
    parser.add_argument("--load", type=Path, default=None,
                        help="skip training: load DIR/<variant>.pt (from --save) and only evaluate / mesh")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"lego_200 not found at {args.data} (pass --data)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    scene = load_scene(args.data)
    if args.train_views:
        scene = fewer_train_views(scene, args.train_views)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"lego_200: {len(scene.split['train'])} train / {len(scene.split['test'])} test views at 200x200; "
          f"device {device}, {torch.get_num_threads()} threads")
    rows = []
    for variant in args.variants:
        steps = args.nerf_steps if VARIANTS[variant][0] == "nerf" else args.gs_steps
        print(f"{variant}: {steps} steps", flush=True)
        method = build(variant, scene, steps, args.seed, args.nerf, args.s3im_weight)
        if args.load is not None:
            method.load_state_dict(torch.load(args.load / f"{variant}.pt", map_location="cpu", weights_only=True))
            timing = {"wall_s": float("nan"), "cpu_s": float("nan"), "curve": []}
        else:
            timing = train(method, steps, args.log_every, variant)
        if args.save is not None:
            args.save.mkdir(parents=True, exist_ok=True)
            torch.save(method.state_dict(), args.save / f"{variant}.pt")
        metrics = evaluate(method, scene)
        row = {"variant": variant, "steps": steps, "params": n_params(method), **metrics,
               "wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"], "curve": timing["curve"]}
        if args.mesh:
            row["mesh"] = mesh_metrics(method, scene, args.data, args.mesh_resolution)
        rows.append(row)
        print(f"  -> test PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, {row['params']:,} params, "
              f"{timing['wall_s']:.0f} s wall / {timing['cpu_s']:.0f} s cpu", flush=True)
        del method
    print()
    header = f"{'variant':<15}{'steps':>7}{'PSNR':>8}{'SSIM':>8}{'params':>13}{'wall s':>9}{'cpu s':>9}{'s/step':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['variant']:<15}{r['steps']:>7}{r['psnr']:>8.2f}{r['ssim']:>8.4f}{r['params']:>13,}{r['wall_s']:>9.0f}"
              f"{r['cpu_s']:>9.0f}{r['wall_s'] / r['steps']:>8.3f}")
    base = {r["variant"]: r for r in rows}
    for a, b in (("nerf+cam", "nerf"), ("nerf+s3im", "nerf"), ("nerf+cam+s3im", "nerf"), ("gs+s3im", "gs")):
        if a in base and b in base:
            extra = base[a]["params"] / base[b]["params"] - 1
            print(f"{a} vs {b}: {base[a]['psnr'] - base[b]['psnr']:+.2f} dB PSNR, {base[a]['ssim'] - base[b]['ssim']:+.4f} SSIM, "
                  f"{100 * extra:+.2f}% parameters")
    if args.mesh:
        print()
        for r in rows:
            m = r["mesh"]
            parts = [f"depth reading: median |ours - png| {m['depth_reading']['median_abs_diff']:.3f}"]
            for key in ("marching_cubes", "tsdf"):
                if m.get(key):
                    parts.append(f"{key} Chamfer {m[key]['chamfer']:.4f} (acc {m[key]['accuracy']:.4f}, comp {m[key]['completeness']:.4f})")
            print(f"{r['variant']:<15}" + "; ".join(parts))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "threads": torch.get_num_threads(), "rows": rows}, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

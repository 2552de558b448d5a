"""Level-of-detail cut vs full detail: Gaussians rendered, render time and PSNR at increasing distance.

    python benchmarks/lod.py --run /tmp/lod_lego                 # a trained gs / gs-hier run (lego_200)
    python benchmarks/lod.py                                      # trains a quick gs run on lego_200 first
    python benchmarks/lod.py --ply ../shared/data/splats/guitar_3dgs_sh0.ply   # a trained splat file

Cameras: the run's test views (or, for a PLY, an orbit of views around the splats' centre), pushed back
along their viewing direction so that they are 1x, 2x, 4x, 8x as far from the point they look at
(the scene-box centre projected on the view axis). For every distance the full-detail render (all
trained Gaussians, plain ``rasterize``) is the peer; for every tau the LOD render (cut selection +
parent blending + ``rasterize`` of the cut) is timed, counted and compared with it (PSNR, in dB, on
[0,1] colours; identical images print inf). Times: per view the median over ``--repeats`` runs,
then the mean over views; the LOD time includes selecting the cut.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fieldkit  # noqa: E402,F401  (before torch)
import torch  # noqa: E402

from fieldkit.cameras import Cameras, intrinsics_matrix, look_at_w2c, rigid_inverse  # noqa: E402
from fieldkit.models.hierarchy import hierarchy_from_splats  # noqa: E402
from fieldkit.render import rasterize  # noqa: E402
from fieldkit.render.lod import render_lod  # noqa: E402

DATA = Path(os.environ.get("FIELDKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pushed_back(cameras: Cameras, target: torch.Tensor, factor: float) -> Cameras:
    """Cameras moved along -forward so they are ``factor`` x as far from the point on their axis nearest ``target``."""
    w2c = cameras.world_to_cam.double().clone()
    c2w = rigid_inverse(w2c)
    forward, center = c2w[:, :3, 2], c2w[:, :3, 3]
    d = ((target.double() - center) * forward).sum(-1, keepdim=True)
    new_center = center - (factor - 1) * d * forward
    w2c[:, :3, 3] = -(w2c[:, :3, :3] @ new_center[..., None])[..., 0]
    return Cameras(w2c.to(cameras.world_to_cam.dtype), cameras.K, cameras.width, cameras.height)


def orbit(center: torch.Tensor, radius: float, up: torch.Tensor, n: int, size: int, fov_deg: float = 50.0) -> Cameras:
    focal = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    up = up / up.norm()
    a = torch.linalg.cross(up, torch.tensor([1.0, 0, 0]) if abs(float(up[0])) < 0.9 else torch.tensor([0, 1.0, 0]))
    a = a / a.norm()
    b = torch.linalg.cross(up, a)
    poses = []
    for i in range(n):
        ang = 2 * math.pi * i / n
        eye = center + radius * (math.cos(ang) * a + math.sin(ang) * b) + 0.3 * radius * up
        poses.append(look_at_w2c(eye, center, up))
    K = intrinsics_matrix(focal, focal, size / 2, size / 2)
    return Cameras(torch.stack(poses).float(), K[None].expand(n, 3, 3).float(), size, size)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(torch.mean((a.clamp(0, 1) - b.clamp(0, 1)) ** 2))
    return float("inf") if mse == 0 else -10 * math.log10(mse)


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return out, statistics.median(times)


def load_source(args):
    """(Splats, cameras, background, label)."""
    if args.ply:
        from fieldkit.export import read_ply

        splats = read_ply(args.ply)
        center = splats.means.median(0).values
        spread = (splats.means - center).norm(dim=-1).quantile(0.9)
        cams = orbit(center, 2.5 * float(spread), torch.tensor([0.0, -1.0, 0.0]), args.views, args.size)
        return splats, cams, torch.zeros(3), center, f"{Path(args.ply).name}: {len(splats)} Gaussians, {args.views} orbit views at {args.size}x{args.size}"
    from fieldkit.runs import load_run

    run = args.run
    if run is None:
        from fieldkit.cli import main as cli

        run = Path(args.out)
        if not (run / "checkpoints").exists():
            data = DATA / "lego_200"
            if not data.exists():
                sys.exit(f"no --run / --ply given and {data} is missing")
            cli(["train", str(data), "--method", "gs", "--max-steps", str(args.steps), "-o", str(run), "--eval-every", "100000"])
    method, scene, record, step = load_run(run, args.backend)
    _, cams = scene.subset("test")
    cams = cams[list(range(min(args.views, len(cams))))]
    low, high = scene.bounds
    center = (low + high) / 2
    splats = method.splats()
    return splats, cams, scene.background.float(), center, f"{Path(record.data).name} ({record.method}, step {step}): {len(splats)} Gaussians, {len(cams)} test views at {cams.width}x{cams.height}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="trained gs / gs-hier run folder")
    parser.add_argument("--ply", type=Path, help="trained splat PLY instead of a run (orbit cameras)")
    parser.add_argument("--steps", type=int, default=3000, help="steps of the quick gs run trained when neither is given")
    parser.add_argument("--out", default="/tmp/lod_bench_run", help="where that quick run goes")
    parser.add_argument("--distances", default="1,2,4,8")
    parser.add_argument("--taus", default="1,2,3,4")
    parser.add_argument("--views", type=int, default=5)
    parser.add_argument("--size", type=int, default=256, help="image size of PLY orbit views")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    splats, cams, background, center, label = load_source(args)
    started = time.perf_counter()
    hier = hierarchy_from_splats(splats)
    build_s = time.perf_counter() - started
    print(f"{label}")
    print(f"tree: {hier.num_nodes} nodes, {hier.num_levels} levels, built in {build_s:.2f} s; backend {args.backend}, {args.threads} thread(s), median of {args.repeats}")
    full = (splats.means, splats.unit_quats, splats.scales, splats.opacities, splats.sh)
    taus = [float(t) for t in args.taus.split(",")]
    rows = []
    for factor in [float(f) for f in args.distances.split(",")]:
        views = pushed_back(cams, center, factor)
        ref_imgs, ref_times = [], []
        for i in range(len(views)):
            cam = views[i]
            out, sec = timed(lambda: rasterize(*full, cam, background=background, backend=args.backend), args.repeats)
            ref_imgs.append(out.rgb)
            ref_times.append(sec)
        full_ms = 1000 * sum(ref_times) / len(ref_times)
        rows.append((factor, "full", len(splats), full_ms, 1.0, float("inf")))
        for tau in taus:
            counts, times, psnrs = [], [], []
            for i in range(len(views)):
                cam = views[i]
                out, sec = timed(lambda: render_lod(hier, cam, tau, background=background, backend=args.backend), args.repeats)
                counts.append(out.counts[0])
                times.append(sec)
                psnrs.append(psnr(out.rgb, ref_imgs[i]))
            ms = 1000 * sum(times) / len(times)
            rows.append((factor, f"{tau:g}", sum(counts) / len(counts), ms, full_ms / ms, min(psnrs)))
    print()
    print("| distance | tau (px) | Gaussians rendered | fewer | ms / view | speed-up | PSNR vs full (dB, worst view) |")
    print("|---|---|---|---|---|---|---|")
    for factor, tau, count, ms, speed, p in rows:
        fewer = len(splats) / count
        print(f"| {factor:g}x | {tau} | {count:,.0f} | {fewer:.1f}x | {ms:.1f} | {speed:.2f}x | {p:.2f} |")


if __name__ == "__main__":
    main()

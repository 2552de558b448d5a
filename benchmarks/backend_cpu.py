"""Forward and backward time of the rasterizer stages: torch reference vs the native CPU backend.

Scene: the garden points of gsplat's test fixture (test_garden.npz: means3d, viewmats, Ks,
648x420), subsampled to N Gaussians, with random scales/quats/opacities/colours as gsplat's
tests draw them (scales = rand * 0.02, quats = normalize(randn), opacities = rand).

    python benchmarks/backend_cpu.py                      # N = 10k and 100k, camera 0
    python benchmarks/backend_cpu.py --sizes 10000 --cameras 3 --repeats 5

Reports the median over --repeats runs of: projection forward, tile intersection (shared, not
differentiable), compositing forward, and the backward of both stages (loss = sum of image and
alpha times fixed random weights), for each backend, and the speed-up. The cpu column bins tiles
with the native intersect_tiles_cpu (identical lists to the torch intersect_tiles).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fieldkit.render.backends import cpu as cpu_backend  # noqa: E402
from fieldkit.render.composite import composite_tiles  # noqa: E402
from fieldkit.render.projection import project_gaussians  # noqa: E402
from fieldkit.render.tiles import intersect_tiles  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("FIELDKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def load_scene(path: Path, n: int, cameras: int, seed: int = 42):
    data = np.load(path)
    g = torch.Generator().manual_seed(seed)
    all_means = torch.from_numpy(data["means3d"]).float()
    pick = torch.randperm(all_means.shape[0], generator=g)[:n]
    means = all_means[pick].contiguous()
    n = means.shape[0]
    scales = torch.rand(n, 3, generator=g) * 0.02
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    opacities = torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    viewmats = torch.from_numpy(data["viewmats"]).float()[:cameras].contiguous()
    Ks = torch.from_numpy(data["Ks"]).float()[:cameras].contiguous()
    return means, quats, scales, opacities, colors, viewmats, Ks, int(data["width"]), int(data["height"])


def run_once(project, intersect, composite, scene, weights):
    means, quats, scales, opacities, colors, viewmats, Ks, W, H = scene
    C, N = viewmats.shape[0], means.shape[0]
    params = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, colors)]
    m, q, s, o, col = params
    times = {}
    t0 = time.perf_counter()
    proj = project(m, q, s, viewmats, Ks, W, H)
    t1 = time.perf_counter()
    isect = intersect(proj.means2d, proj.radii, proj.depths, W, H)
    t2 = time.perf_counter()
    features = torch.cat([col[None].expand(C, N, 3), proj.depths[..., None]], dim=-1)
    background = torch.zeros(C, 4)
    image, alpha = composite(proj.means2d, proj.conics, o.expand(C, N), features, isect, W, H, background)
    t3 = time.perf_counter()
    loss = (image * weights[0]).sum() + (alpha * weights[1]).sum()
    t4 = time.perf_counter()
    loss.backward()
    t5 = time.perf_counter()
    times["project fwd"] = t1 - t0
    times["intersect"] = t2 - t1
    times["composite fwd"] = t3 - t2
    times["backward (both)"] = t5 - t4
    times["total"] = t5 - t0
    return times, isect.gaussian_ids.numel(), image.detach(), [p.grad for p in params]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "garden" / "test_garden.npz")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--cameras", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    parser.add_argument("--skip-torch-above", type=int, default=10**9, help="skip the torch reference above this N")
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ok, reason = cpu_backend.is_available()
    if not ok:
        raise SystemExit(f"cpu backend unavailable: {reason}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; extension load "
        f"{cpu_backend.build_seconds:.1f} s; compositing build: {cpu_backend.extension().simd_level()}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )

    backends = {
        "torch": (project_gaussians, intersect_tiles, composite_tiles),
        "cpu": (cpu_backend.project_gaussians_cpu, cpu_backend.intersect_tiles_cpu, cpu_backend.composite_tiles_cpu),
    }
    for n in args.sizes:
        scene = load_scene(args.data, n, args.cameras)
        W, H = scene[-2], scene[-1]
        g = torch.Generator().manual_seed(0)
        weights = (torch.randn(args.cameras, H, W, 4, generator=g), torch.randn(args.cameras, H, W, 1, generator=g))
        results, outputs = {}, {}
        for name, (project, intersect, composite) in backends.items():
            if name == "torch" and n > args.skip_torch_above:
                continue
            run_once(project, intersect, composite, scene, weights)  # warm-up
            runs = []
            for _ in range(args.repeats):
                times, m, image, grads = run_once(project, intersect, composite, scene, weights)
                runs.append(times)
            results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            outputs[name] = (image, grads)
        print(f"\nN = {n}, C = {args.cameras}, {W}x{H}, {m} tile intersections, median of {args.repeats}")
        print(f"{'stage':<18}" + "".join(f"{k:>12}" for k in results) + ("   speed-up" if len(results) == 2 else ""))
        for stage in results[next(iter(results))]:
            row = f"{stage:<18}" + "".join(f"{results[k][stage] * 1e3:>10.1f}ms" for k in results)
            if len(results) == 2:
                row += f"   {results['torch'][stage] / results['cpu'][stage]:>7.1f}x"
            print(row)
        if len(outputs) == 2:
            (ir, gr), (ic, gc) = outputs["torch"], outputs["cpu"]
            errs = [((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(gc, gr)]
            off = ((ir - ic).abs().amax(-1) > 1e-4).sum().item()
            print(f"parity: image max|diff| {(ir - ic).abs().max().item():.2e} ({off} of {ir[..., 0].numel()} pixels "
                  "off by > 1e-4: float32 rounding flips the alpha >= 1/255 test of a few splats); grad rel err "
                  + ", ".join(f"{k} {e:.1e}" for k, e in zip(("means", "quats", "scales", "opacities", "colors"), errs)))


if __name__ == "__main__":
    main()

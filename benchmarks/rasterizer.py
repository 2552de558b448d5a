"""Forward/backward time and peak memory of ``fieldkit.render.rasterize``, per backend.

Scene: gsplat's rasterizer test fixture ``garden/test_garden.npz`` (real SfM points and cameras of
Mip-NeRF 360 "garden"), prepared the way gsplat's ``load_test_data()`` does it:

* points cropped to [-2, 2]^3 (111,785 of 138,766 remain), then N of them drawn without
  replacement (``torch.randperm``, seed 42);
* colours: the points' real RGB / 255 (plain RGB, no SH);
* scales ~ U[1e-4, 0.02] per axis (current gsplat; older gsplat used rand * 0.02), quats =
  normalize(randn(4)), opacities ~ U[0, 1] (seed 0);
* camera: the fixture's first camera. 648x420 is its native size; 200x200 scales K per axis
  (fx, cx by 200/648; fy, cy by 200/420): same field of view, non-square pixels.

Per configuration (backend, N, resolution) a **fresh Python subprocess** loads the scene, runs one
warm-up forward+backward, then ``--repeats`` timed ones, and reports the median:

* forward  = ``rasterize(...)`` (projection, tile binning, compositing) -> image + alpha;
* backward = ``loss.backward()`` with loss = sum(rgb * w1) + sum(alpha * w2), fixed random w;
* peak memory = growth of the process' peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``,
  a high-water mark) over its value just before the first render: "fwd" is read right after the
  warm-up forward (the autograd graph is alive), "fwd+bwd" after the warm-up backward. It counts
  everything the process touched (tensors, freed temporaries, allocator caches, OpenMP buffers)
  and is only meaningful for CPU backends: GPU memory is not in it.

    python benchmarks/rasterizer.py                                  # torch, 10k/100k, 200x200/648x420
    python benchmarks/rasterizer.py --backends torch,cpu --repeats 5 --threads 1 --json out.json

Backends that cannot be used here (not built, no GPU, ...) are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("FIELDKIT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "garden" / "test_garden.npz"
CROP = 2.0


# ----------------------------------------------------------------------------- worker (one config)


def _rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def load_scene(path: Path, n: int, width: int, height: int, device: str = "cpu"):
    """(means, quats, scales, opacities, colors, cameras): gsplat's test-fixture recipe, N points."""
    import numpy as np
    import torch

    from fieldkit.cameras import Cameras

    data = np.load(path)
    means = torch.from_numpy(data["means3d"]).float()
    colors = torch.from_numpy(data["colors"]).float() / 255.0
    inside = ((means >= -CROP) & (means <= CROP)).all(dim=-1)
    means, colors = means[inside], colors[inside]
    if n > len(means):
        raise ValueError(f"N = {n} but only {len(means)} points lie inside [-{CROP}, {CROP}]^3")
    pick = torch.randperm(len(means), generator=torch.Generator().manual_seed(42))[:n]
    means, colors = means[pick].contiguous(), colors[pick].contiguous()
    g = torch.Generator().manual_seed(0)
    scales = torch.rand(n, 3, generator=g) * (0.02 - 1e-4) + 1e-4
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    opacities = torch.rand(n, generator=g)

    native_w, native_h = int(data["width"]), int(data["height"])
    K = torch.from_numpy(data["Ks"][0]).float().clone()
    K[0] *= width / native_w  # fx, (skew), cx
    K[1] *= height / native_h  # fy, cy
    viewmat = torch.from_numpy(data["viewmats"][0]).float()
    cameras = Cameras(world_to_cam=viewmat[None], K=K[None], width=width, height=height)
    tensors = [t.to(device) for t in (means, quats, scales, opacities, colors)]
    return (*tensors, cameras.to(device))


def run_worker(cfg: dict) -> dict:
    result = {k: cfg[k] for k in ("backend", "n", "width", "height")}
    if cfg.get("mem_limit_gb"):
        # Address-space cap above what is mapped now, so a configuration that needs too much
        # memory fails with an allocation error instead of pushing a shared machine into OOM.
        cap = _vm_size_bytes() + int(cfg["mem_limit_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch

    from fieldkit.render import rasterize
    from fieldkit.render.backends import get_backend

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    result["threads"] = torch.get_num_threads()
    device = "cuda" if cfg["backend"] in ("cuda", "gsplat") else "cpu"
    try:
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        get_backend(cfg["backend"], device)
    except Exception as error:  # noqa: BLE001 - any reason a backend is unusable here
        return {**result, "status": "skipped", "note": f"{type(error).__name__}: {error}"}
    scene = load_scene(Path(cfg["data"]), cfg["n"], cfg["width"], cfg["height"], device)
    means, quats, scales, opacities, colors, cameras = scene
    g = torch.Generator().manual_seed(1)
    w_rgb = torch.randn(1, cfg["height"], cfg["width"], 3, generator=g).to(device)
    w_alpha = torch.randn(1, cfg["height"], cfg["width"], 1, generator=g).to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    baseline = _rss_peak_mib()
    fwd, bwd = [], []
    try:
        for i in range(cfg["repeats"] + 1):
            params = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, colors)]
            sync()
            t0 = time.perf_counter()
            out = rasterize(*params, cameras, backend=cfg["backend"])
            sync()
            t1 = time.perf_counter()
            if i == 0:
                result["peak_rss_fwd_mib"] = _rss_peak_mib() - baseline
            loss = (out.rgb * w_rgb).sum() + (out.alpha * w_alpha).sum()
            sync()
            t2 = time.perf_counter()
            loss.backward()
            sync()
            t3 = time.perf_counter()
            if i == 0:
                result["peak_rss_total_mib"] = _rss_peak_mib() - baseline
                result["warmup_fwd_ms"], result["warmup_bwd_ms"] = 1e3 * (t1 - t0), 1e3 * (t3 - t2)
                grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
                result["mean_alpha"] = float(out.alpha.mean())
            else:
                fwd.append(1e3 * (t1 - t0))
                bwd.append(1e3 * (t3 - t2))
            del out, loss, params
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, MemoryError) or "alloc" in str(error).lower() or "memory" in str(error).lower():
            limit = f" (limit {cfg['mem_limit_gb']} GiB above the baseline)" if cfg.get("mem_limit_gb") else ""
            return {**result, "status": "out of memory", "note": f"{type(error).__name__}{limit}: {str(error)[:200]}"}
        raise
    result.update(
        status="ok" if grads_finite else "non-finite gradients",
        repeats=cfg["repeats"],
        fwd_ms=statistics.median(fwd),
        bwd_ms=statistics.median(bwd),
        fwd_ms_all=fwd,
        bwd_ms_all=bwd,
        baseline_rss_mib=baseline,
    )
    # Tile intersections (context for the timings), outside the measured region.
    with torch.no_grad():
        from fieldkit.render.tiles import intersect_tiles

        impl = get_backend(cfg["backend"], device)
        proj = impl.project(means, quats, scales, cameras.world_to_cam, cameras.K, cfg["width"], cfg["height"],
                            eps2d=0.3, near_plane=0.01, far_plane=1e10)
        result["visible"] = int((proj.radii[..., 0] > 0).sum())
        result["intersections"] = int(intersect_tiles(proj.means2d, proj.radii, proj.depths, cfg["width"], cfg["height"]).gaussian_ids.numel())
    return result


# ----------------------------------------------------------------------------- driver


def machine_info(threads: int | None) -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads or torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def format_row(r: dict) -> str:
    res = f"{r['width']}x{r['height']}"
    if r.get("status") != "ok":
        return f"| {r['backend']:<7} | {r['n']:>7,} | {res:>7} | {'':>9} | {'':>9} | {'':>9} | {'':>9} | {'':>11} | {r.get('status')}: {r.get('note', '')} |"
    return (
        f"| {r['backend']:<7} | {r['n']:>7,} | {res:>7} | {r['fwd_ms']:>9.1f} | {r['bwd_ms']:>9.1f} "
        f"| {r['peak_rss_fwd_mib']:>9.0f} | {r['peak_rss_total_mib']:>9.0f} | {r['intersections']:>11,} | ok |"
    )


HEADER = (
    "| backend |       N |  res    |   fwd ms  |   bwd ms  | peak fwd  | peak f+b  | tile isects | status |\n"
    "|         |         |         |  (median) |  (median) |  MiB (Δ)  |  MiB (Δ)  |             |        |\n"
    "|---------|--------:|--------:|----------:|----------:|----------:|----------:|------------:|--------|"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="torch", help="comma-separated: torch,cpu,cuda,gsplat (default torch)")
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated Gaussian counts (<= 111785)")
    parser.add_argument("--resolutions", default="200x200,648x420", help="comma-separated WxH")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each worker (0: torch's default)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, default=None, help="also write machine info + all results here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration before it is abandoned")
    parser.add_argument("--mem-limit-gb", type=float, default=8.0, help="address-space cap per worker above its start (0: none)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found (set FIELDKIT_SHARED_DATA or pass --data)")

    info = machine_info(args.threads or None)
    print(f"# {info['cpu']}, {info['cores']} cores, {info['memory']}; Python {info['python']}, torch {info['torch']}, "
          f"{info['torch_threads']} torch threads; load average at start {info['load_average_at_start']}")
    print(f"# median of {args.repeats} runs after 1 warm-up; peak = growth of the worker's peak RSS (ru_maxrss) "
          f"over its pre-render value")
    print(HEADER, flush=True)
    results = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        for n in [int(s) for s in args.sizes.split(",")]:
            for res in args.resolutions.split(","):
                width, height = (int(v) for v in res.lower().split("x"))
                cfg = {"backend": backend, "n": n, "width": width, "height": height, "repeats": args.repeats,
                       "threads": args.threads, "data": str(args.data), "mem_limit_gb": args.mem_limit_gb}
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
                if args.threads:
                    env["OMP_NUM_THREADS"] = str(args.threads)
                started = time.perf_counter()
                try:
                    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True,
                                          text=True, timeout=args.timeout, env=env)
                    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                    if proc.returncode == 0 and lines:
                        result = json.loads(lines[-1])
                    else:
                        killed = proc.returncode < 0 or proc.returncode == 137
                        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
                        result = {**cfg, "status": "killed (out of memory?)" if killed else "failed",
                                  "note": f"exit {proc.returncode}: {tail[0][:200]}"}
                except subprocess.TimeoutExpired:
                    result = {**cfg, "status": "timeout", "note": f"over {args.timeout:.0f} s for warm-up + {args.repeats} runs"}
                result["wall_s"] = round(time.perf_counter() - started, 1)
                result.pop("data", None)
                results.append(result)
                print(format_row(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()

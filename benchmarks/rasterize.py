"""Rasterizer speed and memory per backend, one table per device (the kernels issue's benchmark).

Scenes (gsplat's garden test fixture ``garden/test_garden.npz``: real SfM points, 3 cameras, 648x420):

* (a) ``garden``: all 138,766 points, the fixture's 3 cameras in one call, 648x420;
* (b) ``1m-1080p``: 1,000,000 Gaussians (the garden points repeated with 1 cm jitter), camera 0 at 1920x1080;
* (c) ``lego-scale``: 100,000 of the points inside [-2, 2]^3, camera 0 at 200x200 (K scaled per axis).

Gaussian parameters follow gsplat's tests: scales ~ U[1e-4, 0.02], quats = normalize(randn),
opacities ~ U[0, 1], colours = the points' RGB. Per (device, scene, backend) a fresh subprocess
loads the scene and runs warm-ups, then times forward (``rasterize`` -> image, alpha) and
forward+backward (loss = sum(rgb * w1) + sum(alpha * w2), fixed random weights), each backend at its
own default tile size (``rasterize``'s default: 16 px, 32 for the native CPU build; ``--tile-size``
sets one for all):

* timing: CUDA events on a GPU, ``perf_counter`` on the CPU; median of ``--repeats`` (default 20)
  after ``--warmup`` (default 3). A backend whose warm-up shows that 20 runs would exceed
  ``--budget-s`` runs fewer (at least 3); the table says how many;
* peak memory: GPU: ``torch.cuda.max_memory_allocated`` above what the inputs hold; CPU: growth of
  the process's peak RSS over its pre-render value (everything the process touched).

    python benchmarks/rasterize.py                          # CPU table: torch reference vs native cpu
    python benchmarks/rasterize.py --device cuda            # GPU table: cuda vs gsplat (+ torch)
    python benchmarks/rasterize.py --scenes a,c --threads 2 --json out.json
    python benchmarks/rasterize.py --scenes a --per-view     # (a) one view at a time: the torch reference's
                                                             # autograd graph for 3 views needs ~20 GB
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
SCENES = {
    "a": {"name": "garden", "n": None, "cameras": 3, "width": 648, "height": 420},
    "b": {"name": "1m-1080p", "n": 1_000_000, "cameras": 1, "width": 1920, "height": 1080},
    "c": {"name": "lego-scale", "n": 100_000, "cameras": 1, "width": 200, "height": 200},
}
DEFAULT_BACKENDS = {"cpu": "torch,cpu", "cuda": "cuda,gsplat,torch"}


def build_scene(path: Path, key: str, device: str):
    """(means, quats, scales, opacities, colors, cameras) of scene ``key`` on ``device``."""
    import numpy as np
    import torch

    from fieldkit.cameras import Cameras

    spec = SCENES[key]
    data = np.load(path)
    means = torch.from_numpy(data["means3d"]).float()
    colors = torch.from_numpy(data["colors"]).float() / 255.0
    g = torch.Generator().manual_seed(42)
    if key == "b":
        reps = -(-spec["n"] // len(means))
        means = (means.repeat(reps, 1) + 0.01 * torch.randn(reps * len(means), 3, generator=g))[: spec["n"]]
        colors = colors.repeat(reps, 1)[: spec["n"]]
    elif key == "c":
        inside = ((means >= -2.0) & (means <= 2.0)).all(dim=-1)
        pick = torch.randperm(int(inside.sum()), generator=g)[: spec["n"]]
        means, colors = means[inside][pick], colors[inside][pick]
    n = len(means)
    g = torch.Generator().manual_seed(0)
    scales = torch.rand(n, 3, generator=g) * (0.02 - 1e-4) + 1e-4
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    opacities = torch.rand(n, generator=g)
    native_w, native_h = int(data["width"]), int(data["height"])
    K = torch.from_numpy(data["Ks"][: spec["cameras"]]).float().clone()
    K[:, 0] *= spec["width"] / native_w
    K[:, 1] *= spec["height"] / native_h
    viewmats = torch.from_numpy(data["viewmats"][: spec["cameras"]]).float()
    cameras = Cameras(world_to_cam=viewmats, K=K, width=spec["width"], height=spec["height"])
    tensors = [t.contiguous().to(device) for t in (means, quats, scales, opacities, colors)]
    return (*tensors, cameras.to(device))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_worker(cfg: dict) -> dict:
    """Time one (device, scene, backend) in this process; returns a result row."""
    import torch

    from fieldkit.render import rasterize
    from fieldkit.render.backends import get_backend

    device, backend = cfg["device"], cfg["backend"]
    row = {"device": device, "scene": cfg["scene"], "backend": backend}
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    try:
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        impl = get_backend(backend, device)
    except Exception as error:  # noqa: BLE001 - any reason a backend is unusable here
        return {**row, "status": "skipped", "note": f"{type(error).__name__}: {error}"[:160]}
    means, quats, scales, opacities, colors, cameras = build_scene(Path(cfg["data"]), cfg["scene"], device)
    C, H, W = len(cameras), cameras.height, cameras.width
    tile = cfg.get("tile_size") or impl.tile_size  # 0/None: the backend's own default
    row.update(n=len(means), cameras=C, width=W, height=H, tile=tile)
    g = torch.Generator().manual_seed(1)
    w_rgb = torch.randn(C, H, W, 3, generator=g).to(device)
    w_alpha = torch.randn(C, H, W, 1, generator=g).to(device)
    cuda = device == "cuda"

    def clock():
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(t0, t1) -> float:
        if cuda:
            t1.synchronize()
            return t0.elapsed_time(t1)
        return 1e3 * (t1 - t0)

    def once() -> tuple[float, float]:
        params = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, colors)]
        if cfg.get("per_view"):  # one view at a time, backward after each (bounds the reference's memory)
            fwd = total = 0.0
            for i in range(C):
                t0 = clock()
                out = rasterize(*params, cameras[i], backend=backend, tile_size=tile)
                t1 = clock()
                ((out.rgb * w_rgb[i : i + 1]).sum() + (out.alpha * w_alpha[i : i + 1]).sum()).backward()
                t2 = clock()
                fwd, total = fwd + elapsed_ms(t0, t1), total + elapsed_ms(t0, t2)
            return fwd, total
        t0 = clock()
        out = rasterize(*params, cameras, backend=backend, tile_size=tile)
        t1 = clock()
        ((out.rgb * w_rgb).sum() + (out.alpha * w_alpha).sum()).backward()
        t2 = clock()
        return elapsed_ms(t0, t1), elapsed_ms(t0, t2)

    if cuda:
        torch.cuda.synchronize()
        base_alloc = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _peak_rss_mib()
    try:
        warm = [once() for _ in range(cfg["warmup"])]
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, MemoryError) or "memory" in str(error).lower():
            return {**row, "status": "out of memory", "note": str(error)[:160]}
        raise
    row["peak_mib"] = ((torch.cuda.max_memory_allocated() - base_alloc) / 2**20) if cuda else (_peak_rss_mib() - base_rss)
    per_run_s = warm[-1][1] / 1e3
    repeats = max(3, min(cfg["repeats"], int(cfg["budget_s"] / max(per_run_s, 1e-6))))
    runs = [once() for _ in range(repeats)]
    row.update(status="ok", repeats=repeats, fwd_ms=statistics.median(r[0] for r in runs),
               fwd_bwd_ms=statistics.median(r[1] for r in runs))
    return row


def machine_info(device: str) -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores"
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def print_table(device: str, info: dict, rows: list[dict], reference: str) -> None:
    print(f"\n## {device}: {info['device']} (torch {info['torch']}, load {info['load_average_at_start']})")
    print(f"| scene | backend | N | views x res | tile | fwd ms | fwd+bwd ms | peak MiB | runs | fwd+bwd vs {reference} |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        scene = f"({row['scene']}) {SCENES[row['scene']]['name']}"
        if row.get("status") != "ok":
            print(f"| {scene} | {row['backend']} | | | | | | | | {row.get('status')}: {row.get('note', '')} |")
            continue
        ref = next((r for r in rows if r["scene"] == row["scene"] and r["backend"] == reference and r.get("status") == "ok"), None)
        ratio = f"{row['fwd_bwd_ms'] / ref['fwd_bwd_ms']:.3f} ({ref['fwd_bwd_ms'] / row['fwd_bwd_ms']:.1f}x faster)" if ref else "-"
        print(f"| {scene} | {row['backend']} | {row['n']:,} | {row['cameras']} x {row['width']}x{row['height']} "
              f"| {row['tile']} | {row['fwd_ms']:.2f} | {row['fwd_bwd_ms']:.2f} | {row['peak_mib']:.0f} | {row['repeats']} | {ratio} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="comma-separated: cpu,cuda (one table each)")
    parser.add_argument("--backends", default=None, help="comma-separated; default cpu: torch,cpu / cuda: cuda,gsplat,torch")
    parser.add_argument("--scenes", default="a,b,c", help="comma-separated subset of a,b,c")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=120.0, help="time budget per row for the timed runs")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    parser.add_argument("--tile-size", type=int, default=0,
                        help="tile edge for every backend (0: each backend's default: 16, the native CPU build 32)")
    parser.add_argument("--per-view", action="store_true",
                        help="render a multi-view scene one view at a time, backward after each (every backend alike); "
                             "bounds the torch reference's memory at (a) to one view's graph")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per row before it is abandoned")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found (set FIELDKIT_SHARED_DATA or pass --data)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    report = {}
    for device in args.device.split(","):
        backends = (args.backends or DEFAULT_BACKENDS[device]).split(",")
        info = {"device": device}
        probe = subprocess.run([sys.executable, "-c", f"import json,sys; sys.path.insert(0, {str(REPO_ROOT / 'benchmarks')!r}); "
                                f"from rasterize import machine_info; print(json.dumps(machine_info({device!r})))"],
                               capture_output=True, text=True, env=env)
        if probe.returncode == 0:
            info = json.loads(probe.stdout.strip().splitlines()[-1])
        rows = []
        for scene in args.scenes.split(","):
            for backend in backends:
                cfg = {"device": device, "scene": scene, "backend": backend, "repeats": args.repeats, "warmup": args.warmup,
                       "budget_s": args.budget_s, "threads": args.threads, "data": str(args.data), "per_view": args.per_view,
                       "tile_size": args.tile_size}
                try:
                    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True,
                                          text=True, timeout=args.timeout, env=env)
                    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                    row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                        **cfg, "status": "failed", "note": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:160]}"}
                except subprocess.TimeoutExpired:
                    row = {**cfg, "status": "timeout", "note": f"over {args.timeout:.0f} s"}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        print_table(device, info, rows, reference="gsplat" if device == "cuda" else "torch")
        report[device] = {"machine": info, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()

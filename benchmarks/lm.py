"""Adam-only vs Adam + Levenberg-Marquardt (3DGS-LM) from the same post-densification checkpoint.

    python benchmarks/lm.py --scene ../shared/data/lego_200 --json lm_lego.json
    python benchmarks/lm.py --scene ../shared/data/fern --json lm_fern.json --checkpoint-steps 1000 --total-steps 2000

One run, three worker processes (so each arm's peak memory is its own high-water mark):

1. checkpoint: ``GaussianSplatting`` (default ``GSConfig``, schedules stretched to
   ``--total-steps``) trained with Adam for ``--checkpoint-steps`` steps, which is where
   densification ends (at half the run, as in 3DGS: 15k of 30k). Its wall time T0 is shared by
   both arms. Saved (parameters, Adam moments, RNG) to ``--work``; reused by a later run with the
   same settings unless ``--fresh``.
2. adam: continue Adam to ``--total-steps``; test PSNR (all test views) every ``--eval-every``
   steps. Adam's final test PSNR is the target.
3. lm: from the same checkpoint, LM iterations (``--optimizer lm``'s code path,
   ``SplatLMPhase``) until the test PSNR reaches the target, or ``--lm-iterations`` are done, or
   the LM phase has used as much time as Adam's phase. The Jacobian-state budget is set so the LM
   process stays within 2x Adam's peak RSS (``--memory-factor``); the batch plan chosen from it is
   reported.

Clocks exclude evaluation. Peak memory is the worker's peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``: tensors, freed temporaries, allocator caches, the scene).

JSON: ``adam_final_psnr``, ``adam_time_s`` (T0 + Adam phase), ``lm_time_to_adam_psnr_s``
(T0 + LM time to reach it, null if never), ``time_saving`` (1 - lm/adam time, null if never),
``peak_mem_adam_bytes``, ``peak_mem_lm_bytes``, ``device``, plus both curves, settings, the LM
statistics per iteration and the batch plan.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------
def _setup(args):
    import torch

    torch.set_num_threads(args.threads)
    from fieldkit.data.detect import load_scene
    from fieldkit.methods.gs import GaussianSplatting, GSConfig
    from fieldkit.optim.levenberg_marquardt import LMConfig

    scene = load_scene(args.scene)
    lm_cfg = LMConfig(
        batch_images=args.lm_batch_images, num_batches=args.lm_batches, pcg_iterations=args.lm_pcg,
        initial_damping=args.lm_damping, iterations=args.lm_iterations,
    )
    config = GSConfig(optimizer="lm" if args.worker == "lm" else "adam", lm=lm_cfg)
    method = GaussianSplatting(config, scene, max_steps=args.total_steps, seed=args.seed)
    return scene, method


def _evaluate(method, scene) -> float:
    import torch

    from fieldkit.metrics import psnr

    images, cameras = scene.subset("test")
    values = []
    with torch.no_grad():
        for i in range(len(cameras)):
            rgb = method.render(cameras[i])["rgb"]
            values.append(float(psnr(rgb, images[i : i + 1]).mean()))
    return sum(values) / len(values)


def worker_checkpoint(args) -> dict:
    import torch

    from fieldkit.trainer import seed_everything

    seed_everything(args.seed)
    scene, method = _setup(args)
    start = time.perf_counter()
    for step in range(args.checkpoint_steps):
        method.train_step(step)
    seconds = time.perf_counter() - start
    torch.save({"state": method.state_dict(), "rng": torch.get_rng_state(), "seconds": seconds}, args.checkpoint)
    return {"seconds": seconds, "psnr": _evaluate(method, scene), "gaussians": int(method.params["means"].shape[0]),
            "peak_rss": _peak_rss_bytes()}


def _load(args):
    import torch

    scene, method = _setup(args)
    ckpt = torch.load(args.checkpoint, weights_only=True)
    method.load_state_dict(ckpt["state"])
    torch.set_rng_state(ckpt["rng"])
    return scene, method


def worker_adam(args) -> dict:
    scene, method = _load(args)
    curve = [{"step": args.checkpoint_steps, "seconds": 0.0, "psnr": _evaluate(method, scene)}]
    clock = 0.0
    for step in range(args.checkpoint_steps, args.total_steps):
        start = time.perf_counter()
        method.train_step(step)
        clock += time.perf_counter() - start
        done = step + 1
        if done % args.eval_every == 0 or done == args.total_steps:
            curve.append({"step": done, "seconds": clock, "psnr": _evaluate(method, scene)})
            print(f"  adam step {done}: {clock:.1f} s, test PSNR {curve[-1]['psnr']:.3f}", flush=True)
    return {"curve": curve, "seconds": clock, "final_psnr": curve[-1]["psnr"], "peak_rss": _peak_rss_bytes(),
            "gaussians": int(method.params["means"].shape[0])}


def worker_lm(args) -> dict:
    from fieldkit.optim.levenberg_marquardt import current_rss_bytes

    scene, method = _load(args)
    phase = method.lm_phase
    from fieldkit.optim import lm_native

    print(f"  native LM cache: {lm_native.is_available()}", flush=True)  # build/load outside the clock
    # Jacobian-state budget: the LM process may peak at memory_factor x Adam's peak (10 % kept for
    # allocator slack and temporaries the estimate does not see).
    budget = int(0.9 * args.memory_factor * args.adam_peak_rss) - current_rss_bytes()
    phase.config.memory_budget_bytes = max(budget, 1)
    phase.solver.config.memory_budget_bytes = max(budget, 1)
    curve = [{"iteration": 0, "seconds": 0.0, "psnr": _evaluate(method, scene)}]
    stats_log, plan = [], None
    clock = 0.0
    step = max(phase.start_step, args.checkpoint_steps)
    for iteration in range(1, args.lm_iterations + 1):
        start = time.perf_counter()
        stats = phase.train_step(method, step)
        clock += time.perf_counter() - start
        if stats is None:
            stats_log.append({"error": phase.disabled_reason})
            break
        if plan is None and phase.solver.last_plan is not None:
            plan = phase.solver.last_plan.describe()
            print(f"  {plan}", flush=True)
        stats_log.append(stats)
        curve.append({"iteration": iteration, "seconds": clock, "psnr": _evaluate(method, scene)})
        print(f"  lm iteration {iteration}: {clock:.1f} s, test PSNR {curve[-1]['psnr']:.3f}, "
              f"accepted {bool(stats['lm_accepted'])}, gain ratio {stats['lm_gain_ratio']:.3f}, damping {stats['lm_damping']:.3g}",
              flush=True)
        if curve[-1]["psnr"] >= args.target_psnr or clock >= args.time_limit:
            break
    return {"curve": curve, "seconds": clock, "final_psnr": curve[-1]["psnr"], "peak_rss": _peak_rss_bytes(),
            "stats": stats_log, "plan": plan, "backend": phase.backend, "budget_bytes": budget}


WORKERS = {"checkpoint": worker_checkpoint, "adam": worker_adam, "lm": worker_lm}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def _spawn(args, worker: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--worker-out", str(out)] + _forward(args) + extra
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print(f"[{worker}] running ...", flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {worker} failed with exit code {proc.returncode}")
    return json.loads(out.read_text())


def _forward(args) -> list[str]:
    keys = ["scene", "checkpoint_steps", "total_steps", "eval_every", "threads", "seed", "lm_iterations", "lm_batch_images",
            "lm_batches", "lm_pcg", "lm_damping", "memory_factor", "checkpoint"]
    out = []
    for key in keys:
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scene", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--checkpoint-steps", type=int, default=2000, help="Adam steps before the split (densification ends here)")
    parser.add_argument("--total-steps", type=int, default=4000, help="Adam-only run length (schedules are stretched to it)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm-iterations", type=int, default=5)
    parser.add_argument("--lm-batch-images", type=int, default=25)
    parser.add_argument("--lm-batches", type=int, default=4)
    parser.add_argument("--lm-pcg", type=int, default=8)
    parser.add_argument("--lm-damping", type=float, default=1.0, help="initial damping lambda")
    parser.add_argument("--memory-factor", type=float, default=2.0, help="LM peak RSS cap as a multiple of Adam's")
    parser.add_argument("--work", type=Path, default=Path("outputs/bench_lm"))
    parser.add_argument("--fresh", action="store_true", help="retrain the checkpoint even if one with these settings exists")
    parser.add_argument("--checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--adam-peak-rss", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--target-psnr", type=float, default=float("inf"), help=argparse.SUPPRESS)
    parser.add_argument("--time-limit", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = WORKERS[args.worker](args)
        args.worker_out.write_text(json.dumps(result))
        return 0

    args.scene = args.scene.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.scene.name}-{args.checkpoint_steps}of{args.total_steps}-seed{args.seed}-t{args.threads}"
    args.checkpoint = (args.work / f"checkpoint-{tag}.pt").resolve()
    meta_path = args.work / f"checkpoint-{tag}.json"
    if args.fresh or not (args.checkpoint.exists() and meta_path.exists()):
        ckpt = _spawn(args, "checkpoint", args.work / "worker-checkpoint.json", [])
        meta_path.write_text(json.dumps(ckpt))
    ckpt = json.loads(meta_path.read_text())
    print(f"checkpoint: {args.checkpoint_steps} Adam steps in {ckpt['seconds']:.1f} s, {ckpt['gaussians']} Gaussians, "
          f"test PSNR {ckpt['psnr']:.3f}", flush=True)

    adam = _spawn(args, "adam", args.work / "worker-adam.json", [])
    lm = _spawn(args, "lm", args.work / "worker-lm.json", [
        "--adam-peak-rss", str(adam["peak_rss"]), "--target-psnr", str(adam["final_psnr"]), "--time-limit", str(adam["seconds"]),
    ])

    t0 = ckpt["seconds"]
    reached = next((p for p in lm["curve"] if p["psnr"] >= adam["final_psnr"]), None)
    lm_time = t0 + reached["seconds"] if reached else None
    adam_time = t0 + adam["seconds"]
    # Adam's own time to reach LM's best PSNR, for the "where LM does not help" report.
    lm_best = max(p["psnr"] for p in lm["curve"])
    adam_to_lm_best = next((p["seconds"] for p in adam["curve"] if p["psnr"] >= lm_best), None)
    result = {
        "adam_final_psnr": adam["final_psnr"],
        "adam_time_s": adam_time,
        "lm_time_to_adam_psnr_s": lm_time,
        "time_saving": (1.0 - lm_time / adam_time) if lm_time else None,
        "peak_mem_adam_bytes": adam["peak_rss"],
        "peak_mem_lm_bytes": lm["peak_rss"],
        "device": f"cpu: {_cpu_name()}, {os.cpu_count()} logical cores, {args.threads} torch thread(s)",
        "scene": str(args.scene),
        "checkpoint": {"steps": args.checkpoint_steps, "seconds": t0, "psnr": ckpt["psnr"], "gaussians": ckpt["gaussians"]},
        "adam": {"steps": args.total_steps - args.checkpoint_steps, "phase_seconds": adam["seconds"], "curve": adam["curve"]},
        "lm": {
            "phase_seconds": lm["seconds"], "best_psnr": lm_best, "curve": lm["curve"], "stats": lm["stats"], "plan": lm["plan"],
            "backend": lm["backend"], "jacobian_budget_bytes": lm["budget_bytes"],
            "adam_phase_seconds_to_lm_best_psnr": adam_to_lm_best,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("worker")},
        "load_average": os.getloadavg(),
    }

    rows = [
        ("adam", ckpt["seconds"], adam["seconds"], adam_time, adam["final_psnr"], adam["peak_rss"]),
        ("adam+lm", ckpt["seconds"], lm["seconds"], t0 + lm["seconds"], lm["curve"][-1]["psnr"], lm["peak_rss"]),
    ]
    print()
    print(f"{'arm':8s} | {'ckpt s':>7s} | {'phase s':>8s} | {'total s':>8s} | {'final PSNR':>10s} | {'peak RSS MiB':>12s}")
    print("-" * 70)
    for name, c, phase, total, value, peak in rows:
        print(f"{name:8s} | {c:7.1f} | {phase:8.1f} | {total:8.1f} | {value:10.3f} | {peak / 2**20:12.0f}")
    print()
    if lm_time is not None:
        print(f"LM reached Adam's final PSNR {adam['final_psnr']:.3f} after {lm_time:.1f} s total: "
              f"time saving {result['time_saving'] * 100:.1f}% (target >= 25%)")
    else:
        print(f"LM did NOT reach Adam's final PSNR {adam['final_psnr']:.3f}; best {lm_best:.3f} after {lm['seconds']:.1f} s of LM "
              f"(Adam needed {adam_to_lm_best if adam_to_lm_best is not None else float('nan'):.1f} s of its phase for that PSNR)")
    print(f"peak memory: LM {lm['peak_rss'] / adam['peak_rss']:.2f}x Adam")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""OReX vs a classic baseline on the OReX inputs that ship with reference meshes: one table.

    python benchmarks/orex.py                       # eight_15, balloondog, hand_ok at the defaults
    python benchmarks/orex.py --inputs eight_15 --steps 500 --resolution 128
    python benchmarks/orex.py --picture Heart-25-even-better --picture-out docs/orex_heart.png

For each input: OReX trained with its defaults (``fieldkit train x.csl``), meshed at ``--resolution``; the
baseline (signed-distance interpolation between the parallel slices) meshed on the same grid. Metrics:
volumetric IoU on a 128^3 grid, Chamfer-L1 and Hausdorff on 100k surface samples (reference units),
contour fidelity (fraction of probes either side of every contour labelled right), watertightness,
and wall / CPU seconds on this machine (training and meshing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fieldkit.methods.orex import OReX, OReXConfig, find_reference  # noqa: E402
from fieldkit.shapes.baseline import BaselineReconstruction  # noqa: E402
from fieldkit.shapes.csl import read_csl  # noqa: E402
from fieldkit.shapes.metrics import shape_metrics  # noqa: E402

DATA = Path(os.environ.get("FIELDKIT_SHARED_DATA", ROOT.parent / "shared" / "data")) / "orex"
INPUTS = ("eight_15", "balloondog", "hand_ok")


def find_input(name: str) -> Path:
    for folder in ("csl_with_ref", "csl_without_ref"):
        path = DATA / folder / f"{name}.csl"
        if path.is_file():
            return path
    raise SystemExit(f"no {name}.csl under {DATA} (set FIELDKIT_SHARED_DATA)")


def run_orex(cs, steps: int, resolution: int, seed: int = 0, log_every: int = 250):
    torch.manual_seed(seed)
    np.random.seed(seed)
    method = OReX(OReXConfig(mesh_resolution=resolution), cs, max_steps=steps, seed=seed)
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        stats = method.train_step(step)
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps}: loss {stats['loss']:.4f} accuracy {stats['accuracy']:.4f} level {stats['level']}", flush=True)
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu
    cpu = time.process_time()
    mesh, info = method.mesh()
    return method, mesh, info, {"train_s": train_wall, "train_cpu_s": train_cpu, "mesh_s": info["seconds"], "mesh_cpu_s": time.process_time() - cpu}


def run_baseline(cs, resolution: int):
    wall, cpu = time.perf_counter(), time.process_time()
    base = BaselineReconstruction(cs)
    mesh, info = base.mesh(resolution)
    return base, mesh, info, {"train_s": 0.0, "train_cpu_s": 0.0, "mesh_s": time.perf_counter() - wall, "mesh_cpu_s": time.process_time() - cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="*", default=list(INPUTS))
    parser.add_argument("--steps", type=int, default=OReX.default_max_steps, help="OReX training steps (default: the method's default)")
    parser.add_argument("--resolution", type=int, default=256, help="meshing grid (cells along the longest side)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--meshes", type=Path, default=None, help="folder to save the meshes and pictures in")
    parser.add_argument("--picture", default=None, help="also train on this input (e.g. Heart-25-even-better) and save a picture")
    parser.add_argument("--picture-out", type=Path, default=Path("orex_picture.png"))
    parser.add_argument("--skip-table", action="store_true", help="only make the --picture")
    args = parser.parse_args()

    print(f"torch {torch.__version__}; OReX runs on {OReXConfig().threads or torch.get_num_threads()} thread(s); CPU count {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name in [] if args.skip_table else args.inputs:
        path = find_input(name)
        cs = read_csl(path)
        reference = find_reference(cs)
        for label, runner in (("OReX", lambda: run_orex(cs, args.steps, args.resolution, args.seed)), ("baseline", lambda: run_baseline(cs, args.resolution))):
            print(f"{name}: {label} ...", flush=True)
            model, mesh, info, times = runner()
            metrics = shape_metrics(mesh, cs, model.inside, reference)
            kind = "OReX" if label == "OReX" else f"baseline ({model.kind})"
            rows.append({"input": name, "method": kind, **{k: metrics[k] for k in ("iou", "chamfer_l1", "hausdorff", "contour_fidelity")}, "watertight": info["watertight"] and info["winding_consistent"], "faces": info["faces"], **times})
            print(f"  {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()})}", flush=True)
            if args.meshes:
                from fieldkit.shapes.preview import save_mesh_views

                args.meshes.mkdir(parents=True, exist_ok=True)
                stem = f"{name}_{label.lower()}"
                mesh.export(str(args.meshes / f"{stem}.ply"))
                save_mesh_views(mesh, args.meshes / f"{stem}.png", f"{name}: {kind}", contours=cs)

    if rows:
        print()
        print(f"OReX ({args.steps} steps) vs baseline, meshed at {args.resolution} cells; IoU on 128^3, Chamfer-L1 / Hausdorff on 100k samples (reference units)")
        header = f"| {'input':<11}| {'method':<23}| {'IoU':>6} | {'Chamfer-L1':>10} | {'Hausdorff':>9} | {'contour fid.':>12} | {'watertight':>10} | {'train s':>8} | {'mesh s':>7} | {'wall s':>7} | {'CPU s':>7} |"
        print(header)
        print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
        for r in rows:
            wall = r["train_s"] + r["mesh_s"]
            cpu = r["train_cpu_s"] + r["mesh_cpu_s"]
            print(f"| {r['input']:<11}| {r['method']:<23}| {r['iou']:>6.4f} | {r['chamfer_l1']:>10.5f} | {r['hausdorff']:>9.5f} | {r['contour_fidelity']:>12.4f} | {str(r['watertight']):>10} | {r['train_s']:>8.1f} | {r['mesh_s']:>7.1f} | {wall:>7.1f} | {cpu:>7.1f} |")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")

    if args.picture:
        from fieldkit.shapes.preview import save_mesh_views

        cs = read_csl(find_input(args.picture))
        print(f"{args.picture}: {len(cs.planes)} planes in {len(cs.directions())} directions; OReX ...", flush=True)
        model, mesh, info, times = run_orex(cs, args.steps, args.resolution, args.seed)
        title = f"{args.picture}: OReX, {args.steps} steps, {info['faces']} faces, watertight={info['watertight']}, train {times['train_s']:.0f} s + mesh {times['mesh_s']:.0f} s"
        save_mesh_views(mesh, args.picture_out, title, contours=cs, up_axis=2)
        print(f"Wrote {args.picture_out} ({title})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

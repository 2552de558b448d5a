"""OReX vs a classic baseline on the OReX inputs that ship with reference meshes, plus pictures of the rest.

    python benchmarks/orex.py                       # table: eight_15, balloondog, hand_ok at the defaults
    python benchmarks/orex.py --pictures all        # ... and every csl_without_ref input -> benchmarks/orex_pictures/<name>.png
    python benchmarks/orex.py --skip-table --pictures Skull-20 SideBishop
    python benchmarks/orex.py --inputs eight_15 --steps 500 --resolution 128

For each table input: OReX trained with its defaults (``fieldkit train x.csl``), meshed at ``--resolution``;
the baseline (signed-distance interpolation between the parallel slices) meshed on the same grid. Metrics:
volumetric IoU on a 128^3 grid, Chamfer-L1 and Hausdorff on 100k surface samples (reference units),
contour fidelity (fraction of probes either side of every contour labelled right), watertightness,
and wall / CPU seconds on this machine (training and meshing).

For each ``--pictures`` input (no reference needed): OReX at the defaults, the mesh checked for
watertightness, a PNG rendered from the mesh (the input contours and three views; palette-compressed,
typically under 200 KB) and a second table with the input's size and the wall / CPU seconds.
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
PICTURES_DIR = ROOT / "benchmarks" / "orex_pictures"


def find_input(name: str) -> Path:
    for folder in ("csl_with_ref", "csl_without_ref"):
        path = DATA / folder / f"{name}.csl"
        if path.is_file():
            return path
    raise SystemExit(f"no {name}.csl under {DATA} (set FIELDKIT_SHARED_DATA)")


def run_orex(cs, steps: int, resolution: int, seed: int = 0, log_every: int = 250, ensemble: int | None = None):
    torch.manual_seed(seed)
    np.random.seed(seed)
    config = OReXConfig(mesh_resolution=resolution, ensemble=ensemble or OReXConfig.ensemble)
    method = OReX(config, cs, max_steps=steps, seed=seed)
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        stats = method.train_step(step)
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps}: loss {stats['loss']:.4f} accuracy {stats['accuracy']:.4f} level {stats['level']}", flush=True)
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu
    cpu = time.process_time()
    mesh, info = method.mesh()
    return method, mesh, info, {"train_s": train_wall, "train_cpu_s": train_cpu, "mesh_s": info["seconds"], "mesh_cpu_s": time.process_time() - cpu}


def without_ref_inputs() -> list[str]:
    """Every ``.csl`` in ``csl_without_ref``, smallest file first."""
    folder = DATA / "csl_without_ref"
    if not folder.is_dir():
        raise SystemExit(f"no {folder} (set FIELDKIT_SHARED_DATA)")
    return [p.stem for p in sorted(folder.glob("*.csl"), key=lambda p: (p.stat().st_size, p.name))]


def save_picture(mesh, cs, path: Path, title: str) -> Path:
    """The mesh views (``save_mesh_views``), re-encoded with a 256-colour palette to stay small."""
    from PIL import Image

    from fieldkit.methods.orex import _up_axis
    from fieldkit.shapes.preview import save_mesh_views

    save_mesh_views(mesh, path, title, contours=cs, up_axis=_up_axis(cs))
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    return path


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
    parser.add_argument("--ensemble", type=int, default=None, help="OReX networks averaged (default: the method's default, --orex.ensemble)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--meshes", type=Path, default=None, help="folder to save the meshes and pictures in")
    parser.add_argument("--pictures", nargs="*", default=None, metavar="NAME", help="also reconstruct these inputs (no reference needed) and write --pictures-dir/NAME.png; 'all': every .csl in csl_without_ref")
    parser.add_argument("--pictures-dir", type=Path, default=PICTURES_DIR)
    parser.add_argument("--picture", default=None, help="one more picture input, written to --picture-out")
    parser.add_argument("--picture-out", type=Path, default=Path("orex_picture.png"))
    parser.add_argument("--skip-table", action="store_true", help="only make the pictures")
    args = parser.parse_args()

    ensemble = args.ensemble or OReXConfig.ensemble
    print(f"torch {torch.__version__}; OReX: {ensemble} network(s), one thread each; CPU count {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name in [] if args.skip_table else args.inputs:
        path = find_input(name)
        cs = read_csl(path)
        reference = find_reference(cs)
        for label, runner in (("OReX", lambda: run_orex(cs, args.steps, args.resolution, args.seed, ensemble=args.ensemble)), ("baseline", lambda: run_baseline(cs, args.resolution))):
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
        for name in dict.fromkeys(r["input"] for r in rows):
            orex = next((r for r in rows if r["input"] == name and r["method"] == "OReX"), None)
            base = next((r for r in rows if r["input"] == name and r["method"] != "OReX"), None)
            if orex and base:
                print(f"{name}: OReX IoU {orex['iou']:.4f} ({'>=' if orex['iou'] >= 0.95 else '<'} 0.95), Chamfer-L1 {orex['chamfer_l1']:.5f} vs baseline {base['chamfer_l1']:.5f} ({'better' if orex['chamfer_l1'] < base['chamfer_l1'] else 'not better'})")

    names = list(args.pictures or [])
    if names == ["all"]:
        names = without_ref_inputs()
    if args.picture:  # the older single-picture form
        names.append(args.picture)
    pictures = []
    for name in names:
        path = find_input(name)
        cs = read_csl(path)
        print(f"{name}: {len(cs.planes)} planes in {len(cs.directions())} directions, {cs.n_vertices} vertices; OReX ...", flush=True)
        model, mesh, info, times = run_orex(cs, args.steps, args.resolution, args.seed, ensemble=args.ensemble)
        watertight = bool(info["watertight"] and info["winding_consistent"])
        title = f"{name}: OReX, {args.steps} steps, {info['faces']} faces, watertight={watertight}"
        out = args.picture_out if (args.picture and name == args.picture) else args.pictures_dir / f"{name}.png"
        save_picture(mesh, cs, out, title)
        row = {"input": name, "planes": len(cs.planes), "directions": len(cs.directions()), "vertices": cs.n_vertices, "faces": info["faces"], "components": info["components"], "watertight": watertight, "picture": str(out), "png_kb": out.stat().st_size / 1024, **times}
        pictures.append(row)
        print(f"  wrote {out} ({row['png_kb']:.0f} KB); {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})}", flush=True)
        if args.meshes:
            args.meshes.mkdir(parents=True, exist_ok=True)
            mesh.export(str(args.meshes / f"{name}_orex.ply"))
    if pictures:
        print()
        print(f"OReX ({args.steps} steps) on inputs without a reference, meshed at {args.resolution} cells")
        header = f"| {'input':<21}| {'planes':>6} | {'dirs':>4} | {'vertices':>8} | {'faces':>7} | {'watertight':>10} | {'train s':>8} | {'mesh s':>7} | {'wall s':>7} | {'CPU s':>7} |"
        print(header)
        print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
        for r in pictures:
            print(f"| {r['input']:<21}| {r['planes']:>6} | {r['directions']:>4} | {r['vertices']:>8} | {r['faces']:>7} | {str(r['watertight']):>10} | {r['train_s']:>8.1f} | {r['mesh_s']:>7.1f} | {r['train_s'] + r['mesh_s']:>7.1f} | {r['train_cpu_s'] + r['mesh_cpu_s']:>7.1f} |")
    if args.json and (rows or pictures):
        args.json.write_text(json.dumps({"table": rows, "pictures": pictures}, indent=2) + "\n")
    if pictures and not all(r["watertight"] for r in pictures):
        print("some meshes are not watertight", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

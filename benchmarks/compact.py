"""gs vs gs-compact on one scene: storage, Gaussian count, test PSNR/SSIM, render time, one table.

    python benchmarks/compact.py                          # lego_200, 2000 steps each
    python benchmarks/compact.py --steps 600 --test-views 10 --out /tmp/compact_bench

Both methods train through the CLI (``fieldkit train --method gs|gs-compact``) at the same step
budget and seed. Storage: gs -> its standard PLY (SH degree 3, 248 B per Gaussian); gs-compact ->
its ``.fkc`` file (and, for reference, its PLY with baked DC colour). Test metrics over the first
``--test-views`` test views; the decoded ``.fkc`` is evaluated too (what a reader would see).
Render time: mean wall seconds per test view on this machine (torch threads as given).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fieldkit  # noqa: E402,F401  (before torch)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fieldkit.cli import main as cli  # noqa: E402
from fieldkit.metrics import psnr, ssim  # noqa: E402
from fieldkit.runs import load_run  # noqa: E402

DATA = Path(os.environ.get("FIELDKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def evaluate(render, images, cameras, n: int) -> dict:
    ps, ss, secs = [], [], []
    for i in range(min(n, len(cameras))):
        t = time.perf_counter()
        rgb = render(cameras[i])["rgb"].cpu()
        secs.append(time.perf_counter() - t)
        ps.append(float(psnr(rgb, images[i : i + 1])[0]))
        ss.append(float(ssim(rgb, images[i : i + 1])[0]))
    return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)), "render_s": float(np.mean(secs))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", default="lego_200")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--test-views", type=int, default=25)
    ap.add_argument("--init-points", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_compact"))
    ap.add_argument("--methods", nargs="+", default=["gs", "gs-compact"])
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    ap.add_argument("--compact-args", nargs="*", default=[], help="extra train flags for gs-compact (each value is split like a shell line), e.g. \"--compact-args=--gs-compact.hash-log2-size=11 --gs-compact.lambda-mask=5e-4\"")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = DATA / args.scene
    results: dict[str, dict] = {"scene": args.scene, "steps": args.steps, "threads": args.threads}
    for name in args.methods:
        run = args.out / name
        if not (run / "checkpoints").exists():
            key = name.replace("-", "_")
            t = time.perf_counter()
            rc = cli(["train", str(data), "-o", str(run), "--method", name, "--max-steps", str(args.steps), "--backend", args.backend,
                      f"--{key.replace('_', '-')}.init-random-points", str(args.init_points), "--eval-every", str(10**9), "--save-every", str(args.steps)]
                     + ([a for x in args.compact_args for a in shlex.split(x)] if name == "gs-compact" else []))
            assert rc == 0
            train_s = time.perf_counter() - t
        else:
            train_s = float("nan")
        method, scene, _, _ = load_run(run, backend=args.backend)
        images, cameras = scene.subset("test")
        row = {"train_s": train_s, "gaussians": int(method.stats()["gaussians"])}
        row.update(evaluate(method.render, images, cameras, args.test_views))
        ply = run / "exports" / "model.ply"
        cli(["export", str(run), "--format", "ply", "-o", str(ply)])
        row["ply_bytes"] = ply.stat().st_size
        if name == "gs-compact":
            from fieldkit.export.compact import read_compact

            fkc = run / "exports" / "scene.fkc"
            cli(["export", str(run), "--format", "compact", "-o", str(fkc)])
            row["fkc_bytes"] = fkc.stat().st_size
            head = fkc.read_bytes()
            header = json.loads(head[8 : 8 + int.from_bytes(head[4:8], "little")])
            row["fkc_sections"] = {s["name"]: s["bytes"] for s in header["sections"]}
            model = read_compact(fkc)
            dec = evaluate(lambda c: model.render(c, backend=args.backend), images, cameras, args.test_views)
            row.update({f"fkc_{k}": v for k, v in dec.items()})
        results[name] = row
        print(json.dumps({name: row}), flush=True)
    if "gs" in results and "gs-compact" in results:
        g, c = results["gs"], results["gs-compact"]
        results["ratio_gs_ply_over_fkc"] = g["ply_bytes"] / c["fkc_bytes"]
        results["psnr_drop_fkc_vs_gs"] = g["psnr"] - c["fkc_psnr"]
        print(f"\n{'':<22}{'gs':>14}{'gs-compact':>14}{'.fkc decoded':>14}")
        print(f"{'storage (bytes)':<22}{g['ply_bytes']:>14,}{c['ply_bytes']:>14,}{c['fkc_bytes']:>14,}")
        print(f"{'gaussians':<22}{g['gaussians']:>14,}{c['gaussians']:>14,}{c['gaussians']:>14,}")
        print(f"{'test PSNR':<22}{g['psnr']:>14.2f}{c['psnr']:>14.2f}{c['fkc_psnr']:>14.2f}")
        print(f"{'test SSIM':<22}{g['ssim']:>14.4f}{c['ssim']:>14.4f}{c['fkc_ssim']:>14.4f}")
        print(f"{'render s/view':<22}{g['render_s']:>14.3f}{c['render_s']:>14.3f}{c['fkc_render_s']:>14.3f}")
        print(f"{'train s':<22}{g['train_s']:>14.1f}{c['train_s']:>14.1f}")
        print(f"gs PLY / .fkc = {results['ratio_gs_ply_over_fkc']:.1f}x; PSNR drop = {results['psnr_drop_fkc_vs_gs']:.2f} dB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

"""``fieldkit`` command line: train, eval, render, export (tyro subcommands over dataclasses)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import torch
import tyro

from fieldkit import __version__
from fieldkit.io_atomic import atomic_path
from fieldkit.methods import default_method_for, describe_methods, load_method_classes
from fieldkit.methods.gs import GSConfig
from fieldkit.methods.gs_compact import CompactConfig
from fieldkit.methods.gs_hier import HierConfig
from fieldkit.methods.orex import OReXConfig
from fieldkit.shapes.cli_slice import SliceCommand, run_slice
from fieldkit.methods.nerf import NerfConfig
from fieldkit.fit_image import FitImageCommand, run_fit_image
from fieldkit.runs import DataOptions, RunRecord, default_run_dir, load_run, read_record, write_record
from fieldkit.regress import RegressCommand, run_regress
from fieldkit.trainer import Trainer, TrainerConfig
from fieldkit.viewer.command import ViewCommand, run_view

MethodName = Literal["gs", "gs-compact", "gs-hier", "nerf", "orex"]
BackendName = Literal["auto", "torch", "cpu", "cuda", "gsplat"]


@dataclass
class TrainCommand:
    """Train a reconstruction. Methods: gs (3D Gaussian splatting, default for posed images)."""

    data_path: tyro.conf.Positional[Path]
    """Scene folder (Blender, nerfstudio transforms.json, COLMAP, or LLFF; detected automatically)."""
    method: Optional[MethodName] = None
    """Method to train (default: chosen from the data: posed images -> gs)."""
    output: Annotated[Optional[Path], tyro.conf.arg(aliases=("-o",))] = None
    """Run folder, used exactly as given (default: outputs/<scene>/<method>/<timestamp>)."""
    max_steps: Optional[int] = None
    """Training steps (default: the scene's fieldkit.json hint, else 7000)."""
    backend: BackendName = "auto"
    """Rasterizer backend: auto picks cuda, then the native CPU build, then torch."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto uses the GPU when torch sees one (OReX always trains on the CPU)."""
    seed: int = 0
    resume: bool = False
    """Continue from the newest checkpoint in --output."""
    eval_every: int = 1000
    save_every: int = 2000
    viewer: bool = False
    """Watch training live in the browser (viser); the viewer stays up after training until Ctrl-C."""
    viewer_host: str = "127.0.0.1"
    """Interface the viewer binds (0.0.0.0 exposes it to the network)."""
    viewer_port: int = 8080
    """Viewer port; 0 picks a free one (the URL is printed)."""
    s3im_weight: Optional[float] = None
    """S3IM loss weight for the chosen method (sets --gs.s3im-weight or --nerf.s3im-weight)."""
    optimizer: Optional[Literal["adam", "lm"]] = None
    """gs: adam, or lm (Adam through densification, then Levenberg-Marquardt for the last --gs.lm.iterations steps); sets --gs.optimizer."""
    data: DataOptions = field(default_factory=DataOptions)
    gs: GSConfig = field(default_factory=GSConfig)
    gs_compact: CompactConfig = field(default_factory=CompactConfig)
    gs_hier: HierConfig = field(default_factory=HierConfig)
    orex: OReXConfig = field(default_factory=OReXConfig)
    nerf: NerfConfig = field(default_factory=NerfConfig)


@dataclass
class EvalCommand:
    """Render the held-out views of a run and write <run>/eval.json (nerfstudio ns-eval shape)."""

    run: tyro.conf.Positional[Path]
    split: str = "test"
    backend: Optional[BackendName] = None
    output: Annotated[Optional[Path], tyro.conf.arg(aliases=("-o",))] = None
    """Where to write the JSON (default: <run>/eval.json)."""
    reference: Optional[Path] = None
    """Shape methods (orex): reference mesh for IoU / Chamfer-L1 / Hausdorff (default: reference/<name>*.stl beside the .csl)."""


@dataclass
class RenderCommand:
    """Write PNGs of a split's views, plus ground-truth | render | error side-by-sides."""

    run: tyro.conf.Positional[Path]
    split: str = "test"
    output: Annotated[Optional[Path], tyro.conf.arg(aliases=("-o",))] = None
    """Folder for the images (default: <run>/renders/<split>)."""
    backend: Optional[BackendName] = None


@dataclass
class ExportCommand:
    """Export a trained model: ply (standard 3DGS layout) or splat (antimatter15 32-byte); lod (.fklod level-of-detail tree, any Gaussian run); orex: mesh (.obj/.ply/.stl/.glb from the -o suffix)."""

    run: tyro.conf.Positional[Path]
    format: Literal["ply", "splat", "mesh", "compact", "lod"] = "ply"
    output: Annotated[Optional[Path], tyro.conf.arg(aliases=("-o",))] = None
    """File to write (default: <run>/exports/model.<format>)."""


def _scene_hints(data_path: Path) -> dict:
    """Optional ``fieldkit.json`` in a scene folder with defaults such as max_steps."""
    hint = data_path / "fieldkit.json"
    if hint.is_file():
        try:
            return json.loads(hint.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{hint}: not valid JSON ({error})") from error
    return {}


def run_train(cmd: TrainCommand) -> Path:
    data_path = cmd.data_path.resolve()
    if not data_path.exists():
        raise FileNotFoundError(f"data folder {cmd.data_path} does not exist")
    hints = _scene_hints(data_path)
    method_name = cmd.method or hints.get("method") or default_method_for(data_path)
    max_steps = cmd.max_steps or int(hints.get("max_steps", getattr(load_method_classes(method_name)[1], "default_max_steps", 7000)))
    run_dir = cmd.output or default_run_dir(data_path, method_name)
    if cmd.resume and not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"--resume needs an existing run folder with config.json, got {run_dir}")
    if cmd.resume and cmd.max_steps is None:  # continue to the run's own target, not the 7000 default
        max_steps = read_record(run_dir).max_steps
    if not cmd.resume and (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --output")

    config_cls, method_cls = load_method_classes(method_name)
    background = torch.tensor(cmd.data.background, dtype=torch.float32) if cmd.data.background is not None else None
    print(f"Loading {data_path} ...", flush=True)
    scene = method_cls.load_data(data_path, downscale=cmd.data.downscale, background=background)
    if hasattr(scene, "subset"):
        images, _ = scene.subset("train")
        print(f"Scene {scene.name or data_path.name}: {len(scene.split['train'])} train / {len(scene.split.get('test', []))} test views at {images.shape[2]}x{images.shape[1]}")

    method_config = getattr(cmd, method_name.replace("-", "_"), None) or config_cls()
    if cmd.s3im_weight is not None:
        if not hasattr(method_config, "s3im_weight"):
            raise ValueError(f"method {method_name} has no S3IM loss (--s3im-weight)")
        method_config = dataclasses.replace(method_config, s3im_weight=cmd.s3im_weight)
    if cmd.optimizer is not None:
        if not hasattr(method_config, "optimizer"):
            raise ValueError(f"method {method_name} has no --optimizer choice")
        method_config = dataclasses.replace(method_config, optimizer=cmd.optimizer)
    trainer_config = TrainerConfig(max_steps=max_steps, eval_every=cmd.eval_every, save_every=cmd.save_every, seed=cmd.seed)
    record = RunRecord(
        method=method_name,
        data=str(data_path),
        data_options=dataclasses.asdict(cmd.data),
        method_config=dataclasses.asdict(method_config),
        max_steps=max_steps,
        seed=cmd.seed,
        backend=cmd.backend,
        trainer=dataclasses.asdict(trainer_config),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        fieldkit_version=__version__,
    )
    if not cmd.resume:
        write_record(run_dir, record)
    from fieldkit.trainer import seed_everything

    seed_everything(cmd.seed)
    device_kwargs = {"device": cmd.device} if "device" in inspect.signature(method_cls).parameters else {}
    method = method_cls(method_config, scene, max_steps=max_steps, backend=cmd.backend, seed=cmd.seed, **device_kwargs)
    held_out = method.held_out_views()
    trainer = Trainer(method, run_dir, trainer_config, *(held_out or (None, None)))
    if cmd.resume:
        print(f"Resuming from step {trainer.resume()}")
    print(f"Run folder: {run_dir}")
    viewer = None
    if cmd.viewer:
        from fieldkit.viewer import start_training_viewer

        viewer = start_training_viewer(trainer, run_dir, host=cmd.viewer_host, port=cmd.viewer_port)
    started = time.perf_counter()
    ckpt = trainer.train()
    if hasattr(method, "after_training"):  # e.g. orex meshes its field into the run folder
        method.after_training(run_dir)
    print(f"Done in {time.perf_counter() - started:.1f} s. Checkpoint: {ckpt}")
    print(f"Run folder: {run_dir}\nNext: fieldkit eval {run_dir}")
    if viewer is not None:
        print(f"Viewer still serving the trained model at {viewer.url}; Ctrl-C to exit.", flush=True)
        viewer.wait()
    return run_dir


def evaluate_run(run: Path, split: str = "test", backend: str | None = None, reference: Path | None = None) -> dict:
    """Per-image PSNR/SSIM on a split, averaged in nerfstudio's ns-eval shape."""
    from fieldkit.metrics import psnr, ssim

    method, scene, record, step = load_run(run, backend)
    if hasattr(method, "evaluate"):  # shape methods (orex): metrics against a reference mesh, not images
        return {"experiment_name": Path(record.data).name, "method_name": record.method, "checkpoint": f"step-{step:09d}", **method.evaluate(reference=reference)}
    images, cameras = scene.subset(split)
    psnrs, ssims, seconds = [], [], []
    for i in range(len(cameras)):
        started = time.perf_counter()
        rgb = method.render(cameras[i])["rgb"].cpu()
        seconds.append(time.perf_counter() - started)
        psnrs.append(float(psnr(rgb, images[i : i + 1])[0]))
        ssims.append(float(ssim(rgb, images[i : i + 1])[0]))
    rays = cameras.width * cameras.height
    rays_per_sec = [rays / s for s in seconds]
    results = {
        "psnr": float(np.mean(psnrs)),
        "psnr_std": float(np.std(psnrs, ddof=1)) if len(psnrs) > 1 else 0.0,
        "ssim": float(np.mean(ssims)),
        "ssim_std": float(np.std(ssims, ddof=1)) if len(ssims) > 1 else 0.0,
        "num_rays_per_sec": float(np.mean(rays_per_sec)),
        "num_rays_per_sec_std": float(np.std(rays_per_sec, ddof=1)) if len(seconds) > 1 else 0.0,
        "fps": float(np.mean(rays_per_sec) / rays),
        "num_images": len(cameras),
    }
    return {
        "experiment_name": Path(record.data).name,
        "method_name": record.method,
        "checkpoint": f"step-{step:09d}",
        "split": split,
        "results": results,
        "per_image": {"psnr": psnrs, "ssim": ssims},
    }


def run_eval(cmd: EvalCommand) -> dict:
    report = evaluate_run(cmd.run, cmd.split, cmd.backend, reference=cmd.reference)
    out = cmd.output or cmd.run / "eval.json"
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    r = report["results"]
    if "psnr" not in r:  # shape metrics
        for key, value in r.items():
            print(f"{key:<22}{value:>12.5f}" if isinstance(value, float) else f"{key:<22}{value!s:>12}")
        print(f"{report['checkpoint']}; wrote {out}")
        return report
    print(f"{'metric':<18}{'mean':>12}{'std':>12}")
    for key in ("psnr", "ssim", "num_rays_per_sec"):
        print(f"{key:<18}{r[key]:>12.4f}{r.get(key + '_std', 0.0):>12.4f}")
    print(f"{report['results']['num_images']} {cmd.split} views, {report['checkpoint']}; wrote {out}")
    return report


def run_render(cmd: RenderCommand) -> Path:
    from fieldkit.render.images import save_comparison, save_png

    method, scene, record, step = load_run(cmd.run, cmd.backend)
    images, cameras = scene.subset(cmd.split)
    out_dir = cmd.output or cmd.run / "renders" / cmd.split
    out_dir.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    for i in tqdm(range(len(cameras)), desc="render", unit="view"):
        rgb = method.render(cameras[i])["rgb"][0].cpu()
        save_png(out_dir / f"{i:04d}.png", rgb)
        save_comparison(out_dir / f"{i:04d}_compare.png", images[i], rgb)
    print(f"Wrote {len(cameras)} renders and side-by-sides (ground truth | render | error) to {out_dir}")
    return out_dir


def run_export(cmd: ExportCommand) -> Path:
    method, scene, record, _ = load_run(cmd.run)
    out = cmd.output or cmd.run / "exports" / f"model.{cmd.format}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if cmd.format == "mesh" and "mesh" not in getattr(method, "export_formats", ()):
        from fieldkit.export.mesh import export_mesh  # TSDF fusion of rendered depth (e.g. Gaussian runs)

        path = export_mesh(method, out if cmd.output else out.with_suffix(".ply"), scene, tsdf=True)
    else:
        path = method.export(cmd.format, out)
    print(f"Wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return path


COMMANDS = {
    "train": (TrainCommand, run_train),
    "eval": (EvalCommand, run_eval),
    "render": (RenderCommand, run_render),
    "export": (ExportCommand, run_export),
    "slice": (SliceCommand, run_slice),
    "view": (ViewCommand, run_view),
    "regress": (RegressCommand, run_regress),
    "fit-image": (FitImageCommand, run_fit_image),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fieldkit`` console script."""
    TrainCommand.__doc__ = f"Train a reconstruction. Methods: {describe_methods()}."
    argv = sys.argv[1:] if argv is None else argv
    cmd = tyro.extras.subcommand_cli_from_dict(
        {name: cls for name, (cls, _) in COMMANDS.items()},
        prog="fieldkit",
        description="fieldkit: reconstruct 3D from real data.",
        args=argv,
    )
    runner = next(run for cls, run in COMMANDS.values() if isinstance(cmd, cls))
    try:
        result = runner(cmd)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"fieldkit: error: {error}", file=sys.stderr)
        return 2
    return result if type(result) is int else 0  # regress returns 1 when images drifted


if __name__ == "__main__":
    raise SystemExit(main())

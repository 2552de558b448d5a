"""End to end through ``fieldkit.cli.main``: train, eval, render, export, resume, Ctrl-C.

Everything runs on a tiny scene written into a temporary folder by scenes/make_demo.py (the
analytic ray tracer, not a splat renderer): 8 train + 2 test views at 32x32, 500 random initial
Gaussians, the torch backend, one torch thread (the machine is shared; fewer threads are faster
under contention and timings do not matter here).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fieldkit
from fieldkit.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--backend", "torch", "--gs.init-random-points", "500", "--eval-every", "0"]
# Densification inside 30 steps, with refines (7, 14, 21, 28) that do not line up with checkpoints.
DENSIFY_EARLY = ["--gs.no-scale-schedule-to-steps", "--gs.densify.start-step", "5", "--gs.densify.interval", "7"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: 1 thread for this module


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("fieldkit_make_demo_cli", REPO_ROOT / "scenes" / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("scene") / "tiny"
    module.main(["--out", str(out), "--size", "32", "--train", "8", "--test", "2"])
    return out


def train(scene: Path, run: Path, *extra: str) -> int:
    return main(["train", str(scene), "-o", str(run), *COMMON, *extra])


def steps_of(run: Path, key: str = "loss") -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if key in json.loads(line)]


def ckpt(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step-{step:09d}.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def run(scene: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run60"
    assert main(["train", str(scene), "-o", str(out), "--max-steps", "60", "--backend", "torch",
                 "--gs.init-random-points", "500", "--eval-every", "30", "--save-every", "30"]) == 0
    return out


def test_train_writes_config_metrics_and_curves(run: Path, scene: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "gs" and config["data"] == str(scene.resolve())
    assert (config["max_steps"], config["seed"], config["backend"]) == (60, 0, "torch")
    assert config["data_options"] == {"downscale": 1, "background": None}
    assert config["method_config"]["init_random_points"] == 500
    assert config["method_config"]["sh_degree"] == 3
    assert config["method_config"]["densify"]["grad_threshold"] == 0.0002
    assert config["trainer"] == {"max_steps": 60, "eval_every": 30, "eval_views": 5, "save_every": 30, "log_every": 10, "seed": 0}
    assert config["fieldkit_version"] == fieldkit.__version__
    time.strptime(config["created"], "%Y-%m-%dT%H:%M:%S")

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in records if "eval_psnr" in r] == [30, 60]
    elapsed = [r["elapsed_s"] for r in train_records]
    assert elapsed == sorted(elapsed)
    assert all(r["gaussians"] == 500 for r in train_records)  # densification starts after step 100
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["psnr"]) for r in train_records)
    # The logged loss is one view's, so compare the ends with a margin, not every step.
    assert train_records[-1]["loss"] < 0.85 * train_records[0]["loss"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000030.pt", "step-000000060.pt"]

    png = run / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_training_lowers_error_on_all_train_views(run: Path) -> None:
    """A real learning check: the initial model (same seed) against the final one, all 8 views."""
    from fieldkit.runs import build_method, load_run

    final, scene, record, step = load_run(run)
    assert step == 60
    initial = build_method(record, scene)
    images, cameras = scene.subset("train")

    def mse(method) -> float:
        return float(torch.mean((method.render(cameras)["rgb"] - images) ** 2))

    before, after = mse(initial), mse(final)
    assert after < 0.6 * before, (before, after)


def _ground_truth(scene: Path, split: str) -> list[np.ndarray]:
    """The split's PNGs composited on white, straight from the files (float64)."""
    meta = json.loads((scene / f"transforms_{split}.json").read_text())
    out = []
    for frame in meta["frames"]:
        rgba = np.asarray(Image.open(scene / (frame["file_path"] + ".png")).convert("RGBA"), dtype=np.float64) / 255.0
        out.append(rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:]))
    return out


def test_eval_psnr_matches_rendered_pngs(run: Path, scene: Path, tmp_path: Path) -> None:
    assert main(["eval", str(run)]) == 0
    report = json.loads((run / "eval.json").read_text())
    results = report["results"]
    for key in ("psnr", "ssim", "psnr_std", "ssim_std", "num_rays_per_sec"):
        assert key in results and math.isfinite(results[key]), key
    assert report["checkpoint"] == "step-000000060" and report["split"] == "test" and results["num_images"] == 2
    assert 0 < results["ssim"] <= 1 and results["num_rays_per_sec"] > 0 and results["psnr"] > 5

    renders = tmp_path / "renders"
    assert main(["render", str(run), "-o", str(renders)]) == 0
    truth = _ground_truth(scene, "test")
    mine = []
    for i, gt in enumerate(truth):
        with Image.open(renders / f"{i:04d}.png") as im:
            assert im.size == (32, 32) and im.mode == "RGB"
            img = np.asarray(im, dtype=np.float64) / 255.0
        mine.append(-10 * math.log10(np.mean((img - gt) ** 2)))
        assert (renders / f"{i:04d}_compare.png").is_file()
    # 8-bit rounding of the renders moves the PSNR by far less than 0.05 dB at these error levels.
    np.testing.assert_allclose(report["per_image"]["psnr"], mine, atol=0.05)
    assert results["psnr"] == pytest.approx(float(np.mean(mine)), abs=0.05)
    assert results["psnr_std"] == pytest.approx(float(np.std(mine, ddof=1)), abs=0.05)


def test_export_ply_layout_and_rerender(run: Path, tmp_path: Path) -> None:
    from plyfile import PlyData

    from fieldkit.export import read_ply
    from fieldkit.render import rasterize
    from fieldkit.runs import load_run

    params = ckpt(run, 60)["state"]["params"]
    n = params["means"].shape[0]
    out = tmp_path / "x.ply"
    assert main(["export", str(run), "--format", "ply", "-o", str(out)]) == 0
    vertex = PlyData.read(str(out))["vertex"]
    expected = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(45)]
                + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    assert [p.name for p in vertex.properties] == expected
    assert all(np.dtype(p.val_dtype) == np.dtype("<f4") for p in vertex.properties)
    assert vertex.count == n
    col = lambda name: torch.from_numpy(np.asarray(vertex[name], dtype=np.float32))  # noqa: E731
    assert torch.equal(col("y"), params["means"][:, 1])
    assert torch.equal(col("opacity"), params["opacity_logits"])
    assert torch.equal(col("scale_2"), params["log_scales"][:, 2])
    assert torch.equal(col("rot_0"), params["quats"][:, 0])
    assert torch.equal(col("f_dc_1"), params["sh_dc"][:, 0, 1])
    # f_rest is channel-major: f_rest_{c*15 + (k-1)} = sh[:, k, c] for k = 1..15.
    assert torch.equal(col("f_rest_1"), params["sh_rest"][:, 1, 0])
    assert torch.equal(col("f_rest_15"), params["sh_rest"][:, 0, 1])
    assert torch.equal(col("f_rest_44"), params["sh_rest"][:, 14, 2])
    assert torch.count_nonzero(col("nx")) == 0

    method, scene, _, _ = load_run(run)
    _, cameras = scene.subset("test")
    expected_rgb = method.render(cameras)["rgb"]
    s = read_ply(out)
    got = rasterize(s.means, s.quats, torch.exp(s.log_scales), torch.sigmoid(s.opacity_logits), s.sh, cameras,
                    sh_degree=3, background=scene.background, backend="torch").rgb.clamp(0, 1)
    torch.testing.assert_close(got, expected_rgb, rtol=0, atol=1e-5)


def test_export_splat_size(run: Path, tmp_path: Path) -> None:
    params = ckpt(run, 60)["state"]["params"]
    n = params["means"].shape[0]
    assert main(["export", str(run), "--format", "splat"]) == 0
    out = run / "exports" / "model.splat"
    assert out.stat().st_size == 32 * n
    positions = np.fromfile(out, dtype="<f4").reshape(n, 8)[:, :3]  # 3 float32 position, then scale ...
    np.testing.assert_array_equal(np.sort(positions[:, 0]), np.sort(params["means"][:, 0].numpy()))


def test_checkpoint_is_weights_only_loadable(run: Path) -> None:
    data = ckpt(run, 60)  # torch.load(..., weights_only=True)
    assert data["step"] == 60 and data["method"] == "gs"
    assert set(data["state"]["params"]) == {"means", "quats", "log_scales", "opacity_logits", "sh_dc", "sh_rest"}
    assert isinstance(data["rng"]["torch"], torch.Tensor)


def test_refuses_to_overwrite_a_run(run: Path, scene: Path, capsys) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    config = (run / "config.json").read_text()
    assert train(scene, run, "--max-steps", "5") == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before
    assert (run / "config.json").read_text() == config


def test_eval_needs_a_run_folder(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert main(["eval", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "not a run folder" in err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "no_scene"), "-o", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_continues_and_extends(scene: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "r"
    assert train(scene, run, "--max-steps", "20", "--save-every", "10") == 0
    assert steps_of(run) == [10, 20]
    reference = ckpt(run, 20)["state"]["params"]
    # A crash after step 20 was logged but before its checkpoint: resume from 10, up to the
    # run's own max_steps (20, from config.json; not the 7000 default), without duplicate records.
    (run / "checkpoints" / "step-000000020.pt").unlink()
    capsys.readouterr()
    assert main(["train", str(scene), "-o", str(run), "--resume", "--backend", "torch", "--eval-every", "0"]) == 0
    assert "Resuming from step 10" in capsys.readouterr().out
    assert steps_of(run) == [10, 20]
    again = ckpt(run, 20)["state"]["params"]
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    # Extend the finished run to 30 steps.
    assert train(scene, run, "--max-steps", "30", "--save-every", "10", "--resume") == 0
    assert "Resuming from step 20" in capsys.readouterr().out
    assert steps_of(run) == [10, 20, 30]  # the new records are all in 21..30
    assert ckpt(run, 30)["step"] == 30
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step-000000030.pt"


def test_resume_is_bit_identical_to_uninterrupted(scene: Path, tmp_path: Path) -> None:
    """30 steps in one go == 20 steps, stop, resume to 30 (with densification in between)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert train(scene, full, "--max-steps", "30", "--save-every", "10", *DENSIFY_EARLY) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "config.json", resumed)
    shutil.copy(full / "metrics.jsonl", resumed)  # includes step 30, logged "after" the checkpoint
    shutil.copy(full / "checkpoints" / "step-000000020.pt", resumed / "checkpoints")
    assert train(scene, resumed, "--max-steps", "30", "--save-every", "10", "--resume", *DENSIFY_EARLY) == 0
    assert steps_of(resumed) == [10, 20, 30]

    a, b = ckpt(full, 30)["state"], ckpt(resumed, 30)["state"]
    assert a["params"]["means"].shape[0] > 1000  # densification (split) really ran, also after step 20
    assert ckpt(full, 20)["state"]["params"]["means"].shape[0] < a["params"]["means"].shape[0]
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    for key in a["optimizer"]["state"]:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["optimizer"]["state"][key][moment], b["optimizer"]["state"][key][moment])
    assert torch.equal(a["generator"], b["generator"]) and a["order"] == b["order"]


def test_ctrl_c_saves_and_explains_resume(scene: Path, tmp_path: Path) -> None:
    run = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fieldkit.cli", "train", str(scene), "-o", str(run), *COMMON,
           "--max-steps", "100000", "--save-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    saved = sorted((run / "checkpoints").glob("step-*.pt"))
    assert len(saved) == 1
    step = ckpt(run, int(saved[0].stem.split("-")[1]))["step"]
    assert 10 <= step < 100000
    assert f"Interrupted at step {step}" in out
    assert "Resume with: fieldkit train --resume" in out and str(run) in out
    assert (run / "training_curves.png").is_file()
    # The checkpoint is good to continue from.
    assert train(scene, run, "--resume", "--max-steps", str(step + 5)) == 0
    assert ckpt(run, step + 5)["step"] == step + 5


def test_pick_device_prefers_the_gpu_except_for_the_cpu_backend(monkeypatch):
    """auto -> the GPU when torch sees one, but a run asking for the native CPU rasterizer stays on the CPU."""
    import torch

    from fieldkit.methods.base import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto", "auto") == torch.device("cuda")
    assert pick_device("auto", "torch") == torch.device("cuda")
    assert pick_device("auto", "cpu") == torch.device("cpu")
    assert pick_device("cpu", "cuda") == torch.device("cpu")  # an explicit device wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", "auto") == torch.device("cpu")

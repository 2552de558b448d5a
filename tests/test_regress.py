"""Rendering regression checks: the Kaolin-style rule, golden images per method and backend, and
``fieldkit regress`` catching a perturbed render while passing an untouched one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fieldkit.regress import (
    compare_images,
    compare_to_references,
    error_heatmap,
    format_table,
    read_png,
    write_html_report,
)

GOLDEN = Path(__file__).resolve().parent / "golden"


def _make_golden():
    spec = importlib.util.spec_from_file_location("fieldkit_make_golden", GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mg = _make_golden()


# -- the comparison rule ------------------------------------------------------------------------


def _ramp(h: int = 64, w: int = 80) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 3 % 256, y * 4 % 256, (x + y) * 2 % 256], -1).astype(np.uint8)


def test_identical_images_pass_with_infinite_psnr():
    ref = _ramp()
    c = compare_images("a", ref, ref.copy())
    assert c.passed and c.fail_fraction == 0.0 and c.max_diff == 0
    assert c.psnr == float("inf") and c.ssim == pytest.approx(1.0)


def test_pixel_fails_when_any_channel_exceeds_tolerance():
    ref = _ramp()
    img = ref.astype(np.int16)
    img[..., 1] += 2  # every pixel off by 2/255 in one channel: within the default 2/255
    c = compare_images("a", ref, np.clip(img, 0, 255).astype(np.uint8))
    assert c.passed and c.fail_fraction == 0.0
    img = ref.copy()
    img[0, :8, 2] = np.where(img[0, :8, 2] > 127, img[0, :8, 2] - 3, img[0, :8, 2] + 3)  # 8 pixels, blue off by 3
    c = compare_images("a", ref, img)
    assert c.fail_fraction == pytest.approx(8 / (64 * 80))
    assert not c.passed  # 0.156% > 0.1%
    assert compare_images("a", ref, img, max_fail_fraction=0.002).passed
    assert compare_images("a", ref, img, tolerance=3 / 255).passed


def test_size_mismatch_fails_with_reason():
    c = compare_images("a", _ramp(64, 80), _ramp(64, 64))
    assert not c.passed and "size" in c.reason


def test_missing_reference_fails(tmp_path):
    result = compare_to_references({"test_0000": _ramp()}, tmp_path)
    assert not result.passed and "--update" in result.comparisons[0].reason


def test_error_heatmap_marks_failing_pixels():
    ref = _ramp()
    img = ref.copy()
    img[10, 10] = 255 - img[10, 10]
    img[20, 20, 0] = min(255, int(img[20, 20, 0]) + 1)
    heat = error_heatmap(ref, img)
    assert heat[0, 0].tolist() == [0, 0, 0]  # equal
    assert heat[20, 20, 2] > 0 and heat[20, 20, 0] == 0  # within tolerance: blue only
    assert heat[10, 10, 0] == 255  # failing: red and up


# -- golden images: every method on the demo scene, every available backend ---------------------


@pytest.fixture(scope="module")
def golden_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")


def _golden_failure(method, backend, renders, workdir):
    """(None, result) when ``renders`` match the goldens, else (failure message with the table and the
    HTML report's path, result)."""
    refs = mg.references_for(method, backend)
    result = compare_to_references(renders, refs)
    if result.passed:
        return None, result
    report = write_html_report(workdir / f"{method}-{backend}-report.html", result, renders, refs)
    return (
        f"{method} on backend {backend} no longer renders its golden images ({refs}):\n{format_table(result)}\n"
        f"side-by-side report: {report}\nIf the change is intended, regenerate with python tests/golden/make_golden.py"
    ), result


@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda", "gsplat"])
@pytest.mark.parametrize("method", sorted(mg.CASES))
def test_golden_images(method, backend, golden_workdir):
    ok, reason = mg.backend_available(backend, method)
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {reason}")
    refs = mg.references_for(method, backend)
    assert refs.is_dir(), f"no goldens in {refs}; run python tests/golden/make_golden.py"
    renders = mg.render_case(method, backend, golden_workdir / backend)
    assert len(renders) == mg.VIEWS
    message, result = _golden_failure(method, backend, renders, golden_workdir)
    if message:
        pytest.fail(message)
    assert all(c.psnr > 40 for c in result.comparisons)


@pytest.mark.parametrize("method", sorted(mg.TRAINERS))
def test_golden_checkpoint_matches_its_goldens(method):
    """The stored fixed checkpoint is the one the goldens were rendered from (sha256 in each manifest)."""
    import json

    digest = mg.checkpoint_sha256(method)
    folders = sorted(mg.GOLDEN_DIR.glob(f"{method}-*/manifest.json"))
    assert folders, f"no goldens for {method}"
    for manifest in folders:
        recorded = json.loads(manifest.read_text()).get("checkpoint_sha256")
        assert recorded == digest, (
            f"{manifest} was rendered from another {mg.checkpoint_file(method).name} (sha256 {recorded}, stored {digest}); "
            "rerun python tests/golden/make_golden.py"
        )
    assert mg.checkpoint_file(method).stat().st_size < 400_000  # keep tests/golden small


@pytest.mark.parametrize("method", sorted(mg.TRAINERS))
def test_golden_training_is_seeded(method):
    """The script's training is repeatable: two short runs give identical weights (the stored
    checkpoint comes from the full-length run of the same function)."""
    trainer, _ = mg.TRAINERS[method]
    a, b = (mg._render_state(trainer(steps=6)) for _ in range(2))

    def tensors(state, prefix=""):
        for key, value in state.items():
            if isinstance(value, dict):
                yield from tensors(value, f"{prefix}{key}.")
            elif isinstance(value, torch.Tensor):
                yield f"{prefix}{key}", value

    pairs = dict(tensors(b))
    for name, value in tensors(a):
        assert torch.equal(value, pairs[name]), f"{method}: {name} differs between two seeded runs"


# A slight change of the fixed model that any renderer bug of the same size would also cause.
# gs-compact: the colour field's output (an SH DC coefficient) +0.06 in green, about 4/255 of colour.
# nerf: the colour MLP's output bias +0.06 in green before the sigmoid, at most about 4/255.
PERTURBATIONS = {
    "gs-compact": ("field", "mlp.4.bias", 1, 0.06),
    "nerf": ("model", "color_mlp.output.bias", 1, 0.06),
}


@pytest.mark.parametrize("method", sorted(PERTURBATIONS))
def test_golden_test_catches_a_slight_change(method, tmp_path):
    from fieldkit.trainer import latest_checkpoint

    backend = "cpu" if mg.backend_available("cpu", method)[0] else "torch"  # the faster one here
    run = mg.CASES[method](tmp_path / "run", backend)
    path = latest_checkpoint(run)
    ckpt = torch.load(path, weights_only=True)
    group, name, channel, delta = PERTURBATIONS[method]
    ckpt["state"][group][name][channel] += delta
    torch.save(ckpt, path)
    renders = mg.render_run(run, backend)
    message, result = _golden_failure(method, backend, renders, tmp_path)
    assert message is not None, f"a perturbed {method} model still matches its goldens:\n{format_table(result)}"
    assert all(not c.passed for c in result.comparisons)
    assert all(c.psnr > 30 for c in result.comparisons)  # the change is slight, yet every view fails
    assert "FAIL" in message and "PSNR" in message and "failing px" in message
    report = tmp_path / f"{method}-{backend}-report.html"
    assert f"side-by-side report: {report}" in message and "FAIL" in report.read_text()


def test_golden_checkpoint_is_deterministic():
    a, b = mg.demo_splats(), mg.demo_splats()
    assert len(a.means) > 2000
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        assert torch.equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("method, min_psnr", [("gs", 18.0), ("gs-compact", 20.0), ("nerf", 16.0)])
def test_goldens_look_like_the_demo_scene(method, min_psnr):
    """The fixed checkpoints are the demo scene: the goldens match its ray-traced test views roughly."""
    from fieldkit.data import load_scene
    from fieldkit.metrics import psnr

    scene = load_scene(mg.DEMO)
    images, _ = scene.subset("test")
    for i in range(mg.VIEWS):
        golden = torch.from_numpy(read_png(GOLDEN / f"{method}-torch" / f"test_{i:04d}.png")).float() / 255
        assert float(psnr(golden[None], images[i : i + 1])) > min_psnr


# -- the command: passes untouched, catches a perturbed render -------------------------------------


def test_regress_command_passes_untouched_and_catches_perturbation(tmp_path, capsys):
    from fieldkit.cli import main
    from fieldkit.trainer import checkpoint_path

    run = mg.build_gs_run(tmp_path / "run", "auto")  # the fastest backend here: this tests the command
    refs = tmp_path / "refs"
    assert main(["regress", str(run), "--against", str(refs), "--update", "--max-views", "2"]) == 0
    assert sorted(p.name for p in refs.glob("*.png")) == ["test_0000.png", "test_0001.png"]

    report = tmp_path / "report.html"
    assert main(["regress", str(run), "--against", str(refs), "--max-views", "2", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "2/2 views pass" in out and report.exists()

    # Perturb the model slightly: the red probe sphere's colour moves by about 4/255.
    path = checkpoint_path(run, 0)
    ckpt = torch.load(path, weights_only=True)
    means = ckpt["state"]["params"]["means"]
    probe = (means - torch.tensor([0.0, 0.0, 0.78])).norm(dim=1) < 0.3
    ckpt["state"]["params"]["sh_dc"][probe, 0, 1] += 0.06
    torch.save(ckpt, path)
    assert main(["regress", str(run), "--against", str(refs), "--max-views", "2", "--report", str(report)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "0/2 views pass" in out
    page = report.read_text()
    assert page.count("<figure>") == 6 and "FAIL" in page  # reference | render | error per view


def test_regress_without_references_is_an_error(tmp_path, capsys):
    from fieldkit.cli import main

    run = mg.build_gs_run(tmp_path / "run", "auto")
    assert main(["regress", str(run), "--against", str(tmp_path / "nope"), "--max-views", "1"]) == 2
    assert "--update" in capsys.readouterr().err

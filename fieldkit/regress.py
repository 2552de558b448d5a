"""Rendering regression checks: render views, compare them with stored reference PNGs.

``fieldkit regress <run> --against refs/`` renders the run's test views and compares each with
``refs/<split>_<i>.png``. Per image it reports PSNR and SSIM, and decides pass/fail with the
Kaolin-style rule: a pixel *fails* when any channel differs by more than ``tolerance`` (on the
[0,1] scale, compared as 8-bit values); an image fails when more than ``max_fail_fraction`` of
its pixels fail. It prints a table, writes a self-contained HTML report (reference | render |
error heat map per view) and returns exit code 1 on any failure; ``--update`` rewrites the
references instead. The project's golden-image tests (tests/test_regress.py) use the same
functions.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import tyro
from PIL import Image

from fieldkit.io_atomic import atomic_path

DEFAULT_TOLERANCE = 2.0 / 255.0
DEFAULT_MAX_FAIL_FRACTION = 0.001
MANIFEST = "manifest.json"


@dataclass
class RegressCommand:
    """Render a run's views and compare them with reference images; exit 1 if any view drifted."""

    run: tyro.conf.Positional[Path]
    against: Path
    """Folder of reference PNGs (<split>_<index>.png, plus manifest.json)."""
    update: bool = False
    """Write the current renders as the new references instead of comparing."""
    split: Optional[str] = None
    """Which views to render (default: the references' split, else test)."""
    tolerance: float = DEFAULT_TOLERANCE
    """A pixel fails when any channel differs by more than this (0..1 scale; 2/255 by default)."""
    max_fail_fraction: float = DEFAULT_MAX_FAIL_FRACTION
    """An image fails when more than this fraction of its pixels fail."""
    max_views: Optional[int] = None
    """Render only the first N views of the split."""
    backend: Optional[Literal["auto", "torch", "cpu", "cuda", "gsplat"]] = None
    """Rasterizer backend (default: the run's own)."""
    report: Optional[Path] = None
    """HTML report path (default: <run>/regress/report.html)."""


@dataclass
class Comparison:
    name: str
    psnr: float
    ssim: float
    fail_fraction: float
    max_diff: int  # largest channel difference, in 8-bit levels
    passed: bool
    reason: str = ""


@dataclass
class RegressResult:
    comparisons: list[Comparison] = field(default_factory=list)
    tolerance: float = DEFAULT_TOLERANCE
    max_fail_fraction: float = DEFAULT_MAX_FAIL_FRACTION

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]


# -- images ------------------------------------------------------------------------------------------


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[H,W,3] float in [0,1] (tensor or array) or uint8 -> uint8 [H,W,3], rounded like save_png."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        return image[..., :3]
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    return (image.detach().cpu().float().clamp(0, 1).numpy()[..., :3] * 255.0 + 0.5).astype(np.uint8)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def compare_images(
    name: str,
    reference: np.ndarray,
    render: np.ndarray,
    tolerance: float = DEFAULT_TOLERANCE,
    max_fail_fraction: float = DEFAULT_MAX_FAIL_FRACTION,
) -> Comparison:
    """PSNR, SSIM and the Kaolin-style pass/fail rule for two uint8 [H,W,3] images."""
    from fieldkit.metrics import psnr, ssim

    if reference.shape != render.shape:
        return Comparison(name, float("nan"), float("nan"), 1.0, 255, False, f"size {render.shape[1]}x{render.shape[0]} != reference {reference.shape[1]}x{reference.shape[0]}")
    diff = np.abs(reference.astype(np.int16) - render.astype(np.int16)).max(axis=-1)
    fail_fraction = float((diff > tolerance * 255.0 + 1e-6).mean())
    ref_t = torch.from_numpy(reference).float()[None] / 255.0
    img_t = torch.from_numpy(render).float()[None] / 255.0
    value_psnr = float(psnr(img_t, ref_t)[0])
    value_ssim = float(ssim(img_t, ref_t)[0]) if min(reference.shape[:2]) >= 11 else float("nan")
    passed = fail_fraction <= max_fail_fraction
    reason = "" if passed else f"{fail_fraction:.3%} of pixels differ by more than {tolerance * 255:.1f}/255 (limit {max_fail_fraction:.3%})"
    return Comparison(name, value_psnr, value_ssim, fail_fraction, int(diff.max()), passed, reason)


def error_heatmap(reference: np.ndarray, render: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """uint8 [H,W,3]: black where equal, blue up to the tolerance, red -> yellow -> white above it.

    The failing range is scaled to the largest difference, so small drifts stay visible.
    """
    diff = np.abs(reference.astype(np.int16) - render.astype(np.int16)).max(axis=-1).astype(np.float32) / 255.0
    out = np.zeros((*diff.shape, 3), dtype=np.float32)
    ok = diff <= tolerance + 1e-9
    out[ok, 2] = np.where(diff[ok] > 0, 0.35 + 0.65 * diff[ok] / max(tolerance, 1e-9), 0.0)
    bad = ~ok
    if bad.any():
        top = max(float(diff.max()), 2 * tolerance)
        t = np.clip((diff[bad] - tolerance) / max(top - tolerance, 1e-9), 0, 1) * 0.8 + 0.2
        out[bad, 0] = np.clip(t * 3, 0, 1)
        out[bad, 1] = np.clip(t * 3 - 1, 0, 1)
        out[bad, 2] = np.clip(t * 3 - 2, 0, 1)
    return (out * 255 + 0.5).astype(np.uint8)


# -- rendering and references -----------------------------------------------------------------------


def view_names(split: str, count: int) -> list[str]:
    return [f"{split}_{i:04d}" for i in range(count)]


def render_views(method, cameras, split: str, max_views: int | None = None) -> dict[str, np.ndarray]:
    """name -> uint8 render for the first ``max_views`` cameras (all by default)."""
    count = len(cameras) if max_views is None else min(max_views, len(cameras))
    out = {}
    with torch.no_grad():
        for name, i in zip(view_names(split, count), range(count)):
            out[name] = to_uint8(method.render(cameras[i])["rgb"][0])
    return out


def write_references(renders: dict[str, np.ndarray], folder: Path, info: dict | None = None) -> list[Path]:
    """Replace the references in ``folder`` with ``renders`` (stale PNGs of the same split removed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {name.rsplit("_", 1)[0] for name in renders}
    for stale in folder.glob("*.png"):
        if stale.stem.rsplit("_", 1)[0] in splits and stale.stem not in renders:
            stale.unlink()
    paths = []
    for name, image in renders.items():
        path = folder / f"{name}.png"
        write_png(path, image)
        paths.append(path)
    manifest = {"views": sorted(renders), "written": datetime.datetime.now().isoformat(timespec="seconds"), **(info or {})}
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); rewrite it with --update") from error


def compare_to_references(
    renders: dict[str, np.ndarray],
    folder: Path,
    tolerance: float = DEFAULT_TOLERANCE,
    max_fail_fraction: float = DEFAULT_MAX_FAIL_FRACTION,
) -> RegressResult:
    result = RegressResult(tolerance=tolerance, max_fail_fraction=max_fail_fraction)
    for name, image in renders.items():
        path = Path(folder) / f"{name}.png"
        if not path.exists():
            result.comparisons.append(Comparison(name, float("nan"), float("nan"), 1.0, 255, False, f"no reference {path} (write it with --update)"))
            continue
        result.comparisons.append(compare_images(name, read_png(path), image, tolerance, max_fail_fraction))
    return result


# -- reporting ----------------------------------------------------------------------------------------


def format_table(result: RegressResult) -> str:
    lines = [f"{'view':<16}{'PSNR':>9}{'SSIM':>9}{'failing px':>12}{'max diff':>10}  result"]
    for c in result.comparisons:
        lines.append(
            f"{c.name:<16}{c.psnr:>9.2f}{c.ssim:>9.4f}{c.fail_fraction:>12.3%}{str(c.max_diff) + '/255':>10}  {'pass' if c.passed else 'FAIL'}"
        )
    n_fail = len(result.failures)
    lines.append(
        f"{len(result.comparisons) - n_fail}/{len(result.comparisons)} views pass "
        f"(pixel fails when a channel differs by > {result.tolerance * 255:.1f}/255; image fails when > {result.max_fail_fraction:.2%} of pixels fail)"
    )
    return "\n".join(lines)


def _png_data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_html_report(
    path: Path,
    result: RegressResult,
    renders: dict[str, np.ndarray],
    references: Path,
    title: str = "fieldkit regress",
) -> Path:
    """One self-contained HTML file: a summary table, then reference | render | error per view."""
    rows, panels = [], []
    for c in result.comparisons:
        status = "pass" if c.passed else "FAIL"
        rows.append(
            f"<tr class='{status.lower()}'><td><a href='#{html.escape(c.name)}'>{html.escape(c.name)}</a></td>"
            f"<td>{c.psnr:.2f}</td><td>{c.ssim:.4f}</td><td>{c.fail_fraction:.3%}</td><td>{c.max_diff}/255</td>"
            f"<td>{status}</td><td>{html.escape(c.reason)}</td></tr>"
        )
        render = renders.get(c.name)
        ref_path = Path(references) / f"{c.name}.png"
        reference = read_png(ref_path) if ref_path.exists() else None
        cells = []
        for label, image in (
            ("reference", reference),
            ("render", render),
            ("error", error_heatmap(reference, render, result.tolerance) if reference is not None and render is not None and reference.shape == render.shape else None),
        ):
            content = f"<img src='{_png_data_uri(image)}'>" if image is not None else "<div class='missing'>missing</div>"
            cells.append(f"<figure>{content}<figcaption>{label}</figcaption></figure>")
        panels.append(f"<section id='{html.escape(c.name)}' class='{status.lower()}'><h3>{html.escape(c.name)}: {status}</h3>{''.join(cells)}</section>")
    n_fail = len(result.failures)
    document = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: right; }}
td:first-child, td:last-child {{ text-align: left; }}
tr.fail td, section.fail h3 {{ color: #b00; font-weight: bold; }}
figure {{ display: inline-block; margin: 0 8px 8px 0; text-align: center; }}
img {{ image-rendering: pixelated; min-width: 192px; border: 1px solid #ccc; }}
.missing {{ width: 192px; height: 192px; background: #eee; line-height: 192px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(result.comparisons) - n_fail}/{len(result.comparisons)} views pass. References: <code>{html.escape(str(references))}</code>.
A pixel fails when any channel differs by more than {result.tolerance * 255:.1f}/255; an image fails when more than
{result.max_fail_fraction:.2%} of its pixels fail. Error map: blue = within tolerance, red to white = failing (scaled to the largest difference).</p>
<table><tr><th>view</th><th>PSNR (dB)</th><th>SSIM</th><th>failing pixels</th><th>max diff</th><th>result</th><th></th></tr>
{''.join(rows)}
</table>
{''.join(panels)}
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(document)
    return path


# -- the command --------------------------------------------------------------------------------------


def regress_run(cmd: RegressCommand) -> tuple[RegressResult | None, dict[str, np.ndarray]]:
    """Render and compare (or update); returns (result or None when updating, renders)."""
    from fieldkit.runs import load_run

    if not cmd.update and not Path(cmd.against).is_dir():
        raise FileNotFoundError(f"reference folder {cmd.against} does not exist; create it with --update")
    manifest = read_manifest(cmd.against) if Path(cmd.against).exists() else {}
    split = cmd.split or manifest.get("split") or "test"
    method, scene, record, step = load_run(cmd.run, cmd.backend)
    if not hasattr(scene, "subset"):
        raise ValueError(f"method {record.method} has no posed views to render; regress needs a scene with a {split!r} split")
    _, cameras = scene.subset(split)
    renders = render_views(method, cameras, split, cmd.max_views)
    if cmd.update:
        info = {"method": record.method, "split": split, "step": step, "backend": cmd.backend or record.backend, "run": str(cmd.run)}
        write_references(renders, cmd.against, info)
        return None, renders
    return compare_to_references(renders, cmd.against, cmd.tolerance, cmd.max_fail_fraction), renders


def run_regress(cmd: RegressCommand) -> int:
    result, renders = regress_run(cmd)
    if result is None:
        print(f"Wrote {len(renders)} reference images to {cmd.against}")
        return 0
    print(format_table(result))
    report = cmd.report or Path(cmd.run) / "regress" / "report.html"
    write_html_report(report, result, renders, cmd.against, title=f"fieldkit regress: {cmd.run}")
    print(f"Report: {report}")
    return 0 if result.passed else 1


def result_to_json(result: RegressResult) -> dict:
    return {"passed": result.passed, "tolerance": result.tolerance, "max_fail_fraction": result.max_fail_fraction, "views": [asdict(c) for c in result.comparisons]}

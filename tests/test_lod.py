"""Level-of-detail Gaussian tree (``fieldkit.models.hierarchy``), its cut renderer, the .fklod file
and ``--method gs-hier`` end to end on a tiny analytic scene."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fieldkit.cameras import Cameras, intrinsics_matrix, look_at_w2c
from fieldkit.export.lod import LODFormatError, read_lod, write_lod
from fieldkit.models.hierarchy import area_proxy, build_hierarchy, merged_opacity
from fieldkit.render import rasterize
from fieldkit.render.lod import rasterize_cut, render_lod
from fieldkit.render.projection import covariance_3d

REPO_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: 1 thread for this module


def random_gaussians(n: int, seed: int = 0, sh_degree: int = 1):
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=g) * 2 - 1
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.06 + 0.01
    opacities = torch.rand(n, generator=g) * 0.8 + 0.1
    sh = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.5
    return means, quats, scales, opacities, sh


def camera_at(distance: float, size: int = 48) -> Cameras:
    w2c = look_at_w2c(torch.tensor([0.3, -0.2, -distance]), torch.zeros(3), torch.tensor([0.0, -1.0, 0.0]))
    return Cameras(w2c.float(), intrinsics_matrix(60.0, 60.0, size / 2, size / 2).float(), size, size)


def leaves_below(hier, node: int) -> list[int]:
    stack, out = [node], []
    while stack:
        i = stack.pop()
        if hier.children[i, 0] < 0:
            out.append(i)
        else:
            stack.extend(hier.children[i].tolist())
    return out


def test_merge_of_two_gaussians_is_the_analytic_moment_match() -> None:
    means = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, 0.0]], dtype=torch.float64)
    quats = torch.tensor([[1.0, 0, 0, 0], [math.cos(0.4), 0, 0, math.sin(0.4)]], dtype=torch.float64)
    scales = torch.tensor([[0.1, 0.2, 0.05], [0.3, 0.1, 0.2]], dtype=torch.float64)
    opac = torch.tensor([0.5, 0.8], dtype=torch.float64)
    sh = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]], dtype=torch.float64)
    hier = build_hierarchy(means, quats, scales, opac, sh)
    assert hier.num_nodes == 3 and hier.root == 2 and hier.parent.tolist() == [2, 2, -1]
    # weights by hand: opacity x product of the two largest scales
    w = torch.tensor([0.5 * 0.2 * 0.1, 0.8 * 0.3 * 0.2], dtype=torch.float64)
    a = w / w.sum()
    mu = a[0] * means[0] + a[1] * means[1]
    covs = covariance_3d(quats, scales)
    d0, d1 = means[0] - mu, means[1] - mu
    cov = a[0] * (covs[0] + torch.outer(d0, d0)) + a[1] * (covs[1] + torch.outer(d1, d1))
    root = hier.root
    assert torch.allclose(hier.means[root], mu, atol=1e-12)
    assert torch.allclose(covariance_3d(hier.quats[root : root + 1], hier.scales[root : root + 1])[0], cov, atol=1e-12)
    assert torch.allclose(hier.sh[root], a[0] * sh[0] + a[1] * sh[1], atol=1e-12)
    assert torch.isclose(hier.weights[root], w.sum())
    ratio = w.sum() / area_proxy(hier.scales[root : root + 1])[0]
    assert torch.isclose(hier.opacities[root], merged_opacity(ratio[None])[0])
    # box = union of the leaves' 3-sigma boxes
    half = 3 * covs.diagonal(dim1=-2, dim2=-1).sqrt()
    assert torch.allclose(hier.box_min[root], (means - half).amin(0)) and torch.allclose(hier.box_max[root], (means + half).amax(0))


def test_merged_opacity_conserves_clamped_footprint_integral() -> None:
    # integral of min(1, o g) over the plane, in units of 2 pi sigma_a sigma_b: o (o<=1) or 1 + ln o
    r = torch.tensor([0.0, 0.3, 1.0, 1.5, 3.0], dtype=torch.float64)
    o = merged_opacity(r)
    integral = torch.where(o <= 1, o, 1 + torch.log(o))
    assert torch.allclose(integral, r)


def test_every_interior_node_matches_the_moments_of_its_leaves_and_levels_cover_leaves_once() -> None:
    means, quats, scales, opac, sh = (t.double() for t in random_gaussians(300, seed=1))
    hier = build_hierarchy(means, quats, scales, opac, sh)
    n = 300
    assert hier.num_nodes == 2 * n - 1 and int((hier.parent < 0).sum()) == 1
    w = opac * area_proxy(scales)
    covs = covariance_3d(quats, scales)
    for node in [hier.root, n + 5, n + 77, 2 * n - 2]:
        leaves = torch.tensor(leaves_below(hier, node))
        a = w[leaves] / w[leaves].sum()
        mu = (a[:, None] * means[leaves]).sum(0)
        d = means[leaves] - mu
        cov = (a[:, None, None] * (covs[leaves] + d[:, :, None] * d[:, None, :])).sum(0)
        assert torch.allclose(hier.means[node], mu, atol=1e-10)
        assert torch.allclose(covariance_3d(hier.quats[node : node + 1], hier.scales[node : node + 1])[0], cov, atol=1e-10)
    # every level is an antichain covering each leaf exactly once
    sizes = []
    for level in range(hier.num_levels):
        index = hier.level_indices(level)
        covered = sorted(leaf for i in index.tolist() for leaf in leaves_below(hier, i))
        assert covered == list(range(n))
        sizes.append(index.numel())
    assert sizes[0] == 1 and sizes[-1] == n and sizes == sorted(sizes)


def test_every_level_renders() -> None:
    means, quats, scales, opac, sh = random_gaussians(200, seed=2)
    hier = build_hierarchy(means, quats, scales, opac, sh)
    camera = camera_at(3.0)
    for level in range(hier.num_levels):
        out = rasterize_cut(hier, hier.level_indices(level), None, camera, backend="torch")
        assert torch.isfinite(out.rgb).all() and float(out.alpha.max()) > 0.3, level


def test_tau_zero_cut_is_exactly_the_full_render() -> None:
    means, quats, scales, opac, sh = random_gaussians(400, seed=3)
    hier = build_hierarchy(means, quats, scales, opac, sh)
    camera = camera_at(2.5)
    background = torch.tensor([1.0, 1.0, 1.0])
    full = rasterize(means, quats, scales, opac, sh, camera, background=background, backend="torch")
    lod = render_lod(hier, camera, 0.0, background=background, backend="torch")
    assert lod.counts == [400]
    assert torch.equal(lod.rgb, full.rgb) and torch.equal(lod.alpha, full.alpha)


def test_far_camera_selects_fewer_gaussians_and_counts_fall_with_tau() -> None:
    means, quats, scales, opac, sh = random_gaussians(2000, seed=4)
    hier = build_hierarchy(means, quats, scales, opac, sh)
    near, far = camera_at(3.0), camera_at(24.0)
    n_near, n_far = hier.cut(near, 2.0)[0].numel(), hier.cut(far, 2.0)[0].numel()
    assert n_far < n_near / 3, (n_near, n_far)
    counts = [hier.cut(far, tau)[0].numel() for tau in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)]
    assert counts[0] == 2000 and all(a >= b for a, b in zip(counts, counts[1:])) and counts[-1] < 100
    index, t = hier.cut(far, 2.0)
    covered = sorted(leaf for i in index.tolist() for leaf in leaves_below(hier, i))
    assert covered == list(range(2000))  # the cut is an antichain covering every leaf once
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    # the far LOD image stays close to full detail
    full = rasterize(means, quats, scales, opac, sh, far, backend="torch").rgb
    lod = render_lod(hier, far, 2.0, backend="torch").rgb
    assert -10 * math.log10(float(((lod - full) ** 2).mean())) > 30


def test_lod_file_round_trip(tmp_path: Path) -> None:
    means, quats, scales, opac, sh = random_gaussians(300, seed=5, sh_degree=2)
    hier = build_hierarchy(means, quats, scales, opac, sh)
    background = torch.tensor([0.2, 0.3, 0.4])
    path = write_lod(tmp_path / "scene.fklod", hier, background=background, tau=1.5)
    model = read_lod(path)
    for name in ("means", "quats", "scales", "opacities", "sh", "parent", "children", "box_min", "box_max", "weights", "depth"):
        assert torch.equal(getattr(model.hierarchy, name), getattr(hier, name)), name
    assert model.tau == 1.5 and torch.equal(model.background, background)
    camera = camera_at(6.0)
    ref = render_lod(hier, camera, 1.5, background=background, backend="torch")
    got = model.render(camera, backend="torch")
    assert got["counts"] == ref.counts and torch.equal(got["rgb"], ref.rgb.clamp(0, 1))
    header_len = int.from_bytes(path.read_bytes()[4:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert header["leaves"] == 300 and header["nodes"] == 599 and header["sh_degree"] == 2
    bad = tmp_path / "bad.fklod"
    bad.write_bytes(b"FKC1" + path.read_bytes()[4:])
    with pytest.raises(LODFormatError, match="not a .fklod"):
        read_lod(bad)
    bad.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LODFormatError, match="truncated"):
        read_lod(bad)


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("fieldkit_make_demo_lod", REPO_ROOT / "scenes" / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("scene") / "tiny"
    module.main(["--out", str(out), "--size", "32", "--train", "4", "--test", "1"])
    return out


def test_gs_hier_trains_renders_cut_and_exports_lod(tiny_scene: Path, tmp_path: Path) -> None:
    from fieldkit.cli import main
    from fieldkit.runs import load_run

    run = tmp_path / "run"
    assert main(["train", str(tiny_scene), "--method", "gs-hier", "-o", str(run), "--max-steps", "6", "--backend", "torch",
                 "--gs-hier.init-random-points", "300", "--gs-hier.lod-tau", "64", "--eval-every", "0"]) == 0
    method, scene, record, _ = load_run(run)
    assert record.method == "gs-hier" and method.config.lod_tau == 64
    _, cameras = scene.subset("test")
    rendered = method.render(cameras[0])
    assert method.last_cut_counts[0] < len(method.splats())  # the render went through a cut
    full = method.render(cameras[0], tau=0.0)["rgb"]
    splats = method.splats()
    gs = rasterize(splats.means, splats.quats, splats.scales, splats.opacities, splats.sh, cameras[0],
                   background=method.background, backend="torch").rgb.clamp(0, 1)
    assert torch.equal(full, gs)
    out = tmp_path / "scene.fklod"
    assert main(["export", str(run), "--format", "lod", "-o", str(out)]) == 0
    model = read_lod(out)
    assert model.tau == 64 and model.hierarchy.num_leaves == len(splats)
    again = model.render(cameras[0], backend="torch")["rgb"]
    assert (again - rendered["rgb"]).abs().max() <= 1e-6

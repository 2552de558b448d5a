"""Adaptive density control (fieldkit.optim.densify) on hand-made statistics.

The parameters and optimizer are laid out exactly as GaussianSplatting builds them: one
parameter per Adam group, the group named after the parameter. Expected numbers come from the
3DGS reference (Kerbl et al. 2023, ``GaussianModel.densify_and_*`` and ``train.py``), written out
here by hand rather than recomputed with the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from fieldkit.optim.densify import Densifier, DensifyConfig, prune_extent

NAMES = ("means", "quats", "log_scales", "opacity_logits", "sh_dc", "sh_rest")
EXTENT = 2.0  # scene extent: clone if max scale <= 0.01 * 2 = 0.02, prune if > 0.1 * 2 = 0.2
HIGH, LOW = 1e-3, 1e-5  # average NDC gradients either side of the 2e-4 threshold


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def make_params(scales: list[float], opacities: list[float], seed: int = 0) -> dict[str, torch.nn.Parameter]:
    """N Gaussians with isotropic ``scales`` and ``opacities``, random everything else (SH degree 1)."""
    g = torch.Generator().manual_seed(seed)
    n = len(scales)
    values = {
        "means": torch.randn(n, 3, generator=g),
        "quats": torch.randn(n, 4, generator=g),
        "log_scales": torch.log(torch.tensor(scales))[:, None].repeat(1, 3),
        "opacity_logits": torch.tensor([logit(p) for p in opacities]),
        "sh_dc": torch.randn(n, 1, 3, generator=g),
        "sh_rest": torch.randn(n, 3, 3, generator=g),
    }
    return {k: torch.nn.Parameter(v.contiguous()) for k, v in values.items()}


def make_optimizer(params: dict[str, torch.nn.Parameter]) -> torch.optim.Adam:
    """Adam as GaussianSplatting sets it up, after one step so every group has moments."""
    groups = [{"params": [params[name]], "lr": 1e-6, "name": name} for name in NAMES]
    opt = torch.optim.Adam(groups, lr=0.0, eps=1e-15)
    g = torch.Generator().manual_seed(123)
    loss = sum((p * torch.randn(p.shape, generator=g)).sum() + p.square().sum() for p in params.values())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def snapshot(params, opt):
    """Copies of values and Adam moments (exp_avg, exp_avg_sq) per parameter name."""
    values = {k: v.detach().clone() for k, v in params.items()}
    moments = {}
    for group in opt.param_groups:
        state = opt.state[group["params"][0]]
        moments[group["name"]] = (state["exp_avg"].clone(), state["exp_avg_sq"].clone())
    return values, moments


def set_stats(densifier: Densifier, grads: list[float], radii: list[float] | None = None, views: int = 4) -> None:
    """Each Gaussian seen in ``views`` views with average NDC gradient ``grads[i]``."""
    n = len(grads)
    densifier.grad_sum = torch.tensor(grads) * views
    densifier.visible_count = torch.full((n,), float(views))
    densifier.max_radius = torch.tensor(radii if radii is not None else [5.0] * n)


def check_optimizer_consistent(params, opt) -> None:
    """Every group holds the current parameter, and its moments have the parameter's shape."""
    for group in opt.param_groups:
        p = group["params"][0]
        assert p is params[group["name"]]
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape


# Roles of the Gaussians in the fixture below.
KEEP0, CLONE, SPLIT, FAINT, BIG_SCREEN, BIG_WORLD, KEEP6 = range(7)
SCALES = [0.01, 0.01, 0.1, 0.01, 0.01, 0.5, 0.01]
OPACITIES = [0.5, 0.6, 0.7, 0.001, 0.5, 0.5, 0.5]
GRADS = [LOW, HIGH, HIGH, LOW, LOW, LOW, LOW]
RADII = [5.0, 5.0, 5.0, 5.0, 30.0, 5.0, 5.0]


def refine_fixture(step: int, config: DensifyConfig | None = None, prune_extent: float | None = None):
    config = config or DensifyConfig(prune_screen_radius=20.0)  # the screen-size rule on (off by default)
    params = make_params(SCALES, OPACITIES)
    opt = make_optimizer(params)
    before, moments = snapshot(params, opt)
    densifier = Densifier(config, EXTENT, len(SCALES), torch.device("cpu"), prune_extent)
    set_stats(densifier, GRADS, RADII)
    torch.manual_seed(0)
    report = densifier._refine(step, params, opt)
    return params, opt, densifier, before, moments, report


@pytest.mark.parametrize("step, removed", [(600, {SPLIT, FAINT}), (3100, {SPLIT, FAINT, BIG_SCREEN, BIG_WORLD})])
def test_refine_clone_split_prune_and_moments(step: int, removed: set[int]) -> None:
    """Before the first opacity reset (3000) only faint Gaussians are pruned; after it, big ones too."""
    params, opt, densifier, before, moments, report = refine_fixture(step)
    kept = [i for i in range(7) if i not in removed]
    assert report == {"cloned": 1, "split": 1, "pruned": len(removed) - 1}
    # Layout: surviving rows in their old order, then the clone, then the two split children.
    n = len(kept) + 1 + 2
    for name in NAMES:
        assert params[name].shape[0] == n, name
        assert isinstance(params[name], torch.nn.Parameter) and params[name].requires_grad
        torch.testing.assert_close(params[name].detach()[: len(kept)], before[name][kept], rtol=0, atol=0)
        # The clone is an exact copy of its parent (which stays).
        torch.testing.assert_close(params[name].detach()[len(kept)], before[name][CLONE], rtol=0, atol=0)
    check_optimizer_consistent(params, opt)
    for name in NAMES:
        exp_avg, exp_avg_sq = opt.state[params[name]]["exp_avg"], opt.state[params[name]]["exp_avg_sq"]
        old_avg, old_sq = moments[name]
        assert old_avg.abs().sum() > 0 and old_sq.abs().sum() > 0  # the fixture really had moments
        torch.testing.assert_close(exp_avg[: len(kept)], old_avg[kept], rtol=0, atol=0)
        torch.testing.assert_close(exp_avg_sq[: len(kept)], old_sq[kept], rtol=0, atol=0)
        assert torch.count_nonzero(exp_avg[len(kept):]) == 0 and torch.count_nonzero(exp_avg_sq[len(kept):]) == 0
    # Split children: scales / 1.6, everything but position copied from the parent.
    children = slice(len(kept) + 1, n)
    torch.testing.assert_close(
        params["log_scales"].detach()[children], (before["log_scales"][SPLIT] - math.log(1.6)).expand(2, 3), rtol=0, atol=1e-6
    )
    for name in ("quats", "opacity_logits", "sh_dc", "sh_rest"):
        torch.testing.assert_close(params[name].detach()[children], before[name][SPLIT].expand_as(params[name][children]), rtol=0, atol=0)
    offsets = params["means"].detach()[children] - before["means"][SPLIT]
    assert (offsets.norm(dim=-1) > 0).all()  # moved ...
    assert (offsets.norm(dim=-1) < 5 * SCALES[SPLIT] * math.sqrt(3)).all()  # ... by about the parent's size
    # Statistics restart for the new set of Gaussians.
    for stat in (densifier.grad_sum, densifier.visible_count, densifier.max_radius):
        assert stat.shape == (n,) and torch.count_nonzero(stat) == 0


def test_screen_radius_pruning_starts_after_first_opacity_reset() -> None:
    config = DensifyConfig(reset_opacity_every=3000, prune_screen_radius=20.0)
    for step, pruned in ((2900, False), (3000, False), (3100, True)):
        params, *_ = refine_fixture(step, config)
        n_kept = params["means"].shape[0] - 3  # minus the clone and the two split children
        assert n_kept == (3 if pruned else 5), step  # 7 - split - faint (- big screen - big world)


def test_screen_size_pruning_is_off_by_default() -> None:
    """gsplat's default (and what the 3DGS reference does in effect): the 30-px Gaussian stays."""
    params, *_, report = refine_fixture(3100, DensifyConfig())
    assert report["pruned"] == 2  # faint and big-in-the-world only
    assert params["means"].shape[0] == 7 - 3 + 3


def test_world_size_pruning_uses_the_prune_extent() -> None:
    """The 0.5-wide Gaussian is pruned against 0.1 x EXTENT = 0.2, kept against 0.1 x 10 = 1.0."""
    params, *_, report = refine_fixture(3100, prune_extent=10.0)
    assert params["means"].shape[0] == 7 - 3 + 3  # only split, faint and big-on-screen go
    assert report["pruned"] == 2


def test_prune_extent_forward_facing_vs_object_capture() -> None:
    g = torch.Generator().manual_seed(0)
    # Forward-facing: 10 cameras within 0.5 units of (0, 0, 0), content 20-30 units in front.
    centers = torch.rand(10, 3, generator=g) - 0.5
    points = torch.stack([torch.rand(500, generator=g) * 4 - 2, torch.rand(500, generator=g) * 4 - 2,
                          20 + 10 * torch.rand(500, generator=g)], dim=-1)
    camera_extent = 1.1 * (centers - centers.mean(0)).norm(dim=-1).max().item()
    expected = (points.double() - centers.double().mean(0)).norm(dim=-1).median().item()
    assert 20 < expected < 30
    assert prune_extent(camera_extent, centers, points) == pytest.approx(expected)
    # Object capture: cameras on a radius-4 ring around points inside the unit cube: the camera extent wins.
    angle = torch.linspace(0, 2 * math.pi, 13)[:-1]
    ring = torch.stack([4 * angle.cos(), 4 * angle.sin(), torch.zeros(12)], dim=-1)
    inside = torch.rand(500, 3, generator=g) * 2 - 1
    assert prune_extent(4.4, ring, inside) == 4.4
    assert prune_extent(4.4, ring, inside[:0]) == 4.4  # no points: the camera extent


def test_split_offsets_follow_the_parent_gaussian() -> None:
    """Children are drawn from N(parent mean, R diag(s)^2 R^T) of the *parent* (3DGS densify_and_split)."""
    m = 3000
    params = make_params([0.1] * m, [0.5] * m)
    quat_wxyz = torch.tensor([2.0, 1.0, -0.5, 0.3])  # not unit length: the code must normalise it
    scales = torch.tensor([0.3, 0.05, 0.12])
    with torch.no_grad():
        params["means"].copy_(torch.tensor([1.0, -2.0, 0.5]).expand(m, 3))
        params["quats"].copy_(quat_wxyz.expand(m, 4))
        params["log_scales"].copy_(torch.log(scales).expand(m, 3))
    opt = make_optimizer(params)
    before, _ = snapshot(params, opt)
    densifier = Densifier(DensifyConfig(max_gaussians=10 * m), EXTENT, m, torch.device("cpu"))
    set_stats(densifier, [HIGH] * m)
    torch.manual_seed(1)
    report = densifier._refine(600, params, opt)
    assert report == {"cloned": 0, "split": m, "pruned": 0}
    assert params["means"].shape[0] == 2 * m
    # Rotation from scipy (x, y, z, w order), independent of fieldkit's quaternion code.
    q = quat_wxyz.double().numpy()
    R = torch.from_numpy(Rotation.from_quat([q[1], q[2], q[3], q[0]]).as_matrix())
    parent = before["means"][0].double()
    local = (params["means"].detach().double() - parent) @ R / scales.double()  # R^T d / s: should be N(0, I)
    n = local.shape[0]
    assert local.mean(0).abs().max() < 5 / math.sqrt(n)
    torch.testing.assert_close(local.std(0), torch.ones(3, dtype=torch.float64), rtol=0, atol=0.06)
    corr = torch.corrcoef(local.T)
    assert (corr - torch.eye(3, dtype=torch.float64)).abs().max() < 0.06
    # The two children of one parent are independent draws (not mirrored copies).
    assert torch.corrcoef(torch.stack([local[:m, 0], local[m:, 0]]))[0, 1].abs() < 0.06
    torch.testing.assert_close(
        params["log_scales"].detach(), torch.log(scales / 1.6).expand(2 * m, 3), rtol=0, atol=1e-6
    )


def test_max_gaussians_cap_keeps_highest_gradients() -> None:
    n = 10
    grads = [3e-4, 9e-4, 5e-4, 1e-3, 2e-4, 7e-4, 4e-4, 8e-4, 6e-4, 1e-5]  # all but the last are >= 2e-4
    params = make_params([0.01] * n, [0.5] * n)  # all small: clones
    opt = make_optimizer(params)
    before, _ = snapshot(params, opt)
    densifier = Densifier(DensifyConfig(max_gaussians=13), EXTENT, n, torch.device("cpu"))
    set_stats(densifier, grads)
    report = densifier._refine(600, params, opt)
    assert report["cloned"] == 3
    assert params["means"].shape[0] == 13
    top3 = [3, 1, 7]  # gradients 1e-3, 9e-4, 8e-4, in index order below
    torch.testing.assert_close(params["means"].detach()[n:], before["means"][sorted(top3)], rtol=0, atol=0)
    # At the cap nothing grows at all (and nothing crashes).
    densifier = Densifier(DensifyConfig(max_gaussians=13), EXTENT, 13, torch.device("cpu"))
    set_stats(densifier, [1e-3] * 13)
    assert densifier._refine(700, params, opt)["cloned"] == 0
    assert params["means"].shape[0] == 13


def test_split_counts_against_the_cap() -> None:
    """A split removes its parent and adds two children: net +1, so the cap holds exactly."""
    n = 6
    params = make_params([0.1] * n, [0.5] * n)
    opt = make_optimizer(params)
    densifier = Densifier(DensifyConfig(max_gaussians=8), EXTENT, n, torch.device("cpu"))
    set_stats(densifier, [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3])
    report = densifier._refine(600, params, opt)
    assert report["split"] == 2 and params["means"].shape[0] == 8


def test_opacity_reset_clamps_and_zeros_its_moments() -> None:
    opacities = [0.001, 0.005, 0.01, 0.5, 0.99]
    params = make_params([0.01] * 5, opacities)
    opt = make_optimizer(params)
    before, moments = snapshot(params, opt)
    densifier = Densifier(DensifyConfig(interval=7), EXTENT, 5, torch.device("cpu"))  # 3000 % 7 != 0: no refine
    report = densifier.step(3000, params, opt)
    assert report == {"opacity_reset": 1}
    new = torch.sigmoid(params["opacity_logits"].detach())
    assert (new <= 0.01 + 1e-7).all()
    expected = torch.minimum(torch.sigmoid(before["opacity_logits"]), torch.tensor(0.01))
    torch.testing.assert_close(new, expected, rtol=1e-5, atol=1e-7)
    # Already-faint Gaussians keep their exact value.
    torch.testing.assert_close(params["opacity_logits"].detach()[:2], before["opacity_logits"][:2], rtol=0, atol=0)
    for group in opt.param_groups:
        state = opt.state[group["params"][0]]
        if group["name"] == "opacity_logits":
            assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0
        else:
            torch.testing.assert_close(state["exp_avg"], moments[group["name"]][0], rtol=0, atol=0)
            torch.testing.assert_close(params[group["name"]].detach(), before[group["name"]], rtol=0, atol=0)


def test_schedule_matches_3dgs_reference() -> None:
    """Steps count from 1 like the reference's ``iteration``; its train.py runs, while
    iteration < densify_until_iter: refine if iteration > densify_from_iter and iteration % 100 == 0,
    reset opacity if iteration % 3000 == 0 or (white background and iteration == densify_from_iter)."""

    class Recorder(Densifier):
        def __init__(self):
            super().__init__(DensifyConfig(), 1.0, 0, torch.device("cpu"))
            self.refines, self.resets = [], []

        def _refine(self, step, params, optimizer):
            self.refines.append(step)
            return {}

        def _reset_opacity(self, params, optimizer):
            self.resets.append(self._current)

    for white in (False, True):
        rec = Recorder()
        for step in range(1, 30_001):
            rec._current = step
            rec.step(step, {}, None, white_background=white)
        assert rec.refines == list(range(600, 15_000, 100))
        assert rec.resets == ([500] if white else []) + [3000, 6000, 9000, 12_000]


@pytest.mark.parametrize(
    "steps, start, stop, reset",
    [
        (30_000, 500, 15_000, 3000),
        (7000, 116, 3500, 700),  # 500 * 7000 / 30000 = 116.67 -> 116
        (2300, 100, 1150, 500),  # resets never closer than min_reset_interval (500)
        (7900, 131, 3950, 790),  # float gave stop 3949 and reset 789
        (1000, 100, 500, 500),  # start never below one interval; resets at least 500 apart
        (60_000, 1000, 30_000, 6000),
    ],
)
def test_scaled_to(steps: int, start: int, stop: int, reset: int) -> None:
    c = DensifyConfig().scaled_to(steps)
    assert (c.start_step, c.stop_step, c.reset_opacity_every, c.interval) == (start, stop, reset, 100)
    assert (c.grad_threshold, c.percent_dense, c.split_scale_divisor, c.prune_opacity) == (0.0002, 0.01, 1.6, 0.005)


def test_observe_scales_pixel_gradients_to_ndc() -> None:
    """3DGS thresholds the gradient w.r.t. NDC: d/d(ndc) = d/d(pixel) * (W/2, H/2)."""
    W, H = 64, 32
    densifier = Densifier(DensifyConfig(), 1.0, 3, torch.device("cpu"))
    # Two cameras; Gaussian 2 is culled (radius 0) in camera 0, Gaussian 1 in both.
    grad = torch.tensor([[[1e-5, 2e-5], [5.0, 5.0], [3e-5, -4e-5]],
                         [[-2e-5, 0.0], [5.0, 5.0], [0.0, 1e-5]]])
    radii = torch.tensor([[[3, 4], [0, 0], [0, 0]],
                          [[7, 2], [0, 0], [1, 9]]], dtype=torch.int32)
    densifier.observe(grad, radii, W, H)
    densifier.observe(grad[:1], radii[:1], W, H)
    g0 = [math.hypot(1e-5 * 32, 2e-5 * 16), math.hypot(-2e-5 * 32, 0.0)]
    g2 = math.hypot(0.0, 1e-5 * 16)
    np.testing.assert_allclose(densifier.grad_sum.numpy(), [2 * g0[0] + g0[1], 0.0, g2], rtol=1e-6)
    np.testing.assert_allclose(densifier.visible_count.numpy(), [3, 0, 1])
    np.testing.assert_allclose(densifier.max_radius.numpy(), [7, 0, 9])

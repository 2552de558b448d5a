"""3DGS-LM (fieldkit.optim.levenberg_marquardt): matrix-free products, PCG and one LM step
against a dense solve on a tiny problem (float64, explicit Jacobian), damping rules, batch mean,
memory planning; the native gradient cache against the torch reference."""

from __future__ import annotations

import math

import pytest
import torch

from fieldkit.cameras import Cameras, intrinsics_matrix, look_at_w2c
from fieldkit.optim import levenberg_marquardt as lm
from fieldkit.optim.levenberg_marquardt import (
    LMConfig,
    LMOutOfMemory,
    LevenbergMarquardt,
    ParamLayout,
    ReferenceProblem,
    damping_update,
    gain_ratio,
    pcg,
    plan_batches,
    weighted_mean,
)

DT = torch.float64


def _cameras(count: int = 2, width: int = 14, height: int = 12) -> Cameras:
    w2cs, Ks = [], []
    for i in range(count):
        angle = 0.5 * i
        eye = torch.tensor([2.5 * math.sin(angle), 0.3 * i, -2.5 * math.cos(angle)])
        w2cs.append(look_at_w2c(eye, torch.zeros(3), torch.tensor([0.0, -1.0, 0.0])))
        Ks.append(intrinsics_matrix(16.0, 16.5, width / 2 + 0.3, height / 2 - 0.2))
    return Cameras(torch.stack(w2cs), torch.stack(Ks), width, height).to(dtype=DT)


def _params(n: int = 3, seed: int = 0, sh_rest: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "means": torch.randn(n, 3, generator=g, dtype=DT) * 0.25,
        "quats": torch.randn(n, 4, generator=g, dtype=DT),
        "log_scales": -1.3 + 0.2 * torch.randn(n, 3, generator=g, dtype=DT),
        "opacity_logits": 0.5 * torch.randn(n, generator=g, dtype=DT),
        "sh_dc": 0.6 * torch.randn(n, 1, 3, generator=g, dtype=DT),
        "sh_rest": 0.1 * torch.randn(n, sh_rest, 3, generator=g, dtype=DT),
    }


def _problem(config: LMConfig | None = None, n: int = 3, seed: int = 0):
    """Tiny problem: targets rendered from perturbed Gaussians plus noise; float64."""
    config = config or LMConfig(backend="reference")
    cams = _cameras()
    truth = _params(n, seed)
    bg = torch.tensor([0.1, 0.2, 0.3], dtype=DT)
    with torch.no_grad():
        targets = lm.render_rgb(truth, cams, 1, bg)
        targets = (targets + 0.02 * torch.randn(targets.shape, generator=torch.Generator().manual_seed(5), dtype=DT)).clamp(0, 1)
    start = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9), dtype=DT) for k, v in truth.items()}
    layout = ParamLayout.of(start)
    problem = ReferenceProblem(layout, cams, targets, 1, bg, config)
    return problem, layout.flatten(start)


def _dense(problem: ReferenceProblem, theta: torch.Tensor, images=(0, 1)):
    """F and the explicit Jacobian (forward-mode, vectorised) with the tile lists of ``theta``."""
    fn = problem.residual_fn(theta, list(images))
    F = fn(theta).detach()
    J = torch.autograd.functional.jacobian(fn, theta, strategy="forward-mode", vectorize=True)
    return F, J


@pytest.fixture(scope="module")
def tiny():
    """(problem, theta, F, J) for 2 Gaussians (SH degree 1: 46 parameters), 2 cameras 14x12."""
    problem, theta = _problem(n=2)
    F, J = _dense(problem, theta)
    return problem, theta, F, J


def test_matrix_free_products_match_dense_jacobian(tiny):
    problem, theta, F, J = tiny
    assert J.shape == (F.numel(), theta.numel()) and J.abs().sum() > 0
    assert (J.abs().sum(0) > 0).sum() >= 40  # nearly every parameter is seen by some pixel
    lin = problem.linearize(theta, [0, 1])
    g = torch.Generator().manual_seed(1)
    p = torch.randn(theta.shape, generator=g, dtype=DT)
    u = torch.randn(F.shape, generator=g, dtype=DT)
    torch.testing.assert_close(lin.jvp(p), J @ p, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(lin.vjp(u), J.T @ u, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(lin.gradient, J.T @ F, rtol=1e-6, atol=1e-12)
    assert lin.cost == pytest.approx(float(F @ F), rel=1e-12)
    torch.testing.assert_close(lin.diag_jtj(), (J * J).sum(0), rtol=1e-6, atol=1e-12)


def test_residuals_square_to_the_3dgs_loss():
    """||F||^2 = 0.8 * Charbonnier-L1 + 0.2 * (1 - SSIM), each averaged per image."""
    from fieldkit.metrics import ssim

    cfg = LMConfig(l1_eps=1e-6, ssim_eps=0.0)
    g = torch.Generator().manual_seed(2)
    pred, target = torch.rand(2, 16, 16, 3, generator=g, dtype=DT), torch.rand(2, 16, 16, 3, generator=g, dtype=DT)
    F = lm.residual_vector(pred, target, cfg)
    expected = 0.8 * (pred - target).abs().mean() + 0.2 * (1 - ssim(pred, target)).mean()
    assert float(F @ F) == pytest.approx(float(expected), rel=1e-4)


def test_hutchinson_diagonal_is_unbiased(tiny):
    problem, theta, _, J = tiny
    problem = ReferenceProblem(problem.layout, problem.cameras, problem.images, 1, problem.background,
                               LMConfig(diag_mode="hutchinson", diag_samples=300))
    estimate = problem.linearize(theta, [0, 1]).diag_jtj()
    exact = (J * J).sum(0)
    big = exact > 0.05 * exact.max()
    assert ((estimate[big] - exact[big]).abs() / exact[big]).median() < 0.2


def test_pcg_converges_to_the_dense_damped_solution(tiny):
    problem, theta, F, J = tiny
    lin = problem.linearize(theta, [0, 1])
    solver = LevenbergMarquardt(LMConfig(pcg_iterations=4 * theta.numel(), pcg_rtol=1e-12, initial_damping=0.3))
    delta, diag, info = solver.solve_batch(lin)
    D = lm.damping_diagonal((J * J).sum(0), solver.config.diag_floor)
    A = J.T @ J + 0.3 * torch.diag(D)
    expected = torch.linalg.solve(A, -J.T @ F)
    assert info.iterations > 1
    torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_pcg_generic_spd_system_and_iteration_cap():
    g = torch.Generator().manual_seed(3)
    B = torch.randn(30, 30, generator=g, dtype=DT)
    A = B @ B.T + 30 * torch.eye(30, dtype=DT)
    b = torch.randn(30, generator=g, dtype=DT)
    m_inv = 1 / torch.diagonal(A)
    full = pcg(lambda v: A @ v, b, m_inv, 200, 1e-14)
    torch.testing.assert_close(full.x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    capped = pcg(lambda v: A @ v, b, m_inv, 2, 0.0)
    assert capped.iterations == 2 and capped.products == 3
    loose = pcg(lambda v: A @ v, b, m_inv, 200, 0.5)
    assert loose.residual_norm <= 0.5 * float(b.norm()) and loose.iterations < full.iterations


def test_one_lm_step_matches_dense_computation(tiny):
    cfg = LMConfig(
        backend="reference", pcg_iterations=200, pcg_rtol=1e-12, initial_damping=0.1,
        line_search=False, batch_images=2, num_batches=1,
    )
    problem, theta, F, J = tiny
    D = lm.damping_diagonal((J * J).sum(0), cfg.diag_floor)
    delta = torch.linalg.solve(J.T @ J + 0.1 * torch.diag(D), -J.T @ F).clamp(-cfg.max_step, cfg.max_step)
    cost0 = float(F @ F)
    cost1 = problem.cost(theta + delta, [0, 1])
    rho = gain_ratio(cost0, cost1, float((F + J @ delta).square().sum()))
    expected_damping, _, expected_accept = damping_update(0.1, 2.0, rho, cfg)

    solver = LevenbergMarquardt(cfg)
    theta_new, stats = solver.step(problem, theta)
    assert stats.num_batches == 1 and stats.accepted == expected_accept
    assert stats.gain_ratio == pytest.approx(rho, rel=1e-6)
    assert solver.damping == pytest.approx(expected_damping, rel=1e-6)
    if expected_accept:
        torch.testing.assert_close(theta_new, theta + delta, rtol=1e-6, atol=1e-8)
        assert stats.cost_after < stats.cost_before
    else:
        assert torch.equal(theta_new, theta)


def test_lm_iterations_decrease_the_cost_and_reject_bad_steps():
    cfg = LMConfig(backend="reference", batch_images=1, num_batches=2, line_search_images="random",
                   line_search_fraction=1.0, initial_damping=1e-3, pcg_iterations=4, diag_mode="hutchinson", diag_samples=8)
    problem, theta = _problem(cfg, n=2)
    solver = LevenbergMarquardt(cfg)
    start = problem.cost(theta, [0, 1])
    costs = []
    for _ in range(3):
        theta_next, stats = solver.step(problem, theta)
        assert stats.num_batches == 2  # two one-image batches, weighted mean
        if stats.accepted:
            assert problem.cost(theta_next, [0, 1]) < problem.cost(theta, [0, 1])
        else:
            assert torch.equal(theta_next, theta)
        theta = theta_next
        costs.append(problem.cost(theta, [0, 1]))
    assert costs[-1] < 0.8 * start


def test_damping_update_rules():
    cfg = LMConfig(damping_min=1e-6, damping_max=1e4)
    # very good step: lambda / 3
    lam, nu, ok = damping_update(1.0, 8.0, 1.0, cfg)
    assert ok and lam == pytest.approx(1 / 3) and nu == 2.0
    # rho = 0.5: factor 1 - 0 = 1
    lam, nu, ok = damping_update(1.0, 2.0, 0.5, cfg)
    assert ok and lam == pytest.approx(1.0)
    # poor but positive: factor 1 - (2*0.1 - 1)^3 = 1.512
    lam, _, ok = damping_update(1.0, 2.0, 0.1, cfg)
    assert ok and lam == pytest.approx(1.512)
    # rejected: lambda * nu, nu doubles; consecutive rejections grow geometrically
    lam, nu, ok = damping_update(1.0, 2.0, -0.3, cfg)
    assert not ok and lam == 2.0 and nu == 4.0
    lam, nu, ok = damping_update(lam, nu, float("-inf"), cfg)
    assert not ok and lam == 8.0 and nu == 8.0
    assert damping_update(1e4, 2.0, -1.0, cfg)[0] == 1e4  # clamped
    assert gain_ratio(10.0, 8.0, 9.0) == pytest.approx(2.0)
    assert gain_ratio(10.0, 8.0, 10.0) == -math.inf


def test_weighted_mean_is_diagonal_normal_equation_mean():
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(6, generator=g, dtype=DT) for _ in range(3)]
    weights = [torch.rand(6, generator=g, dtype=DT) for _ in range(3)]
    weights[1][2] = 0.0
    for w in weights:
        w[5] = 0.0  # no batch sees parameter 5
    A = torch.diag(sum(weights))
    A[5, 5] = 1.0
    expected = torch.linalg.solve(A, sum(torch.diag(w) @ d for w, d in zip(weights, deltas)))
    out = weighted_mean(deltas, weights)
    torch.testing.assert_close(out, expected)
    assert out[5] == 0
    # equal weights: plain mean; one batch dominating a parameter: its delta
    torch.testing.assert_close(weighted_mean(deltas, [torch.ones(6, dtype=DT)] * 3), sum(deltas) / 3)


def test_weighted_mean_is_exact_when_batches_touch_disjoint_parameters():
    """With J_i^T J_i diagonal and disjoint per batch, the weighted mean equals the joint GN step."""
    d1, d2 = torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=DT), torch.tensor([0.0, 0.0, 3.0, 4.0], dtype=DT)
    m1, m2 = torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=DT), torch.tensor([0.0, 0.0, 5.0, 1.0], dtype=DT)
    torch.testing.assert_close(weighted_mean([d1, d2], [m1, m2]), d1 + d2)


def test_batch_plan_follows_the_memory_budget(monkeypatch):
    monkeypatch.setattr(lm, "available_memory_bytes", lambda device="cpu": 10 << 30)
    cfg = LMConfig(batch_images=25, num_batches=4, memory_budget_bytes=1 << 30)
    plan = plan_batches(cfg, 100, 100 << 20, "cpu")
    assert plan.images_per_batch == 10 and plan.num_batches == 10 and "memory" in plan.reason
    assert "10 x 10 images" in plan.describe()
    plan = plan_batches(LMConfig(batch_images=25, num_batches=4), 60, 1 << 20, "cpu")
    assert plan.images_per_batch == 25 and plan.num_batches == 3 and plan.reason == "as configured"
    with pytest.raises(LMOutOfMemory, match="one image needs"):
        plan_batches(cfg, 100, 2 << 30, "cpu")


def test_allocation_failure_splits_the_batch_instead_of_crashing():
    cfg = LMConfig(backend="reference", batch_images=2, num_batches=1, pcg_iterations=2, diag_mode="hutchinson", diag_samples=2)
    problem, theta = _problem(cfg, n=2)
    real = problem.linearize
    seen = []

    def flaky(theta_, images):
        seen.append(len(images))
        if len(images) > 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")
        return real(theta_, images)

    problem.linearize = flaky
    solver = LevenbergMarquardt(cfg)
    solver.bytes_per_image = 1  # skip the one-image measurement so the first batch has 2 images
    _, stats = solver.step(problem, theta)
    assert seen == [2, 1, 1] and stats.num_batches == 2

    def broken(theta_, images):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    problem.linearize = broken
    with pytest.raises(LMOutOfMemory):
        LevenbergMarquardt(cfg).step(problem, theta)


# ---------------------------------------------------------------------------------------------
# Native gradient cache (fieldkit.optim.lm_native) against the torch.func reference
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def native(tiny):
    from fieldkit.optim import lm_native

    ok, reason = lm_native.is_available()
    if not ok:
        pytest.skip(f"native LM cache unavailable: {reason}")
    problem, theta, F, J = tiny
    nat = lm_native.NativeProblem(problem.layout, problem.cameras, problem.images, 1, problem.background, problem.config)
    return nat, nat.linearize(theta, [0, 1])


def _image_fn(problem: ReferenceProblem, theta: torch.Tensor):
    isect = lm.intersections(problem.layout.unflatten(theta), problem.cameras)
    return lambda flat: lm.render_rgb(problem.layout.unflatten(flat), problem.cameras, 1, problem.background, isect)


def test_native_cache_products_match_the_reference(tiny, native):
    problem, theta, F, J = tiny
    nat, lin = native
    assert lin.entries > 100 and lin.pairs.count >= 3
    f = _image_fn(problem, theta)
    image, vjp_fn = torch.func.vjp(f, theta)
    torch.testing.assert_close(lin.image, image.detach(), rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(11)
    for _ in range(2):
        p = torch.randn(theta.shape, generator=g, dtype=DT)
        u = torch.randn(image.shape, generator=g, dtype=DT)
        torch.testing.assert_close(lin.jvp_image(p), torch.func.jvp(f, (theta,), (p,))[1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(lin._pull(u), vjp_fn(u)[0], rtol=1e-9, atol=1e-12)
    # Exact b: the native half-gradient equals J^T F of the exact residuals; the cost is the same.
    torch.testing.assert_close(lin.gradient, J.T @ F, rtol=1e-9, atol=1e-14)
    assert lin.cost == pytest.approx(float(F @ F), rel=1e-12)
    # The L1 rows of the native J are exact (the SSIM rows use the paper's centre-pixel approximation).
    n_l1 = lin.d1.numel()
    p = torch.randn(theta.shape, generator=g, dtype=DT)
    torch.testing.assert_close(lin.jvp(p)[:n_l1], (J @ p)[:n_l1], rtol=1e-9, atol=1e-12)


def test_native_jacobian_is_consistent_and_its_diagonal_exact(tiny, native):
    problem, theta, _, _ = tiny
    _, lin = native
    n = theta.numel()
    Jn = torch.stack([lin.jvp(torch.eye(n, dtype=DT)[j]) for j in range(n)], dim=1)
    u = torch.randn(Jn.shape[0], generator=torch.Generator().manual_seed(12), dtype=DT)
    torch.testing.assert_close(lin.vjp(u), Jn.T @ u, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lin.diag_jtj(), (Jn * Jn).sum(0), rtol=1e-9, atol=1e-14)


def test_native_pair_jacobian_matches_forward_mode(tiny, native):
    from fieldkit.optim import lm_native

    problem, theta, _, _ = tiny
    _, lin = native
    params = problem.layout.unflatten(theta)
    qfn = lambda flat: lm_native.pair_quantities(problem.layout.unflatten(flat), problem.cameras, lin.pairs, 1)  # noqa: E731
    p = torch.randn(theta.shape, generator=torch.Generator().manual_seed(13), dtype=DT)
    expected = torch.func.jvp(qfn, (theta,), (p,))[1]
    torch.testing.assert_close(lin.jq.jvp(problem.layout.unflatten(p)), expected, rtol=1e-9, atol=1e-12)
    q = qfn(theta).detach()
    torch.testing.assert_close(q[:, :2], lin.m2d)
    torch.testing.assert_close(q[:, 2:5], lin.conic)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(14), dtype=DT)
    expected = torch.func.vjp(qfn, theta)[1](g)[0]
    torch.testing.assert_close(problem.layout.flatten(lin.jq.vjp(g, params)), expected, rtol=1e-9, atol=1e-12)


def test_native_lm_step_reduces_the_cost(tiny, native):
    nat, _ = native
    problem, theta, _, _ = tiny
    cfg = LMConfig(batch_images=1, num_batches=2, initial_damping=1e-2)
    nat.config = cfg
    solver = LevenbergMarquardt(cfg)
    start = nat.cost(theta, [0, 1])
    for _ in range(3):
        theta, stats = solver.step(nat, theta)
    assert nat.cost(theta, [0, 1]) < 0.9 * start
    nat.config = problem.config


def test_lm_step_combines_batches_with_the_weighted_mean(tiny):
    problem, theta, _, _ = tiny
    cfg = LMConfig(backend="reference", batch_images=1, num_batches=2, initial_damping=1.0, line_search=False,
                   line_search_images="random", line_search_fraction=1.0, pcg_iterations=200, pcg_rtol=1e-12)
    solver = LevenbergMarquardt(cfg)
    reference = LevenbergMarquardt(cfg)
    deltas, diags = [], []
    for image in (0, 1):
        delta, diag, _ = reference.solve_batch(problem.linearize(theta, [image]))
        deltas.append(delta)
        diags.append(diag)
    expected = weighted_mean(deltas, diags).clamp(-cfg.max_step, cfg.max_step)
    theta_new, stats = solver.step(problem, theta)
    assert stats.num_batches == 2 and stats.accepted
    torch.testing.assert_close(theta_new - theta, expected, rtol=1e-6, atol=1e-9)


def test_gaussian_splatting_optimizer_lm_switches_after_densification():
    """GSConfig(optimizer="lm"): Adam steps, then the last ``lm.iterations`` steps are LM iterations."""
    from fieldkit.data.scene import Scene
    from fieldkit.methods.gs import GaussianSplatting, GSConfig

    cams = _cameras(4, 16, 14).to(dtype=torch.float32)
    truth = {k: v.float() for k, v in _params(6, seed=3).items()}
    with torch.no_grad():
        images = lm.render_rgb(truth, cams, 1, torch.ones(3)).clamp(0, 1)
    scene = Scene(images=images, cameras=cams, split={"train": torch.arange(3), "test": torch.arange(3, 4)},
                  background=torch.ones(3), points=truth["means"] + 0.05, point_colors=torch.full((6, 3), 0.5))
    cfg = GSConfig(optimizer="lm", sh_degree=1, lm=LMConfig(iterations=2, batch_images=3, num_batches=1, pcg_iterations=3))
    method = GaussianSplatting(cfg, scene, max_steps=10, backend="torch")
    assert method.lm_phase is not None and method.lm_phase.start_step == 8
    stats = [method.train_step(step) for step in range(10)]
    assert all("lm_gain_ratio" not in s for s in stats[:8])
    assert all("lm_gain_ratio" in s and math.isfinite(s["loss"]) for s in stats[8:])
    assert all(isinstance(p, torch.nn.Parameter) for p in method.params.values())
    # Adam stays the default and never builds an LM phase.
    assert GaussianSplatting(GSConfig(sh_degree=1), scene, max_steps=10, backend="torch").lm_phase is None


def test_sh_basis_gradient_matches_autograd():
    from fieldkit.optim.lm_native import sh_basis_gradient
    from fieldkit.render.sh import sh_basis

    dirs = torch.nn.functional.normalize(torch.randn(50, 3, generator=torch.Generator().manual_seed(15), dtype=DT), dim=-1)
    for degree in range(4):
        expected = torch.func.vmap(torch.func.jacfwd(lambda d: sh_basis(degree, d)))(dirs)  # [50, L, 3]
        torch.testing.assert_close(sh_basis_gradient(degree, dirs), expected)

"""Native CPU backend (C++/OpenMP) vs the torch reference stages: forward and gradients.

Tolerances (float32): forward |native - ref| <= 1e-4 + 1e-6 |ref| (the relative part only
matters for large pixel coordinates of huge, mostly off-screen splats: one float32 ulp at 1e4 is
1e-3); radii exactly equal. Gradients: per tensor,
max |g_native - g_ref| / max(max |g_ref|, 1e-12) <= 1e-3. float64 runs use 1e-10 / 1e-9.

Projection in float32: the native code evaluates the projection in double internally, while the
float32 reference rounds every step; for needle-like Gaussians (scale ratio ~200) the reference's
2x2 determinant cancels and its conics are off by up to ~2e-3 from the exact value (the native
ones by ~1e-7). There the allowance is widened by the reference's own rounding error, measured
by running the reference in float64: |native - ref32| <= tol + |ref32 - ref64| (same for the
gradient relative error).

The compositing tests feed both backends the *same* screen-space inputs and the same tile
lists. End to end (projection feeding compositing) the two projections differ by float32
rounding, and the alpha >= 1/255 and T > 1e-4 tests are discontinuous, so a splat sitting
exactly on a threshold may be kept by one and skipped by the other; the end-to-end comparison
therefore runs in float64, where that cannot happen at these sizes.
"""

from __future__ import annotations

import math

import pytest
import torch

from fieldkit.cameras import Cameras, intrinsics_matrix, look_at_w2c
from fieldkit.render.composite import composite_tiles
from fieldkit.render.projection import project_gaussians
from fieldkit.render.tiles import intersect_tiles

cpu = pytest.importorskip("fieldkit.render.backends.cpu")


@pytest.fixture(scope="module", autouse=True)
def native_available():
    ok, reason = cpu.is_available()
    if not ok:
        pytest.skip(f"native CPU backend unavailable: {reason}")


TOL = {
    torch.float32: dict(fwd_atol=1e-4, fwd_rtol=1e-6, grad_rel=1e-3),
    torch.float64: dict(fwd_atol=1e-10, fwd_rtol=1e-12, grad_rel=1e-9),
}


def assert_forward_close(native, ref, dtype, what, ref_exact=None):
    """|native - ref| <= atol + rtol |ref| (+ |ref - ref_exact|, the reference's own rounding)."""
    tol = TOL[dtype]
    err = (native - ref).abs() - tol["fwd_rtol"] * ref.abs()
    if ref_exact is not None:
        err = err - (ref.double() - ref_exact).abs()
    assert err.max().item() <= tol["fwd_atol"], f"{what}: max |diff| {(native - ref).abs().max().item():.3g}"


def grad_rel_err(native, ref):
    return ((native - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def assert_grads_close(named_native, named_ref, dtype, named_exact=None):
    for name in named_ref:
        g_nat, g_ref = named_native[name], named_ref[name]
        assert g_nat is not None and g_ref is not None, name
        assert torch.isfinite(g_nat).all(), f"{name}: non-finite native gradient"
        err = grad_rel_err(g_nat, g_ref)
        allowed = TOL[dtype]["grad_rel"]
        if named_exact is not None:
            allowed += grad_rel_err(g_ref.double(), named_exact[name])
        assert err <= allowed, f"grad {name}: relative error {err:.3g} (allowed {allowed:.3g})"


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------
def make_cameras(C: int, width: int, height: int, dtype) -> Cameras:
    w2c, K = [], []
    for c in range(C):
        angle = 0.5 * c
        eye = torch.tensor([2.5 * math.sin(angle), -0.3 * c, -2.5 * math.cos(angle)])
        w2c.append(look_at_w2c(eye, torch.tensor([0.05, -0.02, 0.0]), torch.tensor([0.0, -1.0, 0.0])))
        K.append(intrinsics_matrix(38.0 + 4 * c, 41.0 - 2 * c, width / 2 + 1.3 * c - 0.6, height / 2 - 0.8 * c + 0.3))
    return Cameras(torch.stack(w2c), torch.stack(K), width, height).to(dtype=dtype)


def make_gaussians(n: int, seed: int, dtype):
    """Mostly in front of the cameras, plus some behind them, near the near plane, far off
    screen; scales from tiny (sub-pixel, eps2d dominates) to huge (covering the image)."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([2.4, 1.8, 2.0], dtype=torch.float64)
    k = max(n // 12, 1)
    means[:k, 2] = -4.0 - torch.rand(k, generator=g, dtype=torch.float64)  # behind camera 0
    means[k : 2 * k] *= 6.0  # far out, partly off screen
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64) * (0.2 + 2 * torch.rand(n, 1, generator=g, dtype=torch.float64))
    scales = torch.exp(torch.empty(n, 3, dtype=torch.float64).uniform_(math.log(0.02), math.log(0.12), generator=g))
    scales[2 * k : 3 * k] *= 1e-3  # tiny: sub-pixel
    scales[3 * k : 3 * k + max(k // 3, 1)] *= 15.0  # huge
    scales[4 * k : 5 * k, 0] *= 40.0  # needles
    return means.to(dtype), quats.to(dtype), scales.to(dtype)


def screen_space_scene(n: int, seed: int, dtype, C: int, width: int, height: int, D: int, dense: bool = False):
    """Synthetic compositing inputs with full control over the corner cases: means exactly on
    pixel centres with opacity 1 (alpha clamped at 0.999), faint splats (alpha < 1/255 at the
    centre), indefinite conics (sigma < 0), and, when dense, enough opaque splats to drive
    T below 1e-4."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    means2d = torch.rand(C, n, 2, generator=g, dtype=f64) * torch.tensor([width + 20.0, height + 20.0], dtype=f64) - 10.0
    # A few exactly on pixel centres.
    k = max(n // 10, 1)
    means2d[:, :k] = torch.floor(means2d[:, :k]).clamp_min(0) + 0.5
    # Random SPD screen covariances (sigma 0.5 .. 12 px), dilated like the projection does.
    angle = torch.rand(C, n, generator=g, dtype=f64) * math.pi
    sx = torch.exp(torch.empty(C, n, dtype=f64).uniform_(math.log(0.5), math.log(12.0), generator=g))
    sy = torch.exp(torch.empty(C, n, dtype=f64).uniform_(math.log(0.5), math.log(12.0), generator=g))
    cos, sin = torch.cos(angle), torch.sin(angle)
    cxx = cos**2 * sx**2 + sin**2 * sy**2 + 0.3
    cyy = sin**2 * sx**2 + cos**2 * sy**2 + 0.3
    cxy = cos * sin * (sx**2 - sy**2)
    det = cxx * cyy - cxy**2
    conics = torch.stack([cyy / det, -cxy / det, cxx / det], dim=-1)
    # Indefinite conics (sigma < 0 in some directions: skipped there). Kept weak so that
    # exp(-sigma) stays finite: the reference's masked backward would turn an overflow into NaN.
    j = slice(k, k + max(k // 2, 1))
    scale = 0.5 + 0.3 * torch.rand(C, conics[:, j].shape[1], 1, generator=g, dtype=f64)
    conics[:, j] = torch.tensor([0.01, 0.012, 0.01], dtype=f64) * scale
    radii = torch.stack([torch.ceil(3 * torch.sqrt(cxx)), torch.ceil(3 * torch.sqrt(cyy))], -1).to(torch.int32)
    depths = torch.rand(C, n, generator=g, dtype=f64) * 5 + 0.5
    opacities = torch.rand(C, n, generator=g, dtype=f64) * 0.9 + 0.05
    opacities[:, : k // 2 + 1] = 1.0  # clamped alpha at their centre pixels
    opacities[:, -k:] *= 0.01  # faint: alpha < 1/255 everywhere
    if dense:
        opacities = 0.6 + 0.4 * torch.rand(C, n, generator=g, dtype=f64)
        opacities[:, : k // 2 + 1] = 1.0
    features = torch.randn(C, n, D, generator=g, dtype=f64)
    background = torch.rand(C, D, generator=g, dtype=f64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return cast(means2d), cast(conics), cast(opacities), cast(features), cast(background), radii, cast(depths)


# ---------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_matches_reference(dtype, seed):
    width, height = 37, 29
    cams = make_cameras(3, width, height, dtype)
    means, quats, scales = make_gaussians(240, seed, dtype)

    def run(fn, cast=dtype):
        leaves = {k: v.to(cast).clone().requires_grad_(True) for k, v in
                  dict(means=means, quats=quats, scales=scales, world_to_cam=cams.world_to_cam).items()}
        proj = fn(leaves["means"], leaves["quats"], leaves["scales"], leaves["world_to_cam"], cams.K.to(cast), width, height)
        return leaves, proj

    ref_leaves, ref = run(project_gaussians)
    nat_leaves, nat = run(cpu.project_gaussians_cpu)
    exact_leaves, exact = run(project_gaussians, torch.float64) if dtype == torch.float32 else (None, None)

    visible = ref.radii[..., 0] > 0
    assert 0 < visible.sum() < visible.numel()  # some culled (behind / off screen), most not
    assert nat.radii.dtype == torch.int32 and torch.equal(nat.radii, ref.radii)
    for name in ("means2d", "conics", "depths"):
        a, b = getattr(nat, name), getattr(ref, name)
        assert a.dtype == dtype and a.shape == b.shape and torch.isfinite(a).all()
        assert_forward_close(a.detach(), b.detach(), dtype, name, None if exact is None else getattr(exact, name).detach())

    g = torch.Generator().manual_seed(100 + seed)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) for t in (ref.means2d, ref.conics, ref.depths)]
    for proj in (ref, nat) if exact is None else (ref, nat, exact):
        sum((t * w.to(t.dtype)).sum() for t, w in zip((proj.means2d, proj.conics, proj.depths), weights)).backward()
    assert_grads_close(
        {k: v.grad for k, v in nat_leaves.items()}, {k: v.grad for k, v in ref_leaves.items()}, dtype,
        None if exact is None else {k: v.grad for k, v in exact_leaves.items()},
    )
    # Culled Gaussians (in every camera) get exactly zero gradient.
    never = ~visible.any(0)
    assert never.any() and (nat_leaves["means"].grad[never] == 0).all()


def test_projection_kwargs_and_near_far():
    dtype = torch.float64
    cams = make_cameras(2, 37, 29, dtype)
    means, quats, scales = make_gaussians(120, 5, dtype)
    kwargs = dict(eps2d=0.1, near_plane=2.0, far_plane=3.0)
    ref = project_gaussians(means, quats, scales, cams.world_to_cam, cams.K, 37, 29, **kwargs)
    nat = cpu.project_gaussians_cpu(means, quats, scales, cams.world_to_cam, cams.K, 37, 29, **kwargs)
    assert torch.equal(nat.radii, ref.radii)
    culled = ref.radii[..., 0] == 0
    assert culled.any() and (~culled).any()
    for name in ("means2d", "conics", "depths"):
        assert_forward_close(getattr(nat, name), getattr(ref, name), dtype, name)


# ---------------------------------------------------------------------------------------------
# Compositing
# ---------------------------------------------------------------------------------------------
def _composite_both(inputs, isect, width, height):
    means2d, conics, opacities, features, background = inputs
    out = {}
    for name, fn in (("ref", composite_tiles), ("nat", cpu.composite_tiles_cpu)):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        image, alpha = fn(*leaves[:4], isect, width, height, leaves[4])
        out[name] = (leaves, image, alpha)
    return out


def _check_composite(inputs, isect, width, height, dtype, seed):
    out = _composite_both(inputs, isect, width, height)
    (ref_leaves, ref_img, ref_alpha), (nat_leaves, nat_img, nat_alpha) = out["ref"], out["nat"]
    assert nat_img.shape == ref_img.shape and nat_alpha.shape == ref_alpha.shape
    assert_forward_close(nat_img.detach(), ref_img.detach(), dtype, "image")
    assert_forward_close(nat_alpha.detach(), ref_alpha.detach(), dtype, "alpha")
    g = torch.Generator().manual_seed(1000 + seed)
    w_img = torch.randn(ref_img.shape, generator=g, dtype=torch.float64).to(dtype)
    w_alpha = torch.randn(ref_alpha.shape, generator=g, dtype=torch.float64).to(dtype)
    for img, alpha in ((ref_img, ref_alpha), (nat_img, nat_alpha)):
        ((img * w_img).sum() + (alpha * w_alpha).sum()).backward()
    names = ("means2d", "conics", "opacities", "features", "background")
    assert_grads_close({k: t.grad for k, t in zip(names, nat_leaves)}, {k: t.grad for k, t in zip(names, ref_leaves)}, dtype)
    return ref_img, ref_alpha


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_composite_matches_reference(dtype, seed):
    width, height, C, D = 37, 29, 2, 4  # 3 x 2 tiles, partial tiles on the right and bottom
    means2d, conics, opacities, features, background, radii, depths = screen_space_scene(90, seed, dtype, C, width, height, D)
    isect = intersect_tiles(means2d, radii, depths, width, height)
    assert isect.gaussian_ids.numel() > 0
    _check_composite((means2d, conics, opacities, features, background), isect, width, height, dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_composite_dense_opaque_stops_and_clamps(dtype):
    """Opaque, overlapping splats: T reaches the 1e-4 stop and alpha hits the 0.999 clamp."""
    width, height, C, D = 37, 29, 2, 4
    means2d, conics, opacities, features, background, radii, depths = screen_space_scene(
        160, 7, dtype, C, width, height, D, dense=True
    )
    isect = intersect_tiles(means2d, radii, depths, width, height)
    _, ref_alpha = _check_composite((means2d, conics, opacities, features, background), isect, width, height, dtype, 7)
    assert (1 - ref_alpha).min() < 1e-3  # some pixels are saturated: the stop rule is exercised
    # Splats centred on a pixel with opacity 1: alpha clamped there.
    k = 16
    centred = (opacities[:, : k // 2 + 1] == 1.0) & (means2d[:, : k // 2 + 1] == torch.floor(means2d[:, : k // 2 + 1]) + 0.5).all(-1)
    assert centred.any()


@pytest.mark.parametrize("D", [1, 2, 3, 8, 13])
def test_composite_any_channel_count(D):
    dtype = torch.float32
    width, height, C = 37, 29, 1
    means2d, conics, opacities, features, background, radii, depths = screen_space_scene(70, 11 + D, dtype, C, width, height, D)
    isect = intersect_tiles(means2d, radii, depths, width, height)
    _check_composite((means2d, conics, opacities, features, background), isect, width, height, dtype, D)


@pytest.mark.parametrize("tile_size", [8, 32, 80])  # 80: wider than the kernels' 64-bit row masks
def test_composite_other_tile_sizes(tile_size):
    dtype, width, height, C, D = torch.float32, 45, 37, 2, 4
    means2d, conics, opacities, features, background, radii, depths = screen_space_scene(90, 21, dtype, C, width, height, D)
    isect = intersect_tiles(means2d, radii, depths, width, height, tile_size)
    _check_composite((means2d, conics, opacities, features, background), isect, width, height, dtype, tile_size)


def test_composite_empty_scene_shows_background():
    dtype, width, height, C, D = torch.float32, 37, 29, 2, 4
    means2d, conics, opacities, features, background, radii, depths = screen_space_scene(20, 3, dtype, C, width, height, D)
    radii = torch.zeros_like(radii)  # everything culled
    isect = intersect_tiles(means2d, radii, depths, width, height)
    assert isect.gaussian_ids.numel() == 0
    out = _composite_both((means2d, conics, opacities, features, background), isect, width, height)
    leaves, image, alpha = out["nat"]
    assert torch.equal(image, background[:, None, None, :].expand_as(image))
    assert (alpha == 0).all()
    (image.sum() + alpha.sum()).backward()
    assert all((t.grad == 0).all() for t in leaves[:4])
    assert torch.allclose(leaves[4].grad, torch.full_like(background, width * height))


def test_composite_deterministic_across_thread_counts():
    dtype, width, height, C, D = torch.float32, 53, 40, 2, 4
    means2d, conics, opacities, features, background, radii, depths = screen_space_scene(150, 4, dtype, C, width, height, D)
    isect = intersect_tiles(means2d, radii, depths, width, height)
    grads = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            leaves = [t.clone().requires_grad_(True) for t in (means2d, conics, opacities, features, background)]
            image, alpha = cpu.composite_tiles_cpu(*leaves[:4], isect, width, height, leaves[4])
            (image.square().sum() + alpha.sum()).backward()
            grads.append([image.detach()] + [t.grad for t in leaves])
    finally:
        torch.set_num_threads(previous)
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


# ---------------------------------------------------------------------------------------------
# Tile binning: the native lists must equal the torch ones exactly
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("tile_size", [16, 8, 32])
def test_intersect_tiles_identical(dtype, tile_size):
    width, height = 53, 37
    cams = make_cameras(3, width, height, dtype)
    means, quats, scales = make_gaussians(400, 3, dtype)
    proj = project_gaussians(means, quats, scales, cams.world_to_cam, cams.K, width, height)
    cases = [(proj.means2d, proj.radii, proj.depths)]
    # Screen-space splats overhanging every border, with tied depths (ties go by id).
    m2d, _, _, _, _, radii, depths = screen_space_scene(300, 4, dtype, 2, width, height, 1)
    depths = torch.round(depths * 2) / 2
    cases.append((m2d, radii, depths))
    nan_depths = depths.clone()
    nan_depths[:, ::7] = float("nan")  # NaN depths sort last, ties by id, as torch.sort(stable=True)
    cases.append((m2d, radii, nan_depths))
    cases.append((m2d, torch.zeros_like(radii), depths))  # all culled: no intersections
    previous = torch.get_num_threads()
    try:
        for means2d, radii, depths in cases:
            ref = intersect_tiles(means2d, radii, depths, width, height, tile_size)
            for threads in (1, 2, 3):  # the fill is cut into one chunk per thread
                torch.set_num_threads(threads)
                nat = cpu.intersect_tiles_cpu(means2d, radii, depths, width, height, tile_size)
                assert (nat.tiles_x, nat.tiles_y, nat.tile_size) == (ref.tiles_x, ref.tiles_y, ref.tile_size)
                assert nat.gaussian_ids.dtype == torch.int64 and nat.tile_offsets.dtype == torch.int64
                assert torch.equal(nat.tile_offsets, ref.tile_offsets)
                assert torch.equal(nat.gaussian_ids, ref.gaussian_ids)
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# End to end through rasterize(): projection -> tiles -> compositing, SH colours, depth channel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_rasterize_end_to_end_float64(seed):
    from fieldkit.render import rasterize

    dtype = torch.float64
    width, height = 37, 29
    cams = make_cameras(3, width, height, dtype)
    means, quats, scales = make_gaussians(200, seed, dtype)
    g = torch.Generator().manual_seed(50 + seed)
    opacities = torch.rand(200, generator=g, dtype=dtype) * 0.9 + 0.1
    sh = torch.randn(200, 9, 3, generator=g, dtype=dtype) * 0.3
    background = torch.tensor([0.1, 0.2, 0.3], dtype=dtype)
    weights = None
    results = {}
    assert cpu.backend().tile_size == 32  # rasterize's default with this backend
    for backend in ("torch", "cpu"):
        leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, sh)]
        out = rasterize(*leaves, cams, sh_degree=2, background=background, backend=backend, tile_size=32 if backend == "torch" else None)
        if weights is None:
            weights = [torch.randn(t.shape, generator=g, dtype=dtype) for t in (out.rgb, out.alpha, out.depth)]
        loss = sum((t * w).sum() for t, w in zip((out.rgb, out.alpha, out.depth), weights))
        loss.backward()
        results[backend] = (out, leaves)
    (ref, ref_leaves), (nat, nat_leaves) = results["torch"], results["cpu"]
    assert torch.equal(nat.radii, ref.radii)
    for name in ("rgb", "alpha", "depth"):
        assert_forward_close(getattr(nat, name).detach(), getattr(ref, name).detach(), dtype, name)
    names = ("means", "quats", "scales", "opacities", "sh")
    assert_grads_close({k: t.grad for k, t in zip(names, nat_leaves)}, {k: t.grad for k, t in zip(names, ref_leaves)}, dtype)
    assert grad_rel_err(nat.means2d.grad, ref.means2d.grad) <= TOL[dtype]["grad_rel"]


def test_backend_registry_resolves_cpu():
    from fieldkit.render.backends import get_backend

    backend = get_backend("cpu", "cpu")
    assert backend.name == "cpu"
    assert backend.project is cpu.project_gaussians_cpu and backend.composite is cpu.composite_tiles_cpu


def _simd_digest() -> str:
    import hashlib

    h = hashlib.sha256()
    for dtype in (torch.float32, torch.float64):
        m2d, con, op, feat, bg, radii, dep = screen_space_scene(120, 9, dtype, 2, 45, 37, 4, dense=True)
        isect = intersect_tiles(m2d, radii, dep, 45, 37)
        leaves = [t.clone().requires_grad_(True) for t in (m2d, con, op, feat, bg)]
        image, alpha = cpu.composite_tiles_cpu(*leaves[:4], isect, 45, 37, leaves[4])
        (image.square().sum() + alpha.sum()).backward()
        for t in [image, alpha] + [x.grad for x in leaves]:
            h.update(t.detach().numpy().tobytes())
    return h.hexdigest()


def test_simd_builds_agree_bitwise():
    """The AVX2 and baseline builds of the compositing kernels give identical results."""
    import os
    import subprocess
    import sys

    if cpu.extension().simd_level() != "avx2":
        pytest.skip("this CPU runs the baseline build only")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {tests_dir!r}); import test_backend_cpu as t; "
        "print(t.cpu.extension().simd_level(), t._simd_digest())"
    )
    env = dict(os.environ, FIELDKIT_CPU_SIMD="baseline")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    level, digest = out.stdout.split()[-2:]
    assert level == "baseline"
    assert digest == _simd_digest()


def test_build_lock_left_by_an_interrupted_build_is_cleared():
    """A process killed during the JIT build leaves torch's `lock` file; the next one must not hang on it."""
    import os
    import subprocess
    import sys

    cpu.extension()  # built (or loaded) here first
    lock = cpu._EXTENSION.build_dir() / "lock"
    lock.touch()  # what a killed builder leaves behind
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "import fieldkit.render.backends.cpu as c; c.extension(); print('loaded')"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=dict(os.environ))
    finally:
        lock.unlink(missing_ok=True)
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]
    assert "interrupted build" in out.stderr

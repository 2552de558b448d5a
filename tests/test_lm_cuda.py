"""CUDA build of the 3DGS-LM gradient cache (kernels/lm/lm_cache_cuda.cu, extension fieldkit_lm_cuda)
against the CPU build (kernels/lm/lm_cache_cpu.cpp, the cache's reference here).

Three groups:

1. Any machine: the .cu compiles with nvcc for sm_80 and sm_90, warnings as errors (the CI
   helper of tests/test_backend_cuda.py; skipped without nvcc); the torch glue compiles as C++
   (syntax only; skipped without a C++ compiler or the CUDA headers); a NumPy model of the CUDA
   build's position arithmetic (counts per (slot, pixel chunk), stable sort of the slots by pair,
   scans, warp ballots) reproduces the CPU build's cache layout entry for entry; device dispatch
   and the once-only fallback warning.
2. Marked ``cuda`` (skipped without a GPU or when the extension cannot be built): every output of
   the CUDA build against the CPU build on random scenes (several cameras, images that are not
   a multiple of the tile size, tile sizes 8 / 16 / 32, opaque scenes that stop rays, no pairs
   at all, pairs without entries): the cache layout (offsets, pixel ids, pixel lists) must be
   identical; values within the project's parity tolerances (float64 1e-10; float32 forward
   1e-4 absolute, products 1e-3 relative); repeated runs are bitwise equal.
3. Marked ``cuda``: the Python glue end to end (NativeProblem / NativeLinearization on CUDA
   tensors against the same problem on the CPU, make_problem's choice, an LM step on the GPU).
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sysconfig
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from fieldkit.optim import levenberg_marquardt as lm
from fieldkit.optim import lm_native
from fieldkit.optim.levenberg_marquardt import LevenbergMarquardt, LMConfig
from fieldkit.render.tiles import intersect_tiles
from test_backend_cpu import assert_forward_close, screen_space_scene
from test_backend_cuda import KERNELS, compile_cu_files

# Scenes for the cache: (points, cameras, width, height, tile size, seed, variant)
CASES = {
    "3cams-tile16": (150, 3, 53, 37, 16, 0, ""),  # 4 x 3 tiles per camera, clipped edge tiles
    "tile8": (150, 2, 53, 37, 8, 1, ""),  # 64-pixel blocks (2 warps)
    "tile32": (200, 2, 70, 45, 32, 2, ""),  # 4 pixel chunks per tile
    "opaque": (200, 2, 37, 29, 16, 3, "dense"),  # rays stop (T < 1e-4), clamped alphas
    "no-pairs": (0, 2, 37, 29, 16, 4, ""),
    "no-entries": (60, 2, 37, 29, 16, 5, "faint"),  # pairs in the tile lists, none blended
}
LAYOUT_CASES = ("3cams-tile16", "tile8", "tile32", "opaque")
PRODUCT_REL = {torch.float32: 1e-3, torch.float64: 1e-10}


def cache_inputs(case: str, dtype: torch.dtype) -> tuple:
    """Positional arguments of build_cache (CPU tensors, without the trailing ``build`` flag)."""
    n, C, W, H, tile_size, seed, variant = CASES[case]
    m2d, conics, opac, colors, bg, radii, depths = screen_space_scene(n, seed, dtype, C, W, H, 3, dense=variant == "dense")
    if variant == "faint":
        opac = opac * 1e-3  # alpha < 1/255 everywhere
    isect = intersect_tiles(m2d, radii, depths, W, H, tile_size)
    flat = lambda t, k: t.reshape(-1, k).contiguous() if k > 1 else t.reshape(-1).contiguous()  # noqa: E731
    return (flat(m2d, 2), flat(conics, 3), flat(opac, 1), flat(colors, 3), bg.contiguous(), isect.gaussian_ids.contiguous(),
            isect.tile_offsets.contiguous(), W, H, isect.tiles_x, isect.tiles_y, tile_size)


# =============================================================================================
# 1. Any machine
# =============================================================================================
def test_lm_cu_file_compiles_for_sm80_and_sm90(tmp_path):
    seconds = compile_cu_files([KERNELS / "lm" / "lm_cache_cuda.cu"], [KERNELS / "include", KERNELS / "lm"], tmp_path)
    assert set(seconds) == {"lm_cache_cuda.cu"}


def _cuda_include_dir(nvcc: str) -> Path | None:
    """The folder holding cuda_runtime_api.h: $CUDA_HOME, next to nvcc, or what nvcc itself uses."""
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    candidates.append(Path(nvcc).resolve().parent.parent / "include")
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True)
    for flags in re.findall(r'INCLUDES="([^"]*)"', dry.stdout + dry.stderr):
        candidates += [Path(tok[2:]) for tok in flags.split() if tok.startswith("-I")]
    return next((c for c in candidates if (c / "cuda_runtime_api.h").is_file()), None)


@pytest.mark.parametrize("glue, name", [("lm/lm_bindings_cuda.cpp", "fieldkit_lm_cuda"), ("bindings/cuda_bindings.cpp", "fieldkit_cuda")])
def test_cuda_glue_compiles_as_cpp(glue, name):
    """The torch glue (g++ side) of the LM cache and of the rasterizer, which share
    bindings/cuda_glue.h, compiles against this torch's headers (syntax and template instantiation
    only; a CPU build of torch ships c10/cuda without its generated CMake macros, hence
    C10_CUDA_NO_CMAKE_CONFIGURE_FILE)."""
    from torch.utils.cpp_extension import include_paths

    from fieldkit.native_build import compiler_path
    from fieldkit.render.backends import cuda as cuda_backend

    cxx, nvcc = compiler_path(), cuda_backend.nvcc_path()
    if cxx is None:
        pytest.skip("no C++ compiler")
    cuda_include = _cuda_include_dir(nvcc) if nvcc else None
    if cuda_include is None:
        pytest.skip("CUDA headers not found (no nvcc / CUDA_HOME)")
    includes = [*include_paths(), sysconfig.get_paths()["include"], str(cuda_include)]
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *[f"-isystem{p}" for p in includes], f"-I{KERNELS / 'include'}", f"-I{KERNELS / 'lm'}", f"-I{KERNELS / 'cuda'}",
           str(KERNELS / glue)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _cuda_layout_model(args: tuple, out: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lm_cache_cuda.cu's position arithmetic, fed with the blends the CPU build found.

    Returns (the position the CUDA fill gives each CPU entry, pair_offsets as slot_bases_kernel
    writes them, each pixel's entry list as the fill appends it), all in NumPy.
    """
    m2d, _, _, _, _, ids, toff, W, H, tiles_x, tiles_y, ts = args
    pair_offsets, e_pix, pixel_offsets = out[2].numpy(), out[3].numpy().astype(np.int64), out[7].numpy()
    V, M, E = m2d.shape[0], ids.numel(), e_pix.size
    ids, toff = ids.numpy(), toff.numpy()
    # Each entry's pair, tile, slot (its pair's position in the tile list) and pixel in the tile.
    pair = np.searchsorted(pair_offsets, np.arange(E), side="right") - 1
    cam, local = e_pix // (H * W), e_pix % (H * W)
    y, x = local // W, local % W
    tile = cam * tiles_x * tiles_y + (y // ts) * tiles_x + x // ts
    slot_of = {(int(t), int(ids[s])): s for t in np.unique(tile) for s in range(toff[t], toff[t + 1])}
    slot = np.array([slot_of[(int(t), int(p))] for t, p in zip(tile, pair)], dtype=np.int64)
    x0, y0 = (x // ts) * ts, (y // ts) * ts
    o = (y - y0) * (np.minimum(x0 + ts, W) - x0) + (x - x0)  # row-major in the clipped tile
    threads = min(256, (ts * ts + 31) // 32 * 32)  # build_threads
    chunks = -(-ts * ts // threads)  # build_chunks
    chunk, tid = o // threads, o % threads
    warp, lane = tid // 32, tid % 32
    # Count pass: slot_counts[chunk][slot].
    counts = np.zeros((chunks, M), dtype=np.int64)
    np.add.at(counts, (chunk, slot), 1)
    # Fill: stable radix sort of the slots by pair, exclusive scan of their totals, chunk bases.
    order = np.argsort(ids, kind="stable")
    totals = counts[:, order].sum(0)
    starts = np.cumsum(totals) - totals
    bases = np.zeros_like(counts)
    bases[:, order] = starts[None, :] + np.cumsum(counts[:, order], axis=0) - counts[:, order]
    keys = ids[order]
    pair_off = np.full(V + 1, -1, dtype=np.int64)
    for i in range(M + 1):  # slot_bases_kernel, thread i
        prev = int(keys[i - 1]) if i > 0 else -1
        cur = int(keys[i]) if i < M else V
        pair_off[prev + 1 : cur + 1] = starts[i] if i < M else E
    # Fill walk: ballots per (slot, chunk, warp); position = base + lower warps + lower lanes.
    ballots: dict[tuple[int, int, int], int] = defaultdict(int)
    for s, c, w, ln in zip(slot, chunk, warp, lane):
        ballots[(s, c, w)] |= 1 << int(ln)
    position = np.array([
        bases[c, s] + sum(ballots[(s, c, v)].bit_count() for v in range(w)) + (ballots[(s, c, w)] & ((1 << int(ln)) - 1)).bit_count()
        for s, c, w, ln in zip(slot, chunk, warp, lane)
    ], dtype=np.int64)
    # Pixel lists: the fill appends in list order (= slot order inside the pixel's tile).
    lists = np.empty(E, dtype=np.int64)
    by_pixel = np.lexsort((slot, e_pix))  # entries grouped by pixel, then by slot
    lists[:] = position[by_pixel]
    assert np.array_equal(np.searchsorted(e_pix[by_pixel], np.arange(len(pixel_offsets) - 1)), pixel_offsets[:-1])
    return position, pair_off, lists


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_cuda_position_arithmetic_reproduces_the_cpu_layout(case):
    """The CUDA build writes each entry at base(slot, chunk) + ballot ranks: a model of that
    arithmetic, fed with the CPU build's blends, must put every entry exactly where the CPU build
    did (pair, then tile, then row-major pixel), give its pair_offsets and its pixel lists."""
    ok, reason = lm_native.is_available()
    if not ok:
        pytest.skip(f"native LM cache unavailable: {reason}")
    args = cache_inputs(case, torch.float64)
    out = lm_native.extension().build_cache(*args, True)
    E = int(out[1])
    assert E > 1000 and out[2].numel() - 1 == args[0].shape[0]
    position, pair_off, lists = _cuda_layout_model(args, out)
    assert np.array_equal(position, np.arange(E))
    assert np.array_equal(pair_off, out[2].numpy())
    assert np.array_equal(lists, out[8].numpy())
    if case == "tile32":
        ts = args[-1]
        assert -(-ts * ts // 256) == 4  # several pixel chunks per tile were exercised


def test_device_dispatch_and_one_fallback_warning(monkeypatch, caplog):
    """CPU tensors pick the CPU build, CUDA the CUDA build (its sources must all be found); when
    the native cache cannot be used, auto falls back to the reference and says so once."""
    assert lm_native._CUDA_EXTENSION.kernels_dir() is not None  # every CUDA source and header exists
    assert lm_native.rasterizer("cuda").__name__.endswith("backends.cuda")
    assert lm_native.rasterizer("cpu").__name__.endswith("backends.cpu")
    if not torch.cuda.is_available():
        ok, reason = lm_native.is_available("cuda")
        assert not ok and reason

    from test_lm import _problem

    problem, theta = _problem(n=2)
    params = problem.layout.unflatten(theta)
    monkeypatch.setattr(lm, "_fallback_warned", set())

    def unavailable(*_args, **_kwargs):
        raise RuntimeError("cache build broken")

    monkeypatch.setattr(lm_native, "NativeProblem", unavailable)
    with caplog.at_level(logging.WARNING, logger="fieldkit"):
        for _ in range(3):
            _, chosen, name = lm.make_problem(params, problem.cameras, problem.images, 1, problem.background, LMConfig())
            assert name == "reference" and isinstance(chosen, lm.ReferenceProblem)
    warnings = [r for r in caplog.records if "native gradient cache unavailable on cpu (cache build broken)" in r.getMessage()]
    assert len(warnings) == 1
    with pytest.raises(RuntimeError, match="cache build broken"):
        lm.make_problem(params, problem.cameras, problem.images, 1, problem.background, LMConfig(backend="native"))


# =============================================================================================
# 2. The CUDA build against the CPU build (GPU)
# =============================================================================================
@pytest.fixture(scope="module")
def exts():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    ok, reason = lm_native.is_available("cuda")
    if not ok:
        pytest.skip(f"CUDA LM cache unavailable: {reason}")
    ok, reason = lm_native.is_available("cpu")
    if not ok:
        pytest.skip(f"CPU LM cache (the reference here) unavailable: {reason}")
    return lm_native.extension("cpu"), lm_native.extension("cuda")


def _gpu(args: tuple) -> tuple:
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


def _assert_cache_equal(cpu: list[torch.Tensor], dev: list[torch.Tensor], dtype, build: bool = True):
    assert len(dev) == len(cpu) == (9 if build else 2)
    assert dev[0].is_cuda and dev[0].dtype == dtype and dev[0].shape == cpu[0].shape
    assert_forward_close(dev[0].cpu(), cpu[0], dtype, "image")
    assert int(dev[1]) == int(cpu[1]), "entry count"
    if not build:
        return
    for i, name in ((2, "pair_offsets"), (3, "e_pix"), (7, "pixel_offsets"), (8, "pix_entries")):
        assert dev[i].dtype == cpu[i].dtype and torch.equal(dev[i].cpu(), cpu[i]), f"{name} differs"
    for i, name in ((4, "e_w"), (5, "e_a"), (6, "e_dc")):
        assert dev[i].dtype == dtype and dev[i].shape == cpu[i].shape
        assert_forward_close(dev[i].cpu(), cpu[i], dtype, name)
    assert torch.equal(dev[5].cpu() == 0, cpu[5] == 0), "clamp flags differ"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_cache_build_matches_cpu(exts, case, dtype):
    cpu_ext, cuda_ext = exts
    args = cache_inputs(case, dtype)
    cpu = cpu_ext.build_cache(*args, True)
    dev = cuda_ext.build_cache(*_gpu(args), True)
    _assert_cache_equal(cpu, dev, dtype)
    if case in ("no-pairs", "no-entries"):
        assert int(cpu[1]) == 0 and torch.equal(dev[0].cpu(), cpu[0])  # background only
    else:
        assert int(cpu[1]) > 1000
    # Forward only (bytes_per_image, line-search costs): image and entry count.
    _assert_cache_equal(cpu_ext.build_cache(*args, False), cuda_ext.build_cache(*_gpu(args), False), dtype, build=False)


def _product_inputs(args: tuple, out: list[torch.Tensor], dtype, seed: int):
    V, C, H, W = args[0].shape[0], args[4].shape[0], args[8], args[7]
    g = torch.Generator().manual_seed(seed)
    dq = torch.randn(V, 9, generator=g, dtype=torch.float64).to(dtype)
    u = torch.randn(C * H * W, 3, generator=g, dtype=torch.float64).to(dtype)
    a = torch.randn(C * H * W, 3, 3, generator=g, dtype=torch.float64)
    spd = a @ a.transpose(1, 2)  # symmetric positive semi-definite pixel weights, packed
    Wp = spd[:, [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]].to(dtype).contiguous()
    return dq, u, Wp


def _products(ext, args: tuple, out: list[torch.Tensor], dq, u, Wp):
    pairs, cache = args[:3], list(out[2:7])
    W, H = args[7], args[8]
    return {
        "jvp": ext.cache_jvp(*pairs, *cache, out[7], out[8], dq, W, H),
        "vjp": ext.cache_vjp(*pairs, *cache, u, W, H),
        "hessian": ext.hessian_blocks(*pairs, *cache, Wp, W, H),
    }


def _assert_rel_close(dev: torch.Tensor, ref: torch.Tensor, dtype, what: str):
    assert dev.is_cuda and dev.dtype == dtype and dev.shape == ref.shape, what
    assert torch.isfinite(dev).all(), f"{what}: non-finite"
    scale = ref.abs().max().clamp_min(1e-12) if ref.numel() else torch.tensor(1.0, dtype=ref.dtype)
    err = ((dev.cpu() - ref).abs().max() / scale).item() if ref.numel() else 0.0
    assert err <= PRODUCT_REL[dtype], f"{what}: relative error {err:.3g} (allowed {PRODUCT_REL[dtype]:.0e})"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_cache_products_match_cpu(exts, case, dtype):
    """J p, J^T u and the per-pair Hessian blocks of the CUDA cache against the CPU cache's."""
    cpu_ext, cuda_ext = exts
    args = cache_inputs(case, dtype)
    cpu_out = cpu_ext.build_cache(*args, True)
    dev_args = _gpu(args)
    dev_out = cuda_ext.build_cache(*dev_args, True)
    dq, u, Wp = _product_inputs(args, cpu_out, dtype, seed=17)
    ref = _products(cpu_ext, args, cpu_out, dq, u, Wp)
    got = _products(cuda_ext, dev_args, dev_out, dq.cuda(), u.cuda(), Wp.cuda())
    for name in ref:
        _assert_rel_close(got[name], ref[name], dtype, name)
    if int(cpu_out[1]) == 0:
        for name in ref:
            assert (got[name] == 0).all(), f"{name}: no entries, must be 0"
    else:
        assert ref["vjp"].abs().max() > 0 and ref["hessian"].abs().max() > 0


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["3cams-tile16", "tile32", "opaque"])
def test_cuda_cache_float32_bit_equal_to_cpu(exts, case):
    """float32: the same header math on both sides (composite.h, lm_cache.h), no FMA contraction
    (-ffp-contract=off / --fmad=false), IEEE division, the shared float32 exp polynomial: the
    cache values and J p (per-pixel sums in compositing order) equal the CPU build's bit for bit,
    as the rasterizer forward does (test_backend_cuda.py). Not claimed for float64: there the CPU
    build calls libm exp and the GPU CUDA's exp (<= 1 ulp apart); J^T u and the Hessian blocks
    sum a pair's entries in another order (lanes, then a shuffle tree) on the GPU."""
    cpu_ext, cuda_ext = exts
    args = cache_inputs(case, torch.float32)
    cpu, dev = cpu_ext.build_cache(*args, True), cuda_ext.build_cache(*_gpu(args), True)
    for i, name in ((0, "image"), (4, "e_w"), (5, "e_a"), (6, "e_dc")):
        assert torch.equal(dev[i].cpu(), cpu[i]), f"{name} is not bit-equal to the CPU build"
    dq, u, Wp = _product_inputs(args, cpu, torch.float32, seed=5)
    jvp_cpu = _products(cpu_ext, args, cpu, dq, u, Wp)["jvp"]
    jvp_dev = _products(cuda_ext, _gpu(args), dev, dq.cuda(), u.cuda(), Wp.cuda())["jvp"]
    assert torch.equal(jvp_dev.cpu(), jvp_cpu), "J p is not bit-equal to the CPU build"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cuda_cache_is_deterministic(exts, dtype):
    """No float atomics: building and every product repeat bit for bit."""
    _, cuda_ext = exts
    args = _gpu(cache_inputs("tile32", dtype))
    first, second = cuda_ext.build_cache(*args, True), cuda_ext.build_cache(*args, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    dq, u, Wp = (t.cuda() for t in _product_inputs(args, first, dtype, seed=3))
    p1, p2 = _products(cuda_ext, args, first, dq, u, Wp), _products(cuda_ext, args, second, dq, u, Wp)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


@pytest.mark.cuda
def test_cuda_cache_rejects_bad_inputs(exts):
    _, cuda_ext = exts
    args = cache_inputs("tile8", torch.float32)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        cuda_ext.build_cache(*args, True)  # CPU tensors
    bad = list(_gpu(args))
    bad[4] = bad[4][:1].contiguous()  # background for one camera only
    with pytest.raises(RuntimeError, match="background"):
        cuda_ext.build_cache(*bad, True)


# =============================================================================================
# 3. The Python glue on a GPU
# =============================================================================================
@pytest.fixture(scope="module")
def gpu_problem(exts):
    from fieldkit.render.backends import cuda as cuda_backend

    ok, reason = cuda_backend.is_available()
    if not ok:
        pytest.skip(f"CUDA rasterizer (projection and tile lists for the LM) unavailable: {reason}")
    from test_lm import _problem

    problem, theta = _problem(n=3)  # float64, 2 cameras 14x12
    cfg = LMConfig()
    cpu = lm_native.NativeProblem(problem.layout, problem.cameras, problem.images, 1, problem.background, cfg)
    dev = lm_native.NativeProblem(problem.layout, problem.cameras.to("cuda"), problem.images.cuda(), 1,
                                  problem.background.cuda(), cfg)
    return problem, theta, cpu, dev


@pytest.mark.cuda
def test_cuda_linearization_matches_cpu(gpu_problem):
    _, theta, cpu, dev = gpu_problem
    assert dev.device.type == "cuda"
    a, b = cpu.linearize(theta, [0, 1]), dev.linearize(theta.cuda(), [0, 1])
    assert b.image.is_cuda and b.gradient.is_cuda and a.entries == b.entries > 100
    assert torch.equal(b.pair_offsets.cpu(), a.pair_offsets) and torch.equal(b.pix_entries.cpu(), a.pix_entries)
    torch.testing.assert_close(b.image.cpu(), a.image, rtol=0, atol=1e-10)
    assert b.cost == pytest.approx(a.cost, rel=1e-10)
    g = torch.Generator().manual_seed(21)
    p = torch.randn(theta.shape, generator=g, dtype=theta.dtype)
    u = torch.randn(a.residuals.shape, generator=g, dtype=theta.dtype)
    for name, x, y in (
        ("gradient", b.gradient, a.gradient),
        ("J p", b.jvp(p.cuda()), a.jvp(p)),
        ("J^T u", b.vjp(u.cuda()), a.vjp(u)),
        ("diag(J^T J)", b.diag_jtj(), a.diag_jtj()),
    ):
        _assert_rel_close(x, y, torch.float64, name)
    assert dev.bytes_per_image(theta.cuda(), 0) == cpu.bytes_per_image(theta, 0)
    assert dev.cost(theta.cuda(), [1]) == pytest.approx(cpu.cost(theta, [1]), rel=1e-10)


@pytest.mark.cuda
def test_cuda_lm_uses_the_native_cache_and_reduces_the_cost(gpu_problem):
    problem, theta, _, dev = gpu_problem
    params = {k: v.cuda() for k, v in problem.layout.unflatten(theta).items()}
    backend = "auto" if lm_native.CUDA_CACHE_VERIFIED else "native"  # auto picks it once verified on a GPU
    _, chosen, name = lm.make_problem(params, problem.cameras.to("cuda"), problem.images.cuda(), 1,
                                      problem.background.cuda(), LMConfig(backend=backend))
    assert name == "native" and isinstance(chosen, lm_native.NativeProblem) and chosen.device.type == "cuda"
    cfg = LMConfig(batch_images=1, num_batches=2, initial_damping=1e-2)
    dev.config = cfg
    try:
        solver = LevenbergMarquardt(cfg, "cuda")
        x = theta.cuda()
        start = dev.cost(x, [0, 1])
        for _ in range(3):
            x, stats = solver.step(dev, x)
            assert x.is_cuda and math.isfinite(stats.cost_after)
        assert dev.cost(x, [0, 1]) < 0.9 * start
    finally:
        dev.config = problem.config

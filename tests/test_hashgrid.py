"""Hash-grid encoding: tcnn sizing, a slow straightforward oracle, gradients, implementations agree."""

from __future__ import annotations

import math

import pytest
import torch

from fieldkit.fields import native, tcnn_backend
from fieldkit.fields.hashgrid import (
    PRIMES,
    HashGrid,
    HashGridConfig,
    hash_encode_torch,
    init_table,
    level_layout,
    per_level_scale_for,
)


def slow_encode(x: torch.Tensor, table: torch.Tensor, config: HashGridConfig) -> torch.Tensor:
    """One point, one level, one corner at a time, with Python integers mimicking uint32 (tcnn's code path)."""
    dims = x.shape[1]
    T = 1 << config.log2_hashmap_size
    out = torch.zeros(x.shape[0], config.n_levels * config.n_features_per_level, dtype=table.dtype)
    offset = 0
    for level in range(config.n_levels):
        scale = float(torch.tensor(2.0, dtype=torch.float32) ** (level * torch.tensor(math.log2(config.per_level_scale), dtype=torch.float32))) * config.base_resolution - 1.0
        scale = float(torch.tensor(scale, dtype=torch.float32))
        res = math.ceil(scale) + 1
        size = min(-(-res**dims // 8) * 8, T)
        for n in range(x.shape[0]):
            pos = [float(x[n, d]) * scale + 0.5 for d in range(dims)]
            cell = [math.floor(p) for p in pos]
            frac = [p - c for p, c in zip(pos, cell)]
            for corner in range(1 << dims):
                weight = 1.0
                vertex = []
                for d in range(dims):
                    bit = (corner >> d) & 1
                    weight *= frac[d] if bit else 1 - frac[d]
                    vertex.append(cell[d] + bit)
                if res**dims <= size:  # dense
                    index, stride = 0, 1
                    for d in range(dims):
                        index = (index + vertex[d] * stride) % 2**32
                        stride *= res
                else:
                    index = 0
                    for d in range(dims):
                        index ^= (vertex[d] * PRIMES[d]) % 2**32
                row = offset + index % size
                for f in range(config.n_features_per_level):
                    out[n, level * config.n_features_per_level + f] += weight * table[row, f]
        offset += size
    return out


@pytest.mark.parametrize(
    "config, dense, params",
    [
        (HashGridConfig(16, 2, 19, 16, 1.3819), 5, 12.2e6),
        (HashGridConfig(16, 2, 19, 16, 1.447), 5, 12.6e6),
        (HashGridConfig(16, 2, 16, 16, 1.447), 3, 1.8e6),
        (HashGridConfig(8, 4, 19, 16, 2.0), 3, 11.7e6),
    ],
)
def test_tcnn_sizing_matches_reference_table(config, dense, params):
    layout = level_layout(config)
    assert layout.n_dense_levels == dense
    assert round(layout.n_params / 1e6, 1) == pytest.approx(params / 1e6)  # the table gives 3 significant digits
    # each level: ceil(base * b^l - 1) + 1 vertices; dense levels store next_multiple(res^3, 8) rows
    assert layout.resolutions[0] == 16
    for res, size, hashed in zip(layout.resolutions, layout.sizes, layout.hashed):
        assert size % 8 == 0
        assert hashed == (res**3 > (1 << config.log2_hashmap_size))


def test_per_level_scale_for_instant_ngp():
    assert per_level_scale_for(2048, 16, 16) == pytest.approx(1.3819, abs=1e-4)
    layout = level_layout(HashGridConfig(16, 2, 19, 16, per_level_scale_for(2048, 16, 16)))
    assert layout.resolutions[-1] == 2048


def test_init_range():
    table = init_table(level_layout(HashGridConfig(4, 2, 10, 4, 2.0)), torch.Generator().manual_seed(0))
    assert table.abs().max() <= 1e-4 and table.std() > 3e-5


@pytest.mark.parametrize("dims", [2, 3])
def test_torch_matches_slow_oracle_dense_and_hashed(dims):
    config = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=8, base_resolution=3, per_level_scale=2.1)
    layout = level_layout(config, dims)
    assert 0 < layout.n_dense_levels < layout.n_levels  # both code paths exercised
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(layout.total_rows, 2, generator=gen, dtype=torch.float64)
    x = torch.rand(40, dims, generator=gen, dtype=torch.float64)
    x[0] = 0.0
    x[1] = 1.0  # the +0.5 offset makes corners reach resolution r: index wraps like tcnn
    ours = hash_encode_torch(x, table, layout)
    assert torch.allclose(ours, slow_encode(x, table, config), atol=1e-12)


def test_interpolation_reproduces_linear_function_on_dense_level():
    """A dense level whose vertex values are a linear function of the vertex position interpolates it exactly."""
    config = HashGridConfig(n_levels=1, n_features_per_level=1, log2_hashmap_size=16, base_resolution=9, per_level_scale=1.0)
    layout = level_layout(config)
    res = layout.resolutions[0]
    idx = torch.arange(layout.sizes[0])
    i, j, k = idx % res, (idx // res) % res, idx // (res * res)
    table = (0.3 * i + 0.2 * j - 0.1 * k).double()[:, None]
    x = torch.rand(100, 3, dtype=torch.float64) * 0.9
    pos = x * layout.scales[0] + 0.5
    expected = 0.3 * pos[:, 0] + 0.2 * pos[:, 1] - 0.1 * pos[:, 2]
    assert torch.allclose(hash_encode_torch(x, table, layout)[:, 0], expected, atol=1e-12)


def test_gradcheck_table_and_points():
    config = HashGridConfig(n_levels=3, n_features_per_level=2, log2_hashmap_size=7, base_resolution=3, per_level_scale=2.0)
    layout = level_layout(config)
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(layout.total_rows, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    x = (0.1 + 0.8 * torch.rand(6, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, t: hash_encode_torch(p, t, layout), (x, table), eps=1e-7, atol=1e-6)


def test_module_output_and_parameter_shapes():
    grid = HashGrid(HashGridConfig(4, 2, 12, 8, 1.5), implementation="torch")
    out = grid(torch.rand(10, 3))
    assert out.shape == (10, 8) and grid.output_dim == 8
    assert grid.params.numel() == grid.layout.n_params


def test_bad_input_shapes_raise():
    grid = HashGrid(HashGridConfig(2, 2, 8, 4, 2.0), implementation="torch")
    with pytest.raises(ValueError, match="points"):
        grid(torch.rand(5, 2))
    with pytest.raises(ValueError, match="implementation"):
        HashGrid(implementation="magic")(torch.rand(2, 3))


def _native_or_skip():
    ok, reason = native.is_available("cpu")
    if not ok:
        pytest.skip(f"native hash-grid kernel unavailable: {reason}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_cpu_matches_torch(dtype):
    _native_or_skip()
    config = HashGridConfig(n_levels=6, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=1.8)
    layout = level_layout(config)
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(layout.total_rows, 2, generator=gen, dtype=dtype)
    x = torch.rand(3000, 3, generator=gen, dtype=dtype)
    t1 = table.clone().requires_grad_()
    x1 = x.clone().requires_grad_()
    t2 = table.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ref = hash_encode_torch(x1, t1, layout)
    out = native.hash_encode(x2, t2, layout)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(out, ref, atol=tol)
    g = torch.randn(ref.shape, generator=gen, dtype=dtype)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    assert torch.allclose(t2.grad, t1.grad, atol=1e-4 if dtype == torch.float32 else 1e-10)
    assert torch.allclose(x2.grad, x1.grad, rtol=1e-3, atol=1e-3 if dtype == torch.float32 else 1e-9)


def test_native_gradcheck():
    _native_or_skip()
    layout = level_layout(HashGridConfig(3, 2, 7, 3, 2.0))
    gen = torch.Generator().manual_seed(4)
    table = torch.randn(layout.total_rows, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    x = (0.1 + 0.8 * torch.rand(6, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, t: native.hash_encode(p, t, layout), (x, table), eps=1e-7, atol=1e-6)


@pytest.mark.cuda
def test_cuda_native_matches_torch():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ok, reason = native.is_available("cuda")
    if not ok:
        pytest.skip(f"CUDA hash-grid kernel unavailable: {reason}")
    layout = level_layout(HashGridConfig(16, 2, 19, 16, 1.3819))
    table = torch.randn(layout.total_rows, 2, device="cuda") * 1e-2
    x = torch.rand(100_000, 3, device="cuda")
    assert torch.allclose(native.hash_encode(x, table, layout), hash_encode_torch(x, table, layout), atol=1e-5)


@pytest.mark.cuda
def test_tcnn_matches_torch():
    if not tcnn_backend.is_available():
        pytest.skip("tinycudann not importable (optional accelerator)")
    config = HashGridConfig(16, 2, 19, 16, 1.3819)
    grid = HashGrid(config, implementation="tcnn").cuda()
    x = torch.rand(50_000, 3, device="cuda")
    ref = hash_encode_torch(x, grid.params, grid.layout)
    assert torch.allclose(grid(x), ref, atol=1e-5)


@pytest.mark.slow
def test_cuda_kernel_source_compiles_with_nvcc(tmp_path):
    """The .cu file has plain launchers (no torch headers): nvcc compiles it without a GPU."""
    import shutil
    import subprocess
    from pathlib import Path

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    source = Path(__file__).resolve().parents[1] / "kernels" / "hashgrid" / "hashgrid_cuda.cu"
    result = subprocess.run([nvcc, "-c", "-std=c++17", "-O2", str(source), "-o", str(tmp_path / "hashgrid_cuda.o")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]

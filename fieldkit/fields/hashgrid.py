"""Multiresolution hash encoding (Müller et al. 2022) with tiny-cuda-nn's exact conventions.

Three implementations compute the same function from the same parameter table:

* ``torch``  — the reference below, any device, written for clarity and vectorised over points;
* ``native`` — the C++/OpenMP (and CUDA) kernel in ``kernels/hashgrid`` (:mod:`fieldkit.fields.native`);
* ``tcnn``   — tiny-cuda-nn's ``HashGrid`` encoding when ``tinycudann`` is importable
  (:mod:`fieldkit.fields.tcnn_backend`).

Conventions (tiny-cuda-nn ``encodings/grid.h`` / ``common_device.h``):

* level ``l`` has scale ``s_l = base * 2^(l * log2(b)) - 1`` (float32) and resolution
  ``r_l = ceil(s_l) + 1`` grid vertices per axis;
* an input ``x`` in [0,1]^d maps to ``p = s_l * x + 0.5``; the cell is ``floor(p)`` and the
  trilinear weights come from ``p - floor(p)``;
* level ``l`` stores ``P_l = min(next_multiple(r_l^d, 8), T)`` feature vectors, ``T = 2^log2_hashmap_size``;
  levels with ``r_l^d <= T`` are dense (index ``sum_i p_i r_l^i``), finer levels are hashed with
  ``XOR_i (p_i * pi_i)`` (uint32), and either index is taken modulo ``P_l``;
* the table is ``[sum_l P_l, F]`` (level after level, features innermost: tcnn's flat layout) and is
  initialised U(-1e-4, 1e-4);
* the output is ``[N, L * F]``, level-major.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

log = logging.getLogger("fieldkit")

PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)
UINT32_MASK = 0xFFFFFFFF
IMPLEMENTATIONS = ("auto", "torch", "native", "tcnn")


@dataclass
class HashGridConfig:
    """Hash-grid sizing (tiny-cuda-nn's ``HashGrid`` options)."""

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 2.0
    """Growth factor b between levels; :func:`per_level_scale_for` derives it from a finest resolution."""


def per_level_scale_for(finest_resolution: float, base_resolution: int, n_levels: int) -> float:
    """b such that the finest level reaches ``finest_resolution`` (instant-ngp: 2048 * aabb_scale)."""
    if n_levels <= 1:
        return 1.0
    return math.exp(math.log(finest_resolution / base_resolution) / (n_levels - 1))


def _next_multiple(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class LevelLayout:
    """Per-level sizing of a hash grid (all lists have one entry per level)."""

    scales: tuple[float, ...]  # float32 values, as tcnn computes them
    resolutions: tuple[int, ...]
    sizes: tuple[int, ...]  # feature vectors stored per level (P_l)
    offsets: tuple[int, ...]  # first row of each level in the table
    hashed: tuple[bool, ...]
    dims: int
    features: int

    @property
    def n_levels(self) -> int:
        return len(self.scales)

    @property
    def total_rows(self) -> int:
        return self.offsets[-1] + self.sizes[-1] if self.sizes else 0

    @property
    def n_params(self) -> int:
        return self.total_rows * self.features

    @property
    def n_dense_levels(self) -> int:
        return sum(not h for h in self.hashed)


def level_layout(config: HashGridConfig, dims: int = 3) -> LevelLayout:
    """tiny-cuda-nn's level scales, resolutions, table sizes and dense/hashed split."""
    if not 1 <= dims <= len(PRIMES):
        raise ValueError(f"hash grids support 1..{len(PRIMES)} input dims, got {dims}")
    if config.n_levels < 1 or config.n_features_per_level < 1:
        raise ValueError("n_levels and n_features_per_level must be positive")
    log2_b = torch.tensor(math.log2(config.per_level_scale), dtype=torch.float32)
    levels = torch.arange(config.n_levels, dtype=torch.float32)
    # float32 arithmetic like tcnn's grid_scale: exp2f(level * log2_per_level_scale) * base - 1
    scales32 = torch.exp2(levels * log2_b) * float(config.base_resolution) - 1.0
    scales = tuple(float(s) for s in scales32.tolist())
    resolutions = tuple(int(math.ceil(s)) + 1 for s in scales)
    table = 1 << config.log2_hashmap_size
    max_params = (1 << 32) // 2 - 1  # tcnn: std::numeric_limits<uint32_t>::max() / 2
    sizes, offsets, hashed = [], [], []
    offset = 0
    for res in resolutions:
        dense = res**dims
        size = _next_multiple(min(dense, max_params), 8)
        size = min(size, table)
        sizes.append(size)
        offsets.append(offset)
        hashed.append(dense > size)
        offset += size
    return LevelLayout(scales, resolutions, tuple(sizes), tuple(offsets), tuple(hashed), dims, config.n_features_per_level)


def init_table(layout: LevelLayout, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The [rows, F] table, U(-1e-4, 1e-4) like tcnn."""
    table = torch.empty(layout.total_rows, layout.features, dtype=torch.float64)
    table.uniform_(-1e-4, 1e-4, generator=generator)
    return table.to(dtype)


def grid_indices(cell: Tensor, level: int, layout: LevelLayout) -> Tensor:
    """Table rows (int64, offset included) of integer grid vertices ``cell`` [..., D] on one level."""
    res = layout.resolutions[level]
    size = layout.sizes[level]
    if layout.hashed[level]:
        index = torch.zeros_like(cell[..., 0])
        for d in range(layout.dims):
            index = index ^ ((cell[..., d] * PRIMES[d]) & UINT32_MASK)
    else:
        index = torch.zeros_like(cell[..., 0])
        stride = 1
        for d in range(layout.dims):
            index = index + cell[..., d] * stride
            stride *= res
        index = index & UINT32_MASK
    return index % size + layout.offsets[level]


def _corner_bits(dims: int, device) -> Tensor:
    """[2^D, D] 0/1 corner offsets, corner c has bit d of c on axis d."""
    c = torch.arange(1 << dims, device=device)
    return torch.stack([(c >> d) & 1 for d in range(dims)], dim=-1)


def corner_rows_and_weights(x: Tensor, layout: LevelLayout) -> tuple[Tensor, Tensor]:
    """Rows [N, L, 2^D] and interpolation weights [N, L, 2^D] (differentiable w.r.t. x).

    Computed per level in the same float32 arithmetic as tcnn: ``p = s_l * x + 0.5``.
    """
    bits = _corner_bits(layout.dims, x.device)  # [K, D]
    rows, weights = [], []
    for level in range(layout.n_levels):
        pos = x * layout.scales[level] + 0.5  # [N, D]
        cell = torch.floor(pos.detach())
        frac = pos - cell  # gradient flows through pos
        cell = cell.long()
        corners = cell[:, None, :] + bits[None]  # [N, K, D]
        rows.append(grid_indices(corners, level, layout))
        # weight of corner c: prod_d (frac_d if bit else 1 - frac_d)
        w = torch.where(bits[None].bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(dim=-1)
        weights.append(w)
    return torch.stack(rows, dim=1), torch.stack(weights, dim=1)


def hash_encode_torch(x: Tensor, table: Tensor, layout: LevelLayout, chunk: int = 1 << 16) -> Tensor:
    """Reference encoding: x [N, D] in [0,1] -> [N, L * F]; differentiable w.r.t. x and table.

    Processes ``chunk`` points at a time so the [chunk, L, 2^D] index tensors stay small.
    """
    if x.ndim != 2 or x.shape[1] != layout.dims:
        raise ValueError(f"expected points [N, {layout.dims}], got {tuple(x.shape)}")
    if table.shape != (layout.total_rows, layout.features):
        raise ValueError(f"table must be [{layout.total_rows}, {layout.features}], got {tuple(table.shape)}")
    outs = []
    for start in range(0, max(len(x), 1), chunk):
        xs = x[start : start + chunk].to(table.dtype)
        rows, weights = corner_rows_and_weights(xs, layout)  # [n, L, K]
        feats = nn.functional.embedding(rows, table)  # [n, L, K, F]
        out = (feats * weights[..., None]).sum(dim=2)  # [n, L, F]
        outs.append(out.reshape(len(xs), -1))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _resolve_implementation(name: str, device: torch.device) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown hash-grid implementation {name!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        from fieldkit.fields import tcnn_backend

        if tcnn_backend.is_available():
            return "tcnn"
    from fieldkit.fields import native

    ok, reason = native.is_available(device)
    if ok:
        return "native"
    native.warn_once(f"hash grid: using the torch implementation, not native ({reason})")
    return "torch"


class HashGrid(nn.Module):
    """Learnable multiresolution hash encoding: [N, D] in [0,1] -> [N, L * F]."""

    def __init__(self, config: HashGridConfig | None = None, dims: int = 3, implementation: str = "auto",
                 generator: torch.Generator | None = None):
        super().__init__()
        self.config = config or HashGridConfig()
        self.layout = level_layout(self.config, dims)
        self.dims = dims
        self.implementation = implementation
        self.params = nn.Parameter(init_table(self.layout, generator))
        self._resolved: dict[str, str] = {}

    @property
    def output_dim(self) -> int:
        return self.layout.n_levels * self.layout.features

    def resolved_implementation(self, device: torch.device | None = None) -> str:
        device = torch.device(device) if device is not None else self.params.device
        key = f"{device.type}"
        if key not in self._resolved:
            self._resolved[key] = _resolve_implementation(self.implementation, device)
        return self._resolved[key]

    @cached_property
    def _tcnn(self):
        from fieldkit.fields import tcnn_backend

        return tcnn_backend.TcnnHashGrid(self.config, self.dims)

    def forward(self, x: Tensor, cached: Tensor | None = None) -> Tensor:
        """Encode x [N, D]. ``cached``: this encoding of x computed earlier without gradients (for
        example by a pruning pass); it is returned as is, with the gradient wired to the table."""
        if cached is not None:
            return _CachedEncoding.apply(x, self.params, cached, self)
        impl = self.resolved_implementation(x.device)
        if impl == "native":
            from fieldkit.fields import native

            return native.hash_encode(x, self.params, self.layout)
        if impl == "tcnn":
            return self._tcnn(x, self.params)
        return hash_encode_torch(x, self.params, self.layout)

    def extra_repr(self) -> str:
        c = self.config
        return (f"levels={c.n_levels}, features={c.n_features_per_level}, log2_T={c.log2_hashmap_size}, "
                f"base={c.base_resolution}, b={c.per_level_scale:.4f}, dense_levels={self.layout.n_dense_levels}, "
                f"params={self.layout.n_params}, impl={self.implementation}")


class _CachedEncoding(torch.autograd.Function):
    """Identity on a precomputed encoding whose backward is the encoding's (table and points)."""

    @staticmethod
    def forward(ctx, x, table, cached, grid):
        ctx.save_for_backward(x, table)
        ctx.grid = grid
        return cached.clone()

    @staticmethod
    def backward(ctx, grad_out):
        x, table = ctx.saved_tensors
        grid: HashGrid = ctx.grid
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        impl = grid.resolved_implementation(x.device)
        grad_out = grad_out.contiguous()
        if impl == "native":
            from fieldkit.fields import native

            scales, meta = native.level_tables(grid.layout, x.device)
            kind = "cuda" if x.device.type == "cuda" else "cpu"
            ext = native.extension(kind)
            xs = x.to(table.dtype).contiguous()
            g = grad_out.to(table.dtype)
            grad_table = ext.backward_table(xs, g, scales, meta, table.shape[0], table.shape[1]) if need_table else None
            grad_x = ext.backward_points(xs, table.contiguous(), g, scales, meta).to(x.dtype) if need_x else None
            return grad_x, grad_table, None, None
        with torch.enable_grad():
            xs = x.detach().requires_grad_(need_x)
            ts = table.detach().requires_grad_(need_table)
            out = grid._tcnn(xs, ts) if impl == "tcnn" else hash_encode_torch(xs, ts, grid.layout)
            inputs = [t for t, need in ((xs, need_x), (ts, need_table)) if need]
            grads = list(torch.autograd.grad(out, inputs, grad_out)) if inputs else []
        grad_x = grads.pop(0) if need_x else None
        grad_table = grads.pop(0) if need_table else None
        return grad_x, grad_table, None, None

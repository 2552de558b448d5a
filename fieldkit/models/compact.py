"""Building blocks of Compact Gaussians (Compact-3DGS, Lee et al. 2024), written from the paper's
description: learnable volume mask, residual vector quantisation, hash-grid colour field.

* :func:`straight_through_mask` — forward 1[σ(m) > ε], backward dσ(m)/dm.
* :class:`ResidualVQ` — S stages of K-entry codebooks, k-means initialised; indices per stage.
* :class:`ColorField` — hash grid at the contracted Gaussian centre + real SH (degree 2, 9 dims) of
  the view direction -> MLP (2 x 64, ReLU) -> degree-0 SH coefficient per Gaussian.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fieldkit.fields.hashgrid import HashGrid, HashGridConfig

MASK_EPS = 0.01
SH_C0 = 0.28209479177387814


def straight_through_mask(mask_logits: Tensor, eps: float = MASK_EPS) -> Tensor:
    """M = sg(1[σ(m) > ε] − σ(m)) + σ(m): the hard mask forward, the sigmoid's gradient backward."""
    soft = torch.sigmoid(mask_logits)
    hard = (soft > eps).to(soft.dtype)
    return (hard - soft).detach() + soft


def gaussian_sh(dc: Tensor, offsets: Tensor | None = None, rest: Tensor | None = None) -> Tensor:
    """SH coefficients [N, K, 3] of each Gaussian: the field's DC [N,3] (+ per-Gaussian offsets), then the
    per-Gaussian SH residual of degrees 1..D [N, K-1, 3] when there is one."""
    dc = dc if offsets is None else dc + offsets
    return dc[:, None, :] if rest is None else torch.cat([dc[:, None, :], rest], dim=1)


def contract_to_unit(x: Tensor, center: Tensor, half_extent: Tensor) -> Tensor:
    """Normalise x by the scene box to [-1,1]^3, Mip-NeRF 360 contraction outside the unit ball
    (range: ball of radius 2), then map to [0,1] by x/4 + 0.5."""
    x = (x - center) / half_extent
    norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    x = torch.where(norm > 1, (2 - 1 / norm) * x / norm, x)
    return x / 4 + 0.5


def sh_basis_deg2(dirs: Tensor) -> Tensor:
    """Real spherical harmonics up to degree 2 of unit directions: [N,3] -> [N,9]."""
    x, y, z = dirs.unbind(-1)
    return torch.stack(
        [
            torch.full_like(x, 0.28209479177387814),
            -0.48860251190291987 * y,
            0.48860251190291987 * z,
            -0.48860251190291987 * x,
            1.0925484305920792 * x * y,
            -1.0925484305920792 * y * z,
            0.31539156525252005 * (3 * z * z - 1),
            -1.0925484305920792 * x * z,
            0.5462742152960396 * (x * x - y * y),
        ],
        dim=-1,
    )


class ColorField(nn.Module):
    """View-dependent colour of each Gaussian: MLP([hash(contract(μ)), SH(dir), per-Gaussian features]) -> SH DC [N,3].

    ``extra_dim`` per-Gaussian feature inputs (0: none, Compact-3DGS) let the MLP vary the view dependence per
    Gaussian instead of only as smoothly as the hash grid."""

    def __init__(self, grid: HashGridConfig, hidden: int = 64, center: Tensor | None = None,
                 half_extent: Tensor | None = None, generator: torch.Generator | None = None, output: str = "linear",
                 extra_dim: int = 0):
        super().__init__()
        if output not in ("linear", "sigmoid"):
            raise ValueError(f"ColorField output must be linear or sigmoid, got {output!r}")
        self.output = output
        """linear: the MLP's output is the SH DC coefficient (Compact-3DGS). sigmoid: the MLP gives the colour
        through a sigmoid (then mapped to the DC coefficient), so the renderer's clamp at 0 can never zero its gradient."""
        self.grid = HashGrid(grid, dims=3, generator=generator)
        self.extra_dim = extra_dim
        self.mlp = nn.Sequential(
            nn.Linear(self.grid.output_dim + 9 + extra_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 3),
        )
        self.register_buffer("center", torch.zeros(3) if center is None else center.float().clone())
        self.register_buffer("half_extent", torch.ones(3) if half_extent is None else half_extent.float().clone())

    def features(self, means: Tensor) -> Tensor:
        x = contract_to_unit(means, self.center, self.half_extent).clamp(0, 1)
        return self.grid(x)

    def decode(self, features: Tensor, dirs: Tensor, extra: Tensor | None = None) -> Tensor:
        """features [N,F], dirs [N,3] (not necessarily unit), per-Gaussian inputs [N,extra_dim] -> SH DC [N,3]."""
        d = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        if (extra is None) != (self.extra_dim == 0) or (extra is not None and extra.shape[-1] != self.extra_dim):
            raise ValueError(f"ColorField expects {self.extra_dim} per-Gaussian inputs, got {None if extra is None else extra.shape[-1]}")
        out = self.mlp(torch.cat([features, sh_basis_deg2(d)] + ([] if extra is None else [extra]), dim=-1))
        if self.output == "sigmoid":
            return (torch.sigmoid(out) - 0.5) / SH_C0
        return out

    def forward(self, means: Tensor, camera_center: Tensor, extra: Tensor | None = None) -> Tensor:
        return self.decode(self.features(means), means - camera_center, extra)


def _nearest(x: Tensor, codebook: Tensor, chunk: int = 65536) -> Tensor:
    out = []
    for i in range(0, len(x), chunk):
        out.append(torch.cdist(x[i : i + chunk], codebook).argmin(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> Tensor:
    """Plain Lloyd k-means initialised from random samples; returns [k, D] centroids."""
    n = len(x)
    pick = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(0, max(n, 1), (k,), generator=generator)
    centroids = x[pick.to(x.device)].clone()
    for _ in range(iters):
        assign = _nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids


class ResidualVQ(nn.Module):
    """Residual vector quantiser: stage s quantises what stages < s left over.

    ``forward`` returns (straight-through quantised x, indices [N,S]); gradients reach x (as if
    the quantiser were the identity) and the selected codebook entries (commitment weight 0)."""

    def __init__(self, dim: int, stages: int = 6, codebook_size: int = 64):
        super().__init__()
        self.codebooks = nn.Parameter(torch.zeros(stages, codebook_size, dim))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def init_kmeans(self, x: Tensor, iters: int = 5, generator: torch.Generator | None = None) -> None:
        residual = x.detach().clone()
        for s in range(self.codebooks.shape[0]):
            c = kmeans(residual, self.codebooks.shape[1], iters, generator)
            self.codebooks.data[s] = c
            residual = residual - c[_nearest(residual, c)]
        self.initialised.fill_(True)

    def indices(self, x: Tensor) -> Tensor:
        residual = x.detach()
        idx = []
        for s in range(self.codebooks.shape[0]):
            i = _nearest(residual, self.codebooks[s].detach())
            idx.append(i)
            residual = residual - self.codebooks[s].detach()[i]
        return torch.stack(idx, dim=1) if idx else torch.zeros(len(x), 0, dtype=torch.long)

    def lookup(self, idx: Tensor) -> Tensor:
        out = 0
        for s in range(self.codebooks.shape[0]):
            out = out + self.codebooks[s][idx[:, s]]
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        idx = self.indices(x)
        q = self.lookup(idx)
        return q + (x - x.detach()), idx


def lookup_codebooks(codebooks: Tensor, idx: Tensor) -> Tensor:
    """Σ_s codebooks[s, idx[:, s]] for stored (decoded) codebooks [S,K,D] and indices [N,S]."""
    out = torch.zeros(idx.shape[0], codebooks.shape[2], dtype=codebooks.dtype)
    for s in range(codebooks.shape[0]):
        out = out + codebooks[s][idx[:, s].long()]
    return out

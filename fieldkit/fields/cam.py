"""Coordinate-Aware Modulation (CAM, Lee et al., ICLR 2024).

After each hidden linear layer of an MLP, and before its activation, features are optionally
normalised (no affine) and then modulated: ``h' = gamma(c) * h + beta(c)``. ``gamma`` and
``beta`` are read by (bi/tri)linear interpolation from small learnable grids at a coordinate
``c`` (pixel position for images, view direction or position for radiance fields). They start
at gamma = 1, beta = 0, so a CAM network starts as the plain MLP, and their grids train with a
higher learning rate than the weights. Values are scalars per layer per grid cell (broadcast
over channels) unless ``channels`` > 1, so CAM adds almost no parameters.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ModulationGrid(nn.Module):
    """Scale and shift grids for ``n_layers`` layers over a 1-, 2- or 3-D coordinate in [-1, 1].

    ``resolution`` gives the grid size per coordinate axis (x first). ``forward(coords [N, d])``
    returns (gamma, beta), each [n_layers, N, channels].
    """

    def __init__(self, n_layers: int, resolution: Sequence[int], channels: int = 1):
        super().__init__()
        self.n_layers = n_layers
        self.dims = len(resolution)
        if self.dims not in (1, 2, 3):
            raise ValueError(f"CAM grids are 1-, 2- or 3-D, got resolution {tuple(resolution)}")
        self.channels = channels
        self.resolution = tuple(int(r) for r in resolution)
        spatial = tuple(reversed(self.resolution))  # grid_sample wants [..., D, H, W] with x along W
        if self.dims == 1:
            spatial = (1, self.resolution[0])
        self.gamma = nn.Parameter(torch.ones(1, n_layers * channels, *spatial))
        self.beta = nn.Parameter(torch.zeros(1, n_layers * channels, *spatial))

    def forward(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        if coords.shape[-1] != self.dims:
            raise ValueError(f"expected [N, {self.dims}] coordinates, got {tuple(coords.shape)}")
        n = coords.shape[0]
        c = coords.to(self.gamma.dtype)
        if self.dims == 1:
            c = torch.stack([c[:, 0], torch.zeros_like(c[:, 0])], dim=-1)
        grid = c.reshape(1, n, *([1] * (max(self.dims, 2) - 1)), max(self.dims, 2))
        both = torch.cat([self.gamma, self.beta], dim=1)
        out = F.grid_sample(both, grid, mode="bilinear", padding_mode="border", align_corners=True)
        out = out.reshape(2, self.n_layers, self.channels, n).permute(0, 1, 3, 2)  # [2, L, N, C]
        return out[0], out[1]


def normalize_features(h: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-sample normalisation over channels without affine (LayerNorm / GroupNorm(1))."""
    return F.layer_norm(h, h.shape[-1:], eps=eps)


class ModulatedMLP(nn.Module):
    """MLP whose hidden layers can be modulated: Linear -> [norm] -> [gamma * h + beta] -> act.

    ``forward(x, modulation=None)``: ``modulation`` is (gamma, beta) with one entry per hidden
    layer (each [N, 1 or width]); without it the network is a plain MLP (and ``normalize``
    still applies if set).
    """

    def __init__(self, in_dim: int, hidden: int, n_hidden: int, out_dim: int, *, normalize: bool = False,
                 activation: type[nn.Module] = nn.ReLU, bias: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden] * n_hidden
        self.hidden_layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:]))
        self.output = nn.Linear(dims[-1], out_dim, bias=bias)
        self.normalize = normalize
        self.act = activation()

    @property
    def n_hidden(self) -> int:
        return len(self.hidden_layers)

    def forward(self, x: Tensor, modulation: tuple[Tensor, Tensor] | None = None) -> Tensor:
        h = x
        for i, layer in enumerate(self.hidden_layers):
            h = layer(h)
            if self.normalize:
                h = normalize_features(h)
            if modulation is not None:
                h = modulation[0][i] * h + modulation[1][i]
            h = self.act(h)
        return self.output(h)

"""OReX's iterative-estimation occupancy network (Sawdayee et al. 2023), rebuilt from its description.

One small MLP is applied ``iterations`` times. Each pass sees the point's positional encoding (xyz plus
sin/cos at learnable frequencies), the current logit and a hidden state (plus a sinusoidal code of the
pass index), and returns a residual for the logit and the next hidden state. Every pass's logit is
supervised, so early passes learn the coarse shape and later ones the detail.

Convention here: a positive logit means *inside* (label 1), negative outside (label 0); the surface is
the zero level set.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LearnableFrequencyEncoding(nn.Module):
    """``[x, sin(f_s * x), cos(f_c * x)]`` with separate learnable sine and cosine frequencies."""

    def __init__(self, n_frequencies: int = 5):
        super().__init__()
        init = 2.0 ** torch.arange(n_frequencies, dtype=torch.float32)
        self.sin_freqs = nn.Parameter(init.clone())
        self.cos_freqs = nn.Parameter(init.clone())

    @property
    def out_dim(self) -> int:
        return 3 + 6 * len(self.sin_freqs)

    def forward(self, x: Tensor) -> Tensor:
        xs = x[..., :, None]
        return torch.cat([x, torch.sin(xs * self.sin_freqs).flatten(-2), torch.cos(xs * self.cos_freqs).flatten(-2)], dim=-1)


def iteration_code(iterations: int, dim: int) -> Tensor:
    """Sinusoidal embedding of the pass index k = 0..iterations-1, ``dim`` = 2 x frequencies."""
    k = torch.arange(iterations, dtype=torch.float64)[:, None]
    freqs = 2.0 ** torch.arange(dim // 2, dtype=torch.float64) * (math.pi / max(iterations, 1))
    code = torch.cat([torch.sin(k * freqs), torch.cos(k * freqs)], dim=-1)
    return code[:, :dim]


class OccupancyNetwork(nn.Module):
    """Recurrent residual MLP: 66 -> 7 x 64 LeakyReLU -> 1 + 32, run ``iterations`` times (paper defaults)."""

    def __init__(self, width: int = 64, depth: int = 7, hidden_state: int = 32, frequencies: int = 5, iterations: int = 10, iteration_frequencies: int = 16):
        super().__init__()
        self.iterations = iterations
        self.hidden_state = hidden_state
        self.encoding = LearnableFrequencyEncoding(frequencies)
        layers: list[nn.Module] = []
        dim = self.encoding.out_dim + 1 + hidden_state
        for _ in range(depth):
            layers += [nn.Linear(dim, width), nn.LeakyReLU()]
            dim = width
        layers.append(nn.Linear(dim, 1 + hidden_state))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.uniform_(module.bias, 0.0, 1.0)
        self.initial_logit = nn.Parameter(torch.rand(1))
        self.initial_state = nn.Parameter(torch.rand(hidden_state))
        code = iteration_code(iterations, 2 * iteration_frequencies)
        if code.shape[1] < hidden_state:
            code = torch.cat([code, torch.zeros(iterations, hidden_state - code.shape[1], dtype=code.dtype)], dim=1)
        self.register_buffer("pass_code", code[:, :hidden_state].float(), persistent=False)

    def forward(self, x: Tensor, all_passes: bool = True) -> list[Tensor] | Tensor:
        """Logits of every pass (list of [N]) or only the last one ([N])."""
        embedded = self.encoding(x)
        n = x.shape[0]
        logit = self.initial_logit.expand(n, 1)
        state = self.initial_state.expand(n, self.hidden_state)
        code = self.pass_code.to(dtype=x.dtype)
        outputs: list[Tensor] = []
        for k in range(self.iterations):
            out = self.mlp(torch.cat([embedded, logit, state + code[k]], dim=-1))
            logit = logit + out[:, :1]
            state = out[:, 1:]
            if all_passes:
                outputs.append(logit[:, 0])
        return outputs if all_passes else logit[:, 0]

    @torch.no_grad()
    def logits(self, x: Tensor, chunk: int = 65536) -> Tensor:
        """Last-pass logits of many points, in chunks."""
        dtype = next(self.parameters()).dtype
        parts = [self.forward(x[i : i + chunk].to(dtype), all_passes=False) for i in range(0, len(x), chunk)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

"""Keep Adam's moments in step when Gaussians are added or removed (one parameter per group)."""

from __future__ import annotations

import torch
from torch import Tensor


def _param_groups(optimizer: torch.optim.Optimizer):
    for group in optimizer.param_groups:
        if len(group["params"]) != 1:
            raise ValueError("densification needs exactly one parameter per optimizer group")
        yield group


def replace_rows(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], keep: Tensor, new_rows: dict[str, Tensor]) -> None:
    """Keep rows ``keep`` (bool [N]) of every parameter, append ``new_rows[name]``; moments of new rows are 0."""
    for group in _param_groups(optimizer):
        name = group["name"]
        old = group["params"][0]
        extra = new_rows[name]
        fresh = torch.nn.Parameter(torch.cat([old.detach()[keep], extra.detach()], dim=0))
        state = optimizer.state.pop(old, None)
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                moment = state[key]
                state[key] = torch.cat([moment[keep], torch.zeros_like(extra)], dim=0)
            optimizer.state[fresh] = state
        group["params"][0] = fresh
        params[name] = fresh


def reset_moments(optimizer: torch.optim.Optimizer, name: str) -> None:
    """Zero Adam's moments for the parameter called ``name``."""
    for group in _param_groups(optimizer):
        if group["name"] == name:
            state = optimizer.state.get(group["params"][0])
            if state:
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()

"""Learning-rate schedules."""

from __future__ import annotations

import math


def exponential_decay(step: int, lr_start: float, lr_end: float, total_steps: int) -> float:
    """Log-linear interpolation from ``lr_start`` (step 0) to ``lr_end`` (step ``total_steps``)."""
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return math.exp((1 - t) * math.log(lr_start) + t * math.log(lr_end))

"""fieldkit: 3D reconstruction from real data (Gaussian splats, radiance fields, shapes from slices)."""

import os as _os

# OpenMP threads that spin while waiting make the native kernels and torch 4-40x slower when
# the machine is busy with anything else (measured on 2 cores, see benchmarks/NOTES.md).
# Must be set before torch loads its OpenMP runtime; an explicit user setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

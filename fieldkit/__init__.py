"""fieldkit: 3D reconstruction from real data (Gaussian splats, radiance fields, shapes from slices)."""

__version__ = "0.1.0"

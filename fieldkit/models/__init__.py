"""Things with trainable parameters."""

from fieldkit.models.gaussians import Splats

__all__ = ["Splats"]

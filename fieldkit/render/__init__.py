"""The differentiable rendering core."""

from fieldkit.render.gaussians import RenderOutput, rasterize

__all__ = ["RenderOutput", "rasterize"]

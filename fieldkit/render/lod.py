"""Render a level-of-detail cut of a :class:`fieldkit.models.hierarchy.GaussianHierarchy`.

A thin wrapper around :func:`fieldkit.render.rasterize`: per camera, pick the tau-cut of the tree
(projected node size in pixels against ``tau``), blend the cut's nodes with their parents near the
switch, and rasterize just those Gaussians. ``tau = 0`` is exactly the full-detail (leaf) render.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fieldkit.cameras import Cameras
from fieldkit.render.gaussians import RenderOutput, rasterize


@dataclass
class LODRender:
    """Images of C cameras ([C,H,W,ch]) and, per camera, how many Gaussians the cut held."""

    rgb: Tensor
    alpha: Tensor
    depth: Tensor
    counts: list[int]


def rasterize_cut(hierarchy, index: Tensor, t: Tensor | None, camera: Cameras, **kwargs) -> RenderOutput:
    """Rasterize the nodes ``index`` (blended with their parents by ``1 - t``) into one camera."""
    means, quats, scales, opacities, sh = hierarchy.gaussians(index, t)
    kwargs.setdefault("sh_degree", hierarchy.sh_degree)
    return rasterize(means, quats, scales, opacities, sh, camera, **kwargs)


def render_lod(hierarchy, cameras: Cameras, tau: float, *, blend: bool = True, **kwargs) -> LODRender:
    """Render every camera through its own tau-cut; ``kwargs`` go to ``rasterize`` (background, backend, sh_degree...)."""
    rgbs, alphas, depths, counts = [], [], [], []
    for i in range(len(cameras)):
        camera = cameras[i]
        index, t = hierarchy.cut(camera, tau, blend=blend)
        out = rasterize_cut(hierarchy, index, t, camera, **kwargs)
        rgbs.append(out.rgb)
        alphas.append(out.alpha)
        depths.append(out.depth)
        counts.append(int(index.numel()))
    return LODRender(torch.cat(rgbs), torch.cat(alphas), torch.cat(depths), counts)

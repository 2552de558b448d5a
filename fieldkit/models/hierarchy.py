"""Level-of-detail tree over trained Gaussians (hierarchical 3DGS, Kerbl et al. 2024, from the paper's
description; see docs/lod.md).

Built bottom-up after training:

* **Tree.** A binary kd-tree over the Gaussian centres: every segment is split at the median of its
  longest bounding-box axis until one Gaussian is left (vectorised level by level: one segmented sort
  per level). N leaves give N - 1 interior nodes. Node ids: leaves are ``0..N-1`` (the input order),
  interior nodes ``N..2N-2`` in creation order (root = ``N``, parents before children).
* **Merge.** An interior node is the moment-matched Gaussian of its two children with weights
  ``w = opacity x area``, ``area`` = product of the two largest scales (projected-area proxy); the merged
  node's weight is the children's sum ``W``, which makes every interior node the exact weighted moment
  match of *all* the leaves below it:
  ``mu = sum a_i mu_i``, ``Sigma = sum a_i (Sigma_i + (mu_i - mu)(mu_i - mu)^T)``, ``sh = sum a_i sh_i``
  with ``a_i = w_i / W``. Opacity conserves the integrated opacity (footprint integral of the alpha,
  ``2 pi x area x o`` for the leaves): with ``r = W / area(merged)``, ``o = r`` when ``r <= 1``, else
  the flat-topped Gaussian whose alpha clamp (``min(0.999, o g)``) integrates to the same:
  ``1 + ln o = r``, i.e. ``o = exp(r - 1)`` (capped at ``exp(3)``). So interior opacities may exceed 1:
  a merged opaque surface stays opaque over its core instead of turning into a translucent blob.
* **Size.** Every node keeps an axis-aligned box: the union of its leaves' 3-sigma boxes. Its
  projected size in pixels for a camera is ``extent / distance x focal`` (extent = longest box side,
  distance = from the camera centre to the nearest point of the box; infinite inside the box), so a
  parent is never smaller than its children and every tau gives a well-defined cut.
* **Cut.** Node ``i`` is rendered when ``size_i < tau`` (or it is a leaf) and its parent's size
  ``>= tau`` (or it is the root). Near the switch a node is blended with its parent (weight ``t``,
  Kerbl's rule: ``t = 1`` when the parent's size > 2 tau, falling to 0 as the parent's size reaches tau),
  so the image changes continuously with distance. ``tau = 0`` selects exactly the leaves, unblended.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from fieldkit.cameras import Cameras, rotmat_to_quat
from fieldkit.render.projection import covariance_3d

MAX_LOG_OPACITY_EXCESS = 3.0  # merged opacity <= exp(3) ~ 20 (flat-topped core)
BOX_SIGMAS = 3.0


@dataclass
class GaussianHierarchy:
    """A binary LOD tree: M = 2N - 1 nodes, each a renderable Gaussian (activated parameters;
    interior opacities may exceed 1, see the module doc).

    Leaves are nodes ``0..N-1`` (the trained Gaussians, unchanged), interior nodes follow.
    ``parent`` is -1 at the root, ``children`` is -1 at leaves.
    """

    means: Tensor  # [M,3]
    quats: Tensor  # [M,4] unit (w,x,y,z)
    scales: Tensor  # [M,3] linear standard deviations
    opacities: Tensor  # [M] leaves in [0,1]; merged nodes may exceed 1 (flat-topped)
    sh: Tensor  # [M,K,3] SH coefficients (K = 1 for plain DC colour)
    parent: Tensor  # [M] int64
    children: Tensor  # [M,2] int64
    box_min: Tensor  # [M,3]
    box_max: Tensor  # [M,3]
    weights: Tensor  # [M] opacity x area (interior: sum over the leaves below)
    depth: Tensor  # [M] int64, root = 0

    @property
    def num_nodes(self) -> int:
        return self.means.shape[0]

    @property
    def num_leaves(self) -> int:
        return (self.num_nodes + 1) // 2

    @property
    def root(self) -> int:
        return self.num_leaves if self.num_nodes > 1 else 0

    @property
    def num_levels(self) -> int:
        return int(self.depth.max()) + 1

    @property
    def sh_degree(self) -> int:
        return int(round(self.sh.shape[1] ** 0.5)) - 1

    def to(self, device: torch.device | str | None = None) -> "GaussianHierarchy":
        return GaussianHierarchy(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def is_leaf(self) -> Tensor:
        return self._cached("is_leaf", lambda: self.children[:, 0] < 0)

    def extent(self) -> Tensor:
        """[M] world size of every node: the longest side of its box."""
        return self._cached("extent", lambda: (self.box_max - self.box_min).amax(dim=-1))

    def _cached(self, key: str, make):
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    # -- levels and cuts ----------------------------------------------------------------------

    def level_indices(self, level: int) -> Tensor:
        """The antichain at tree depth ``level``: nodes at that depth plus shallower leaves (sorted)."""
        keep = (self.depth == level) | (self.is_leaf() & (self.depth < level))
        return torch.nonzero(keep).squeeze(1)

    def node_sizes(self, camera: Cameras) -> Tensor:
        """[M] projected extent in pixels of every node's box for one camera (inf when inside it)."""
        center = camera.centers[0].to(self.box_min)
        gap = torch.maximum(self.box_min - center, center - self.box_max).clamp_min(0)
        distance = gap.norm(dim=-1)
        extent = self.extent()
        focal = camera.K[0, :2, :2].diagonal().max().to(self.box_min)
        return torch.where(distance > 0, extent * focal / distance.clamp_min(1e-12), torch.full_like(extent, float("inf")))

    def cut(self, camera: Cameras, tau: float, blend: bool = True) -> tuple[Tensor, Tensor]:
        """(node indices ascending, blend weights t in [0,1]) of the tau-cut for one camera."""
        size = self.node_sizes(camera)
        has_parent = self._cached("has_parent", lambda: self.parent >= 0)
        parent_size = size[self._cached("parent_or_self", lambda: torch.where(has_parent, self.parent, torch.arange(len(self.parent), device=self.parent.device)))]
        parent_size = torch.where(has_parent, parent_size, torch.full_like(size, float("inf")))
        selected = (parent_size >= tau) & (self.is_leaf() | (size < tau))
        index = torch.nonzero(selected).squeeze(1)
        t = torch.ones(index.shape[0], dtype=self.means.dtype, device=self.means.device)
        if blend and tau > 0:
            p, s = parent_size[index], size[index]
            start = torch.maximum(p / 2, s)
            ramp = 1 - (tau - start).clamp_min(0) / (p - start).clamp_min(1e-12)
            blended = has_parent[index] & (p <= 2 * tau) & (p > start)
            t = torch.where(blended, ramp.clamp(0, 1), t)
        return index, t

    def gaussians(self, index: Tensor, t: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(means, quats, scales, opacities, sh) of the given nodes, each blended with its parent by
        ``1 - t`` (the parent's opacity shared between its two children so that both together
        composite to it)."""
        means, quats, scales = self.means[index], self.quats[index], self.scales[index]
        opacities, sh = self.opacities[index], self.sh[index]
        if t is None:
            return means, quats, scales, opacities, sh
        rows = torch.nonzero(t < 1).squeeze(1)
        if rows.numel() == 0:
            return means, quats, scales, opacities, sh
        node, tt = index[rows], t[rows]
        par = self.parent[node]
        w = tt[:, None]
        means[rows] = w * self.means[node] + (1 - w) * self.means[par]
        scales[rows] = w * self.scales[node] + (1 - w) * self.scales[par]
        q_node = self.quats[node] / self.quats[node].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        q_par = self.quats[par]
        q_par = torch.where((q_par * q_node).sum(-1, keepdim=True) < 0, -q_par, q_par)
        q = w * q_node + (1 - w) * q_par
        quats[rows] = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        share = parent_share(self.opacities[par])
        opacities[rows] = tt * self.opacities[node] + (1 - tt) * share
        sh[rows] = w[:, :, None] * self.sh[node] + (1 - w[:, :, None]) * self.sh[par]
        return means, quats, scales, opacities, sh


# -- building ---------------------------------------------------------------------------------


def _kd_tree(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median-split binary tree over ``points`` [N,3].

    Returns (children [N-1,2] of the interior nodes, in node ids; interior node depth [N-1];
    leaf depth [N]). Interior node k has id N + k; the root is N.
    """
    n = len(points)
    children = np.full((max(n - 1, 0), 2), -1, np.int64)
    inner_depth = np.zeros(max(n - 1, 0), np.int64)
    leaf_depth = np.zeros(n, np.int64)
    if n < 2:
        return children, inner_depth, leaf_depth
    perm = np.arange(n)
    starts, ends, nodes = np.array([0]), np.array([n]), np.array([n])
    next_id, level = n + 1, 0
    while len(starts):
        sizes = ends - starts
        inner_depth[nodes - n] = level
        # the elements of all active segments, segment by segment
        seg_of = np.repeat(np.arange(len(starts)), sizes)
        offsets = np.cumsum(sizes) - sizes
        idx = starts[seg_of] + (np.arange(len(seg_of)) - offsets[seg_of])
        pts = points[perm[idx]]
        low = np.minimum.reduceat(pts, offsets, axis=0)
        high = np.maximum.reduceat(pts, offsets, axis=0)
        axis = np.argmax(high - low, axis=1)
        key = pts[np.arange(len(idx)), axis[seg_of]]
        order = np.lexsort((key, seg_of))
        perm[idx] = perm[idx][order]
        mids = starts + sizes // 2
        new_starts, new_ends, new_nodes = [], [], []
        for side, (a, b) in enumerate(((starts, mids), (mids, ends))):
            size = b - a
            ids = np.empty(len(a), np.int64)
            single = size == 1
            ids[single] = perm[a[single]]
            leaf_depth[perm[a[single]]] = level + 1
            multi = ~single
            ids[multi] = np.arange(next_id, next_id + multi.sum())
            next_id += int(multi.sum())
            children[nodes - n, side] = ids
            new_starts.append(a[multi])
            new_ends.append(b[multi])
            new_nodes.append(ids[multi])
        starts, ends, nodes = (np.concatenate(v) for v in (new_starts, new_ends, new_nodes))
        level += 1
    return children, inner_depth, leaf_depth


def area_proxy(scales: Tensor) -> Tensor:
    """Projected-area proxy: product of the two largest scales."""
    top2 = scales.topk(2, dim=-1).values
    return top2[..., 0] * top2[..., 1]


def merged_opacity(ratio: Tensor) -> Tensor:
    """Opacity whose clamped footprint integral matches ``ratio`` = W / area (see the module doc)."""
    ratio = ratio.clamp_min(0)
    return torch.where(ratio <= 1, ratio, torch.exp((ratio - 1).clamp(max=MAX_LOG_OPACITY_EXCESS)))


def parent_share(opacity: Tensor) -> Tensor:
    """Opacity of each of two coincident copies that together composite like one of ``opacity``:
    ``1 - sqrt(1 - o)`` up to 1, ``o / 2`` for flat-topped (o > 2) parents, 1 in between."""
    return torch.maximum(1 - (1 - opacity.clamp(max=1)).sqrt(), opacity / 2)


def merge_moments(weights: Tensor, means: Tensor, covs: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted moment match of Gaussians along dim -3/-2: (mean [...,3], covariance [...,3,3]).

    weights [...,k], means [...,k,3], covs [...,k,3,3]; zero total weight -> equal weights.
    """
    total = weights.sum(-1, keepdim=True)
    a = torch.where(total > 0, weights / total.clamp_min(1e-300), torch.full_like(weights, 1.0 / weights.shape[-1]))
    mu = (a[..., None] * means).sum(-2)
    d = means - mu[..., None, :]
    cov = (a[..., None, None] * (covs + d[..., :, None] * d[..., None, :])).sum(-3)
    return mu, cov


def covariance_to_gaussian(cov: Tensor) -> tuple[Tensor, Tensor]:
    """(unit quats [...,4], scales [...,3]) of symmetric covariances via eigen-decomposition."""
    eigvals, eigvecs = torch.linalg.eigh(cov)
    floor = (1e-4 * cov.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True)).clamp_min(1e-30)
    scales = eigvals.clamp_min(0).add(torch.where(eigvals <= 0, floor, torch.zeros_like(eigvals))).sqrt()
    flip = torch.linalg.det(eigvecs) < 0
    eigvecs = eigvecs.clone()
    eigvecs[..., 2] = torch.where(flip[..., None], -eigvecs[..., 2], eigvecs[..., 2])
    return rotmat_to_quat(eigvecs), scales


@torch.no_grad()
def build_hierarchy(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, sh: Tensor) -> GaussianHierarchy:
    """The LOD tree over N Gaussians given by activated parameters (sh: [N,K,3] or RGB [N,3])."""
    device, dtype = means.device, means.dtype
    if sh.ndim == 2:
        sh = sh[:, None, :]
    n = means.shape[0]
    if n == 0:
        raise ValueError("build_hierarchy: no Gaussians")
    children_inner, inner_depth, leaf_depth = _kd_tree(means.detach().cpu().double().numpy())
    m = 2 * n - 1
    f64 = dict(dtype=torch.float64)
    leaf_means = means.detach().cpu().to(**f64)
    leaf_quats = quats.detach().cpu().to(**f64)
    leaf_quats = leaf_quats / leaf_quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    leaf_scales = scales.detach().cpu().to(**f64)
    leaf_opac = opacities.detach().cpu().to(**f64)
    all_means = torch.zeros(m, 3, **f64)
    all_covs = torch.zeros(m, 3, 3, **f64)
    all_sh = torch.zeros(m, sh.shape[1], 3, **f64)
    all_w = torch.zeros(m, **f64)
    box_min = torch.zeros(m, 3, **f64)
    box_max = torch.zeros(m, 3, **f64)
    all_means[:n] = leaf_means
    all_covs[:n] = covariance_3d(leaf_quats, leaf_scales)
    all_sh[:n] = sh.detach().cpu().to(**f64)
    all_w[:n] = leaf_opac * area_proxy(leaf_scales)
    half = BOX_SIGMAS * all_covs[:n].diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    box_min[:n], box_max[:n] = leaf_means - half, leaf_means + half

    children = torch.full((m, 2), -1, dtype=torch.int64)
    parent = torch.full((m,), -1, dtype=torch.int64)
    depth = torch.zeros(m, dtype=torch.int64)
    depth[:n] = torch.from_numpy(leaf_depth)
    if n > 1:
        ch = torch.from_numpy(children_inner)
        children[n:] = ch
        parent[ch.reshape(-1)] = torch.arange(n, m).repeat_interleave(2)
        depth[n:] = torch.from_numpy(inner_depth)
        # bottom-up: all interior nodes of one depth at once, deepest first
        for level in range(int(inner_depth.max()), -1, -1):
            ids = torch.from_numpy(np.nonzero(inner_depth == level)[0] + n)
            c = children[ids]  # [k,2]
            w = all_w[c]
            mu, cov = merge_moments(w, all_means[c], all_covs[c])
            all_means[ids], all_covs[ids] = mu, cov
            total = w.sum(-1, keepdim=True)
            a = torch.where(total > 0, w / total.clamp_min(1e-300), torch.full_like(w, 0.5))
            all_sh[ids] = (a[..., None, None] * all_sh[c]).sum(1)
            all_w[ids] = total[:, 0]
            box_min[ids] = box_min[c].amin(1)
            box_max[ids] = box_max[c].amax(1)

    out_quats = torch.zeros(m, 4, **f64)
    out_scales = torch.zeros(m, 3, **f64)
    out_opac = torch.zeros(m, **f64)
    out_quats[:n], out_scales[:n], out_opac[:n] = leaf_quats, leaf_scales, leaf_opac
    if n > 1:
        q, s = covariance_to_gaussian(all_covs[n:])
        out_quats[n:], out_scales[n:] = q, s
        out_opac[n:] = merged_opacity(all_w[n:] / area_proxy(s).clamp_min(1e-300))

    def cast(x: Tensor) -> Tensor:
        return x.to(device=device, dtype=dtype)

    hier = GaussianHierarchy(
        means=cast(all_means), quats=cast(out_quats), scales=cast(out_scales), opacities=cast(out_opac),
        sh=cast(all_sh), parent=parent.to(device), children=children.to(device), box_min=cast(box_min),
        box_max=cast(box_max), weights=cast(all_w), depth=depth.to(device),
    )
    # leaves are the input, bit for bit (tau = 0 must reproduce the full render exactly)
    hier.means[:n], hier.scales[:n], hier.opacities[:n] = means.detach(), scales.detach(), opacities.detach()
    hier.quats[:n], hier.sh[:n] = quats.detach(), sh.detach()
    return hier


def hierarchy_from_splats(splats) -> GaussianHierarchy:
    """Build the tree from :class:`fieldkit.models.gaussians.Splats` (raw, pre-activation layout)."""
    return build_hierarchy(splats.means, splats.quats, splats.scales, splats.opacities, splats.sh)

"""Volume rendering for fields: rays from Cameras, scene space, sampling, compositing.

One function per stage, all differentiable where it matters:

* :func:`pixel_rays` / :func:`camera_rays` — world-space rays through pixel centres (+0.5) of
  OpenCV :class:`~fieldkit.cameras.Cameras`; directions are unit length, and ``z_scale``
  (direction . optical axis) converts distance along a ray to camera depth.
* :class:`SceneSpace` — maps world points into the unit cube the encodings read: an axis-aligned
  box for bounded captures, or the box plus mip-NeRF 360 style contraction (L-infinity norm)
  for unbounded ones, where everything outside the box is squeezed into a shell.
* :func:`sample_along_rays` — stratified samples at a fixed step inside the box (and uniform in
  disparity outside it when contracting), kept only where an occupancy grid says space is
  occupied (:class:`fieldkit.fields.occupancy.OccupancyGrid`).
* :func:`composite` — front-to-back alpha compositing of packed samples (sorted by ray):
  colour, opacity, expected depth, per-sample weights; :func:`prune_terminated` drops samples
  behind the point where transmittance fell below ``early_stop_eps`` (early ray termination),
  using a cheap density-only pass.
* :func:`render_rays` ties them together and adds the background colour.

Samples are *packed*: one flat list with a ``ray_ids`` array, like nerfacc, so the compositing
stage can get a native kernel without changing its signature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from fieldkit.cameras import Cameras

# ---------------------------------------------------------------------------------------------
# Rays
# ---------------------------------------------------------------------------------------------


@dataclass
class Rays:
    origins: Tensor  # [R, 3] world
    directions: Tensor  # [R, 3] unit, world
    z_scale: Tensor  # [R] direction . camera forward axis (depth = distance * z_scale)

    def __len__(self) -> int:
        return self.origins.shape[0]

    def __getitem__(self, index) -> "Rays":
        return Rays(self.origins[index], self.directions[index], self.z_scale[index])


def pixel_rays(cameras: Cameras, camera_ids: Tensor, x: Tensor, y: Tensor, *, centers: bool = True) -> Rays:
    """Rays of cameras ``camera_ids`` [R] through pixel columns ``x`` and rows ``y`` [R].

    With ``centers`` (integer pixel indices) the ray goes through the pixel centre (x + 0.5, y + 0.5),
    the Cameras convention; otherwise x, y are continuous image coordinates.
    """
    w2c = cameras.world_to_cam[camera_ids].float()
    K = cameras.K[camera_ids].float()
    u = x.float() + (0.5 if centers else 0.0)
    v = y.float() + (0.5 if centers else 0.0)
    d_cam = torch.stack([(u - K[:, 0, 2]) / K[:, 0, 0], (v - K[:, 1, 2]) / K[:, 1, 1], torch.ones_like(u)], dim=-1)
    R = w2c[:, :3, :3]
    t = w2c[:, :3, 3]
    origins = -(R.transpose(1, 2) @ t[..., None])[..., 0]
    dirs = (R.transpose(1, 2) @ d_cam[..., None])[..., 0]
    norm = dirs.norm(dim=-1, keepdim=True)
    return Rays(origins, dirs / norm, 1.0 / norm[:, 0])


def camera_rays(cameras: Cameras, index: int = 0) -> Rays:
    """All H*W rays of one camera, row-major (pixel (row i, column j) at i * W + j)."""
    H, W = cameras.height, cameras.width
    device = cameras.device
    rows, cols = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    ids = torch.full((H * W,), index, dtype=torch.long, device=device)
    return pixel_rays(cameras, ids, cols.reshape(-1), rows.reshape(-1))


# ---------------------------------------------------------------------------------------------
# Scene space
# ---------------------------------------------------------------------------------------------


def contract(y: Tensor) -> Tensor:
    """L-infinity scene contraction: identity in [-1,1]^3, (2 - 1/|y|) y/|y| outside (range [-2,2]^3)."""
    norm = y.abs().amax(dim=-1, keepdim=True)
    safe = norm.clamp_min(1.0)
    return torch.where(norm <= 1.0, y, (2.0 - 1.0 / safe) * (y / safe))


def uncontract(z: Tensor) -> Tensor:
    """Inverse of :func:`contract` for points in (-2, 2)^3."""
    norm = z.abs().amax(dim=-1, keepdim=True)
    safe = norm.clamp(1.0, 2.0 - 1e-6)
    radius = 1.0 / (2.0 - safe)
    return torch.where(norm <= 1.0, z, z / safe * radius)


@dataclass
class SceneSpace:
    """World <-> unit cube [0,1]^3 for encodings and the occupancy grid.

    ``center``/``half_size`` define the box. Bounded: the box maps linearly onto the cube.
    Contracted: the box maps onto [-1,1]^3, everything outside is contracted into [-2,2]^3, and
    the whole of that maps onto the cube (the box fills its central half).
    """

    center: Tensor
    half_size: Tensor
    contracted: bool = False

    @staticmethod
    def from_box(box: Tensor, contracted: bool = False) -> "SceneSpace":
        box = torch.as_tensor(box, dtype=torch.float32)
        return SceneSpace((box[0] + box[1]) / 2, (box[1] - box[0]) / 2, contracted)

    @property
    def box(self) -> Tensor:
        return torch.stack([self.center - self.half_size, self.center + self.half_size])

    def to(self, device) -> "SceneSpace":
        return SceneSpace(self.center.to(device), self.half_size.to(device), self.contracted)

    def to_unit(self, x: Tensor) -> Tensor:
        y = (x - self.center.to(x)) / self.half_size.to(x)
        if self.contracted:
            return contract(y) * 0.25 + 0.5
        return y * 0.5 + 0.5

    def from_unit(self, u: Tensor) -> Tensor:
        if self.contracted:
            y = uncontract((u - 0.5) * 4.0)
        else:
            y = (u - 0.5) * 2.0
        return y * self.half_size.to(u) + self.center.to(u)

    def state(self) -> dict:
        return {"center": self.center.cpu(), "half_size": self.half_size.cpu(), "contracted": self.contracted}

    @staticmethod
    def from_state(state: dict) -> "SceneSpace":
        return SceneSpace(state["center"].float(), state["half_size"].float(), bool(state["contracted"]))


def ray_box_intersect(rays: Rays, box: Tensor) -> tuple[Tensor, Tensor]:
    """(t_near, t_far) [R] of rays with an axis-aligned box [2,3]; t_near > t_far means a miss."""
    inv = 1.0 / torch.where(rays.directions.abs() < 1e-12, torch.full_like(rays.directions, 1e-12), rays.directions)
    t0 = (box[0].to(rays.origins) - rays.origins) * inv
    t1 = (box[1].to(rays.origins) - rays.origins) * inv
    t_near = torch.minimum(t0, t1).amax(dim=-1)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    return t_near, t_far


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


class Occupancy(Protocol):
    def query(self, unit_points: Tensor) -> Tensor:  # bool [S]
        ...

    def occupied_box(self) -> Tensor | None:  # [2,3] in unit coordinates, or None
        ...


@dataclass
class Samples:
    """Packed samples, sorted by ray: ``ray_ids`` [S], positions along rays ``t`` [S], lengths ``deltas`` [S]."""

    ray_ids: Tensor
    t: Tensor
    deltas: Tensor
    n_rays: int

    def __len__(self) -> int:
        return self.ray_ids.shape[0]

    def select(self, keep: Tensor) -> "Samples":
        return Samples(self.ray_ids[keep], self.t[keep], self.deltas[keep], self.n_rays)

    def points(self, rays: Rays) -> Tensor:
        return rays.origins[self.ray_ids] + rays.directions[self.ray_ids] * self.t[:, None]


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def sample_along_rays(
    rays: Rays,
    space: SceneSpace,
    step_size: float,
    *,
    occupancy: Occupancy | None = None,
    near: float = 0.0,
    far: float = 1e4,
    outer_samples: int = 64,
    stratified: bool = False,
    generator: torch.Generator | None = None,
) -> Samples:
    """Stratified samples inside occupied space.

    Inside the box: bins of ``step_size`` (world units) from where the ray enters the box (or the
    occupied part of it) to where it leaves, one sample per bin (the bin's middle, or uniformly
    random inside it when ``stratified``). Contracted spaces add ``outer_samples`` bins uniform in
    disparity from the box exit to ``far``. Samples whose cell the occupancy grid marks empty are
    dropped. Returns packed samples sorted by ray.
    """
    device = rays.origins.device
    R = len(rays)
    box = space.box.to(device)
    if occupancy is not None and not space.contracted:
        occupied = occupancy.occupied_box()
        if occupied is not None:  # march only through the box around occupied cells
            box = space.from_unit(occupied.to(device))
    t_near, t_far = ray_box_intersect(rays, box)
    t_near = t_near.clamp_min(near)
    t_far = torch.minimum(t_far, torch.full_like(t_far, far))
    hit = t_far > t_near
    chord = (t_far - t_near).clamp_min(0)
    n_inner = int(math.ceil(float(chord.max()) / step_size)) if R and bool(hit.any()) else 0
    if occupancy is not None and not space.contracted and hasattr(occupancy, "coarse") and n_inner > 16:
        return _sample_bounded_two_level(rays, space, step_size, occupancy, t_near, t_far, hit, n_inner, stratified, generator)
    parts_t, parts_d, parts_valid = [], [], []
    if n_inner > 0:
        idx = torch.arange(n_inner, device=device, dtype=torch.float32)
        if stratified:
            jitter = _rand((R, n_inner), generator, device)
        else:
            jitter = torch.full((R, n_inner), 0.5, device=device)
        t_start = t_near[:, None] + idx[None] * step_size
        t = t_start + jitter * step_size
        end = torch.minimum(t_start + step_size, t_far[:, None])
        deltas = (end - t_start).clamp_min(0)
        valid = hit[:, None] & (t_start < t_far[:, None])
        t = torch.minimum(t, t_far[:, None])
        parts_t.append(t)
        parts_d.append(deltas)
        parts_valid.append(valid)
    if space.contracted and outer_samples > 0:
        _, t_exit = ray_box_intersect(rays, space.box.to(device))
        t_exit = t_exit.clamp_min(near)
        s = torch.linspace(0, 1, outer_samples + 1, device=device)
        inv0, inv1 = 1.0 / t_exit.clamp_min(1e-6), torch.full_like(t_exit, 1.0 / far)
        edges = 1.0 / (inv0[:, None] * (1 - s[None]) + inv1[:, None] * s[None])  # uniform in disparity
        if stratified:
            u = _rand((R, outer_samples), generator, device)
        else:
            u = torch.full((R, outer_samples), 0.5, device=device)
        t = edges[:, :-1] + u * (edges[:, 1:] - edges[:, :-1])
        parts_t.append(t)
        parts_d.append(edges[:, 1:] - edges[:, :-1])
        parts_valid.append((t_exit < far)[:, None].expand(R, outer_samples))
    if not parts_t:
        empty = torch.zeros(0, device=device)
        return Samples(torch.zeros(0, dtype=torch.long, device=device), empty, empty, R)
    t = torch.cat(parts_t, dim=1)
    deltas = torch.cat(parts_d, dim=1)
    valid = torch.cat(parts_valid, dim=1) & (deltas > 0)
    if occupancy is not None and t.numel():  # test the dense [R, N] layout: no gathers
        points = rays.origins[:, None, :] + rays.directions[:, None, :] * t[..., None]
        valid &= occupancy.query(space.to_unit(points.reshape(-1, 3))).reshape(valid.shape)
    ray_ids, cols = valid.nonzero(as_tuple=True)  # row-major: sorted by ray, then by t
    return Samples(ray_ids, t[ray_ids, cols], deltas[ray_ids, cols], R)


def _sample_bounded_two_level(rays, space, step_size, occupancy, t_near, t_far, hit, n_inner, stratified, generator):
    """Same samples as the flat path of :func:`sample_along_rays` (bounded space), found faster.

    Bins are grouped ``k`` at a time; a group is tested once, at its centre, against the
    occupancy grid max-pooled ``f`` x and dilated by one coarse cell, which is conservative as long
    as half a group (k * step / 2) fits in one coarse cell. Only the bins of occupied groups are
    then tested against the full-resolution grid.
    """
    device = rays.origins.device
    R = len(rays)
    half = space.half_size.to(device)
    unit_o = (rays.origins - space.center.to(device)) / (2 * half) + 0.5  # unit = unit_o + unit_d * t
    unit_d = rays.directions / (2 * half)
    factor = 4
    coarse, res = occupancy.coarse(factor)
    cell_world = float((2 * half).min()) / res
    k = int(max(1, min(8, math.floor(2 * cell_world / step_size))))
    n_groups = int(math.ceil(n_inner / k))
    g = torch.arange(n_groups, device=device, dtype=torch.float32)
    t_mid = t_near[:, None] + (g[None] + 0.5) * (k * step_size)  # [R, G]
    valid_g = hit[:, None] & (t_near[:, None] + g[None] * (k * step_size) < t_far[:, None])
    u = unit_o[:, None, :] + unit_d[:, None, :] * t_mid[..., None]
    cell = torch.floor(u * res).long()
    inside = ((cell >= 0) & (cell < res)).all(dim=-1)
    cell = cell.clamp(0, res - 1)
    flat = cell[..., 0] + res * (cell[..., 1] + res * cell[..., 2])
    valid_g &= coarse[flat] | ~inside  # groups straddling the cube's faces stay (the fine test decides)
    ray_g, col_g = valid_g.nonzero(as_tuple=True)  # sorted by ray, then group
    bins = col_g[:, None] * k + torch.arange(k, device=device)[None]  # [M, k]
    ray_ids = ray_g[:, None].expand(-1, k).reshape(-1)
    bins = bins.reshape(-1)
    t_start = t_near[ray_ids] + bins.float() * step_size
    tf = t_far[ray_ids]
    keep = t_start < tf
    ray_ids, t_start, tf = ray_ids[keep], t_start[keep], tf[keep]
    jitter = _rand((len(t_start),), generator, device) if stratified else torch.full_like(t_start, 0.5)
    t = torch.minimum(t_start + jitter * step_size, tf)
    deltas = (torch.minimum(t_start + step_size, tf) - t_start).clamp_min(0)
    u = unit_o[ray_ids] + unit_d[ray_ids] * t[:, None]
    keep = occupancy.query(u) & (deltas > 0)
    return Samples(ray_ids[keep], t[keep], deltas[keep], R)


# ---------------------------------------------------------------------------------------------
# Compositing
# ---------------------------------------------------------------------------------------------


def segment_starts(ray_ids: Tensor, n_rays: int) -> tuple[Tensor, Tensor]:
    """(first sample index [R], sample count [R]) of each ray in a packed, ray-sorted list."""
    counts = torch.bincount(ray_ids, minlength=n_rays)
    starts = torch.cumsum(counts, 0) - counts
    return starts, counts


def exclusive_segment_cumsum(values: Tensor, ray_ids: Tensor, n_rays: int) -> Tensor:
    """Per-ray exclusive prefix sums of packed ``values`` (float64 internally to stay exact)."""
    if values.numel() == 0:
        return values
    v = values.double()
    inclusive = torch.cumsum(v, 0)
    exclusive = inclusive - v
    starts, counts = segment_starts(ray_ids, n_rays)
    base = exclusive[starts.clamp_max(len(v) - 1)]
    return (exclusive - base[ray_ids]).to(values.dtype)


def composite(
    sigmas: Tensor,
    rgbs: Tensor,
    samples: Samples,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Front-to-back compositing of packed samples.

    alpha_i = 1 - exp(-sigma_i delta_i), T_i = exp(-sum_{j<i} sigma_j delta_j), w_i = T_i alpha_i.
    Returns (rgb [R,3] = sum w c, opacity [R] = sum w, distance [R] = sum w t / opacity (0 where
    opacity is 0), weights [S]). Differentiable w.r.t. sigmas and rgbs.
    """
    R = samples.n_rays
    tau = sigmas * samples.deltas
    before = exclusive_segment_cumsum(tau, samples.ray_ids, R)
    weights = torch.exp(-before) * -torch.expm1(-tau)  # = T_i - T_{i+1}
    ray_ids = samples.ray_ids
    rgb = torch.zeros(R, rgbs.shape[-1], dtype=rgbs.dtype, device=rgbs.device).index_add(0, ray_ids, weights[:, None] * rgbs)
    opacity = torch.zeros(R, dtype=weights.dtype, device=weights.device).index_add(0, ray_ids, weights)
    dist = torch.zeros(R, dtype=weights.dtype, device=weights.device).index_add(0, ray_ids, weights * samples.t)
    dist = torch.where(opacity > 0, dist / opacity.clamp_min(1e-10), torch.zeros_like(dist))
    return rgb, opacity, dist, weights


@torch.no_grad()
def prune_terminated(sigmas: Tensor, samples: Samples, early_stop_eps: float = 1e-4, alpha_thre: float = 0.0) -> Tensor:
    """Mask of samples still visible: transmittance before them >= eps and alpha >= alpha_thre."""
    tau = sigmas * samples.deltas
    before = exclusive_segment_cumsum(tau, samples.ray_ids, samples.n_rays)
    keep = torch.exp(-before) >= early_stop_eps
    if alpha_thre > 0:
        keep &= -torch.expm1(-tau) >= alpha_thre
    return keep


@torch.no_grad()
def march_densities(density_fn, points: Tensor, samples: Samples, early_stop_eps: float, first: int = 16):
    """Densities of packed samples, evaluated front to back in rounds, stopping rays early.

    Round k evaluates the next ``first * 2^k`` samples of every ray whose transmittance is still
    >= ``early_stop_eps``; samples behind a ray's termination point are never evaluated (their
    sigma is 0 and ``evaluated`` False). ``density_fn`` may return (sigma, extra); extra rows are
    gathered the same way (zeros where not evaluated). Returns (sigma [S], extra or None, evaluated [S]).
    """
    S, R = len(samples), samples.n_rays
    starts, counts = segment_starts(samples.ray_ids, R)
    rank = torch.arange(S, device=points.device) - starts[samples.ray_ids]
    sigma = torch.zeros(S, device=points.device, dtype=points.dtype)
    evaluated = torch.zeros(S, dtype=torch.bool, device=points.device)
    extra = None
    tau = torch.zeros(R, device=points.device, dtype=torch.float64)
    alive = counts > 0
    lo, size = 0, first
    limit = math.log(1.0 / early_stop_eps) if early_stop_eps > 0 else math.inf
    max_count = int(counts.max()) if R else 0
    while lo < max_count and bool(alive.any()):
        sel = ((rank >= lo) & (rank < lo + size) & alive[samples.ray_ids]).nonzero()[:, 0]
        if sel.numel():
            out = density_fn(points[sel])
            if isinstance(out, tuple):  # (sigma, something field_fn can reuse for the kept samples)
                out, more = out
                if extra is None:
                    extra = torch.zeros((S, *more.shape[1:]), dtype=more.dtype, device=more.device)
                extra[sel] = more
            sigma[sel] = out.to(sigma.dtype)
            evaluated[sel] = True
            tau.index_add_(0, samples.ray_ids[sel], (out * samples.deltas[sel]).double())
            alive &= tau < limit
        lo += size
        size *= 2
    return sigma, extra, evaluated


# ---------------------------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------------------------

DensityFn = Callable[[Tensor], Tensor]  # unit points [S,3] -> sigma [S] (or (sigma, extra [S,...]))
FieldFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (unit points, dirs) -> (sigma [S], rgb [S,3])


@dataclass
class VolumeRender:
    rgb: Tensor  # [R,3] with background
    opacity: Tensor  # [R]
    distance: Tensor  # [R] expected distance along the ray
    depth: Tensor  # [R] expected camera depth (distance * z_scale)
    n_samples: int


def render_rays(
    field_fn: FieldFn,
    rays: Rays,
    space: SceneSpace,
    step_size: float,
    *,
    background: Tensor,
    density_fn: DensityFn | None = None,
    occupancy: Occupancy | None = None,
    near: float = 0.0,
    far: float = 1e4,
    outer_samples: int = 64,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    early_stop_eps: float = 1e-4,
    alpha_thre: float = 0.0,
) -> VolumeRender:
    """Render rays through a field: sample, prune terminated samples, evaluate, composite.

    ``density_fn`` (unit points -> sigma) enables early termination: a no-grad density pass finds
    where each ray's transmittance drops below ``early_stop_eps`` and only samples before that
    are evaluated with ``field_fn``. When ``density_fn`` returns (sigma, extra), the kept rows of
    ``extra`` are passed on as ``field_fn(points, dirs, extra)`` (e.g. cached encodings). ``background`` [3] or [R,3] fills the remaining transmittance.
    """
    samples = sample_along_rays(
        rays, space, step_size, occupancy=occupancy, near=near, far=far, outer_samples=outer_samples,
        stratified=stratified, generator=generator,
    )
    points = space.to_unit(samples.points(rays))
    extra = None
    if density_fn is not None and len(samples) and (early_stop_eps > 0 or alpha_thre > 0):
        sig, extra, evaluated = march_densities(density_fn, points, samples, early_stop_eps)
        keep = evaluated & prune_terminated(sig, samples, early_stop_eps, alpha_thre)
        samples = samples.select(keep)
        points = points[keep]
        extra = extra[keep] if extra is not None else None
    dirs = rays.directions[samples.ray_ids]
    sigmas, rgbs = field_fn(points, dirs) if extra is None else field_fn(points, dirs, extra)
    rgb, opacity, dist, _ = composite(sigmas, rgbs, samples)
    bg = background.to(rgb)
    rgb = rgb + (1.0 - opacity)[:, None] * (bg if bg.ndim == 2 else bg[None])
    return VolumeRender(rgb, opacity, dist, dist * rays.z_scale, len(samples))


@torch.no_grad()
def render_camera(
    field_fn: FieldFn,
    cameras: Cameras,
    space: SceneSpace,
    step_size: float,
    *,
    background: Tensor,
    index: int = 0,
    chunk: int = 8192,
    **kwargs,
) -> dict[str, Tensor]:
    """One camera's image: ``rgb`` [1,H,W,3], ``alpha`` and ``depth`` [1,H,W,1] (depth 0 where empty)."""
    rays = camera_rays(cameras, index)
    outs = [render_rays(field_fn, rays[i : i + chunk], space, step_size, background=background, **kwargs)
            for i in range(0, len(rays), chunk)]
    H, W = cameras.height, cameras.width
    rgb = torch.cat([o.rgb for o in outs]).reshape(1, H, W, 3)
    alpha = torch.cat([o.opacity for o in outs]).reshape(1, H, W, 1)
    depth = torch.cat([o.depth for o in outs]).reshape(1, H, W, 1)
    return {"rgb": rgb, "alpha": alpha, "depth": depth}

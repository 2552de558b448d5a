"""Levenberg-Marquardt for Gaussian splats (3DGS-LM, Hoellein et al., arXiv 2409.12892).

The 3DGS loss ``l1_weight * L1 + ssim_weight * (1 - SSIM)`` is rewritten as a sum of squares
E = ||F||^2 with per-pixel residuals (the paper's square roots):

    r_abs  = e * sqrt(l1_weight * s_l1 / (sqrt(e^2 + eps^2) + eps))    per pixel and channel, e = render - target
    r_ssim = sqrt(ssim_weight * s_ssim * max(1 - SSIM_p, 0) + s_ssim * ssim_weight * ssim_eps)   per SSIM-map pixel

so r_abs^2 = l1_weight * s_l1 * (sqrt(e^2 + eps^2) - eps): a Charbonnier (smoothed) L1 whose
residual is smooth and odd in e (the plain sqrt(|e|) of the paper has an infinite slope at 0).
s_l1 = 1 / (images * H * W * 3) and s_ssim = 1 / (images * SSIM-map pixels) make E the mean
per-image loss of a batch, comparable to the Adam loss. The SSIM map is the project's
(:func:`fieldkit.metrics.ssim_map`, 'valid' 11-tap window).

One LM iteration (``LevenbergMarquardt.step``):

1. Split the chosen training images into batches. For each batch i linearise F at x
   (``Problem.linearize``): b_i = -J_i^T F_i, M_i = diag(J_i^T J_i), and solve
   (J_i^T J_i + lambda * D_i) delta_i = b_i with Jacobi-preconditioned CG (``pcg``,
   Algorithm 1 of the paper: at most ``pcg_iterations``, stop when ||r|| <= pcg_rtol ||b||),
   D_i = M_i floored at ``diag_floor`` x max(M_i) (the floor only matters for parameters no pixel
   sees). The linearisation is released before the next batch is built: only one batch's
   Jacobian state is alive at a time.
2. Combine ``delta = (sum_i M_i)^-1 sum_i M_i delta_i`` (``weighted_mean``; the diagonal
   approximation of the exact (sum J_i^T J_i)^-1 weighting, 3DGS-LM supp. B) and clip
   ``|delta| <= max_step``.
3. Line search on the last batch's images (default; its linearisation is still alive, so the
   model terms cost one J delta) or, as the paper, a random ``line_search_fraction`` of the
   iteration's images: gamma = 1, 0.7, 0.49, ... while the subset's cost keeps decreasing (at
   most ``line_search_steps`` tries).
4. Gain ratio on that subset, rho = (E(x) - E(x + gamma delta)) / (E(x) - ||F + gamma J delta||^2)
   (Ceres / Nielsen): accept if rho > ``min_gain_ratio`` and multiply lambda by
   max(1/3, 1 - (2 rho - 1)^3), nu = 2; otherwise keep x (revert) and lambda *= nu, nu *= 2
   (``damping_update``). lambda stays in [lambda_min, lambda_max].

Jacobian products. The reference (``ReferenceProblem``) differentiates the project's torch
rasterizer stages (projection, SH colours, tile compositing) with ``torch.func``: J p with
``torch.func.jvp`` (forward mode, one forward pass per product) and J^T u with
``torch.func.vjp`` (the graph is built once per batch and reused by every product). The tile
lists (which Gaussians each tile composites, in which order) are fixed at the linearisation
point, exactly as the rasterizer would draw them there. It is exact but slow: use it for tests
and small problems; :mod:`fieldkit.optim.lm_native` has the per-(pixel, Gaussian) gradient cache.

diag(J^T J): ``diag_mode="exact"`` forms it column by column (one jvp per parameter: tiny
problems only); ``"hutchinson"`` estimates it as the mean of (J^T z)^2 over ``diag_samples``
Rademacher vectors z in residual space (unbiased, E[(J^T z)_j^2] = sum_i J_ij^2; each sample
costs one vjp); ``"auto"`` is exact up to ``exact_diag_max_params`` parameters. The native
cache computes it exactly (per-parameter accumulation over cache entries).

Memory: ``plan_batches`` sizes image batches from the free memory (``memory_budget_bytes``
and ``memory_fraction`` x available RAM or free GPU memory) and a measured per-image cost (the
first batch is linearised with one image to measure it); ``LevenbergMarquardt.last_plan`` says
what was chosen. An allocation failure while linearising halves the batch and retries; one
that persists at a single image raises :class:`LMOutOfMemory` (a plain message, no allocator
traceback), which :class:`fieldkit.methods.gs.GaussianSplatting` turns into "continue with Adam".
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, Sequence

import torch
from torch import Tensor

from fieldkit.cameras import Cameras
from fieldkit.metrics import ssim_map
from fieldkit.render.composite import composite_tiles
from fieldkit.render.projection import project_gaussians
from fieldkit.render.sh import sh_to_rgb
from fieldkit.render.tiles import TileIntersections, intersect_tiles

log = logging.getLogger("fieldkit")

SOLVER_VECTORS = 16  # parameter-sized vectors alive during an LM iteration (counted against the budget)
PARAM_ORDER = ("means", "quats", "log_scales", "opacity_logits", "sh_dc", "sh_rest")
SSIM_WINDOW = 11


@dataclass
class LMConfig:
    """3DGS-LM settings (``--gs.lm.*``). Defaults follow the paper where it applies to this CPU scale."""

    iterations: int = 5
    """LM iterations at the end of the run (3DGS-LM: 5 after 20k Adam steps). With
    ``--optimizer lm`` the last ``iterations`` training steps are LM iterations, never before
    densification has ended."""
    batch_images: int = 25
    """Images per batch (3DGS-LM: 25-70); lowered automatically when memory is short."""
    num_batches: int = 4
    """Batches per LM iteration, combined by the diag(J^T J)-weighted mean (3DGS-LM: up to 4)."""
    pcg_iterations: int = 8
    """Conjugate-gradient iterations per batch (3DGS-LM: 8)."""
    pcg_rtol: float = 0.1
    """Stop CG when ||r|| <= pcg_rtol ||b|| (the paper's ||r||^2 < 0.01 ||b||^2)."""
    initial_damping: float = 1e-2
    damping_min: float = 1e-6
    damping_max: float = 1e6
    min_gain_ratio: float = 1e-5
    """Accept a step when the gain ratio exceeds this."""
    max_step: float = 10.0
    """Clip every component of the update to [-max_step, max_step] (3DGS-LM max_grad_norm)."""
    line_search: bool = True
    line_search_images: Literal["last_batch", "random"] = "last_batch"
    """Images of the line search and gain ratio: the last batch (its linearisation is still in
    memory, so no extra Jacobian work) or a random ``line_search_fraction`` of the iteration's
    images (3DGS-LM: 30%; costs one more linearisation of those images)."""
    line_search_fraction: float = 0.3
    line_search_shrink: float = 0.7
    line_search_steps: int = 4
    l1_weight: float = 0.8
    ssim_weight: float = 0.2
    l1_eps: float = 0.01
    """Charbonnier epsilon of the L1 residual (curvature of a perfectly fitted pixel is l1_weight / (2 eps))."""
    ssim_eps: float = 1e-4
    diag_mode: Literal["auto", "exact", "hutchinson"] = "auto"
    """Reference only: how diag(J^T J) is computed (the native cache is always exact)."""
    diag_samples: int = 8
    exact_diag_max_params: int = 512
    diag_floor: float = 1e-8
    """Damping / preconditioner floor, relative to max(diag(J^T J))."""
    backend: Literal["auto", "native", "reference"] = "auto"
    """Jacobian products: native gradient cache (lm_native) or the torch.func reference; auto prefers native."""
    memory_budget_bytes: int = 0
    """Cap on the memory of one batch's Jacobian state (0: no cap besides memory_fraction)."""
    memory_fraction: float = 0.5
    """Share of the currently available memory one batch may use."""
    seed: int = 0


class LMOutOfMemory(RuntimeError):
    """Even a one-image batch does not fit; the message says how much was asked and available."""


# ---------------------------------------------------------------------------------------------
# Parameter layout: dict of tensors <-> one flat vector
# ---------------------------------------------------------------------------------------------
@dataclass
class ParamLayout:
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, params: dict[str, Tensor], names: Sequence[str] = PARAM_ORDER) -> "ParamLayout":
        names = tuple(n for n in names if n in params)
        return cls(names, tuple(params[n].shape for n in names))

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, params: dict[str, Tensor]) -> Tensor:
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: part.reshape(shape) for n, part, shape in zip(self.names, flat.split(self.sizes), self.shapes)}

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for n, size in zip(self.names, self.sizes):
            out[n] = slice(start, start + size)
            start += size
        return out


# ---------------------------------------------------------------------------------------------
# Rendering (torch reference stages; no retain_grad, so torch.func transforms can run through it)
# ---------------------------------------------------------------------------------------------
def activated(params: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(means, quats, scales, opacities, sh coefficients [N,K,3]) from the raw parameters."""
    sh = params["sh_dc"] if "sh_rest" not in params else torch.cat([params["sh_dc"], params["sh_rest"]], dim=1)
    return params["means"], params["quats"], torch.exp(params["log_scales"]), torch.sigmoid(params["opacity_logits"]), sh


def intersections(params: dict[str, Tensor], cameras: Cameras) -> TileIntersections:
    """Tile lists at the given parameters (not differentiable)."""
    with torch.no_grad():
        means, quats, scales, _, _ = activated({k: v.detach() for k, v in params.items()})
        proj = project_gaussians(means, quats, scales, cameras.world_to_cam.to(means), cameras.K.to(means), cameras.width, cameras.height)
        return intersect_tiles(proj.means2d, proj.radii, proj.depths, cameras.width, cameras.height)


def render_rgb(
    params: dict[str, Tensor], cameras: Cameras, sh_degree: int, background: Tensor, isect: TileIntersections | None = None
) -> Tensor:
    """RGB images [C,H,W,3] with the torch reference stages; ``isect`` fixes the tile lists."""
    means, quats, scales, opacities, sh = activated(params)
    C, N = len(cameras), means.shape[0]
    proj = project_gaussians(means, quats, scales, cameras.world_to_cam.to(means), cameras.K.to(means), cameras.width, cameras.height)
    if isect is None:
        isect = intersect_tiles(proj.means2d.detach(), proj.radii, proj.depths.detach(), cameras.width, cameras.height)
    dirs = means[None] - cameras.centers.to(means)[:, None, :]
    rgb = sh_to_rgb(sh_degree, dirs, sh[None].expand(C, -1, -1, -1))
    bg = background.to(means).expand(C, 3)
    image, _ = composite_tiles(proj.means2d, proj.conics, opacities.expand(C, N), rgb, isect, cameras.width, cameras.height, bg)
    return image


# ---------------------------------------------------------------------------------------------
# Residuals
# ---------------------------------------------------------------------------------------------
def residual_scales(shape: Sequence[int]) -> tuple[float, float]:
    """(s_l1, s_ssim) for images [B,H,W,3]: E = mean over images of the per-image loss."""
    B, H, W, ch = shape
    return 1.0 / (B * H * W * ch), 1.0 / (B * max(H - SSIM_WINDOW + 1, 1) * max(W - SSIM_WINDOW + 1, 1))


def l1_residual(err: Tensor, weight: float, eps: float) -> Tensor:
    """e sqrt(weight / (sqrt(e^2 + eps^2) + eps)): squares to weight (sqrt(e^2 + eps^2) - eps)."""
    return err * torch.sqrt(weight / (torch.sqrt(err * err + eps * eps) + eps))


def ssim_residual(ssim: Tensor, weight: float, eps: float) -> Tensor:
    return torch.sqrt(weight * (torch.clamp_min(1.0 - ssim, 0.0) + eps))


def residual_vector(rgb: Tensor, target: Tensor, config: LMConfig) -> Tensor:
    """F for images [B,H,W,3]: the L1 residuals then the SSIM residuals, flattened."""
    s_l1, s_ssim = residual_scales(rgb.shape)
    parts = [l1_residual(rgb - target, config.l1_weight * s_l1, config.l1_eps).reshape(-1)]
    if config.ssim_weight > 0:
        parts.append(ssim_residual(ssim_map(rgb, target), config.ssim_weight * s_ssim, config.ssim_eps).reshape(-1))
    return torch.cat(parts)


def batch_cost(rgb: Tensor, target: Tensor, config: LMConfig) -> float:
    """||F||^2 without building F's graph (the objective the gain ratio compares)."""
    with torch.no_grad():
        return float(residual_vector(rgb, target, config).square().sum())


# ---------------------------------------------------------------------------------------------
# Linear algebra pieces (shared by the reference and the native cache)
# ---------------------------------------------------------------------------------------------
@dataclass
class PCGResult:
    x: Tensor
    iterations: int
    residual_norm: float
    products: int  # applications of A


def pcg(apply_A: Callable[[Tensor], Tensor], b: Tensor, m_inv: Tensor, max_iterations: int, rtol: float) -> PCGResult:
    """Jacobi-preconditioned CG for A x = b (3DGS-LM Algorithm 1).

    x0 = M^-1 b; r0 = b - A x0; z = M^-1 r; p = z; at most ``max_iterations`` updates, stopping
    when ||r|| <= rtol ||b||. ``m_inv`` is the inverse of diag(A) (0 where A has no diagonal).
    """
    x = m_inv * b
    r = b - apply_A(x)
    products = 1
    b_norm = float(b.norm())
    z = m_inv * r
    p = z.clone()
    rz = torch.dot(r, z)
    it = 0
    while it < max_iterations and float(r.norm()) > rtol * b_norm:
        Ap = apply_A(p)
        products += 1
        pAp = torch.dot(p, Ap)
        if not torch.isfinite(pAp) or pAp <= 0:
            break
        alpha = rz / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        it += 1
        z = m_inv * r
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p if rz != 0 else z
        rz = rz_new
    return PCGResult(x, it, float(r.norm()), products)


def weighted_mean(deltas: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
    """(sum_i W_i)^-1 sum_i W_i delta_i with diagonal W_i (vectors); 0 where every weight is 0."""
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        num += w * d
        den += w
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def damping_diagonal(diag: Tensor, floor: float) -> Tensor:
    """diag(J^T J) floored at floor x its maximum (so unseen parameters are damped, not free)."""
    top = float(diag.max()) if diag.numel() else 0.0
    return diag.clamp_min(max(floor * top, 1e-30))


def gain_ratio(cost_before: float, cost_after: float, model_after: float) -> float:
    """(actual decrease) / (decrease the Gauss-Newton model predicts); -inf when the model predicts none."""
    predicted = cost_before - model_after
    actual = cost_before - cost_after
    if not predicted > 0:
        return -math.inf
    return actual / predicted


def damping_update(damping: float, nu: float, rho: float, config: LMConfig) -> tuple[float, float, bool]:
    """(new damping, new nu, accepted) for gain ratio ``rho`` (Nielsen's rule, as Ceres)."""
    if rho > config.min_gain_ratio and math.isfinite(rho):
        factor = max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
        return min(max(damping * factor, config.damping_min), config.damping_max), 2.0, True
    return min(max(damping * nu, config.damping_min), config.damping_max), 2.0 * nu, False


# ---------------------------------------------------------------------------------------------
# Problems and their linearisations
# ---------------------------------------------------------------------------------------------
class Linearization(Protocol):
    """F and J of one batch of images at the current parameters (flat vectors)."""

    cost: float  # ||F||^2
    gradient: Tensor  # J^T F (flat)
    num_images: int

    def jvp(self, p: Tensor) -> Tensor: ...

    def vjp(self, u: Tensor) -> Tensor: ...

    def diag_jtj(self) -> Tensor: ...

    def nbytes(self) -> int: ...


class Problem(Protocol):
    """What the LM driver needs from a model: images, cost, linearisation."""

    num_images: int

    def cost(self, theta: Tensor, images: Sequence[int]) -> float: ...

    def linearize(self, theta: Tensor, images: Sequence[int]) -> Linearization: ...

    def model_terms(self, theta: Tensor, images: Sequence[int], delta: Tensor) -> tuple[float, float, float]: ...


class ReferenceLinearization:
    """torch.func linearisation of F for a batch: jvp per product, one vjp graph reused."""

    def __init__(self, problem: "ReferenceProblem", theta: Tensor, images: Sequence[int]):
        self.problem = problem
        self.theta = theta.detach()
        self.num_images = len(images)
        fn = problem.residual_fn(self.theta, images)
        self._fn = fn
        residuals, self._vjp_fn = torch.func.vjp(fn, self.theta)
        self.residuals = residuals.detach()
        self.cost = float(self.residuals.square().sum())
        self.gradient = self.vjp(self.residuals)
        self._diag: Tensor | None = None

    def jvp(self, p: Tensor) -> Tensor:
        return torch.func.jvp(self._fn, (self.theta,), (p.to(self.theta),))[1].detach()

    def vjp(self, u: Tensor) -> Tensor:
        return self._vjp_fn(u.to(self.residuals))[0].detach()

    def diag_jtj(self) -> Tensor:
        if self._diag is None:
            cfg = self.problem.config
            n = self.theta.numel()
            exact = cfg.diag_mode == "exact" or (cfg.diag_mode == "auto" and n <= cfg.exact_diag_max_params)
            self._diag = self._exact_diag() if exact else self._hutchinson_diag(cfg.diag_samples)
        return self._diag

    def _exact_diag(self) -> Tensor:
        out = torch.empty_like(self.theta)
        for j in range(self.theta.numel()):
            e = torch.zeros_like(self.theta)
            e[j] = 1
            out[j] = self.jvp(e).square().sum()
        return out

    def _hutchinson_diag(self, samples: int) -> Tensor:
        acc = torch.zeros_like(self.theta)
        gen = self.problem.generator
        for _ in range(max(samples, 1)):
            z = torch.randint(0, 2, self.residuals.shape, generator=gen).to(self.residuals) * 2 - 1
            acc += self.vjp(z).square()
        return acc / max(samples, 1)

    def nbytes(self) -> int:
        return 0  # measured by the caller (autograd graph)


class ReferenceProblem:
    """Gaussians (raw parameters, flat) against posed images, differentiated with torch.func."""

    def __init__(
        self,
        layout: ParamLayout,
        cameras: Cameras,
        images: Tensor,
        sh_degree: int,
        background: Tensor,
        config: LMConfig,
        generator: torch.Generator | None = None,
    ):
        self.layout = layout
        self.cameras = cameras
        self.images = images
        self.sh_degree = sh_degree
        self.background = background
        self.config = config
        self.generator = generator or torch.Generator().manual_seed(config.seed)
        self.num_images = len(cameras)

    def cost(self, theta: Tensor, images: Sequence[int]) -> float:
        with torch.no_grad():
            cams = self.cameras[list(images)]
            rgb = render_rgb(self.layout.unflatten(theta), cams, self.sh_degree, self.background)
            return batch_cost(rgb, self.images[list(images)].to(theta), self.config)

    def linearize(self, theta: Tensor, images: Sequence[int]) -> ReferenceLinearization:
        return ReferenceLinearization(self, theta, images)

    def residual_fn(self, theta: Tensor, images: Sequence[int]) -> Callable[[Tensor], Tensor]:
        """F as a function of the flat parameters, tile lists fixed at ``theta``."""
        cameras = self.cameras[list(images)]
        targets = self.images[list(images)].to(theta)
        isect = intersections(self.layout.unflatten(theta.detach()), cameras)

        def fn(flat: Tensor) -> Tensor:
            rgb = render_rgb(self.layout.unflatten(flat), cameras, self.sh_degree, self.background, isect)
            return residual_vector(rgb, targets, self.config)

        return fn

    def model_terms(self, theta: Tensor, images: Sequence[int], delta: Tensor) -> tuple[float, float, float]:
        """(E, grad E . delta, ||J delta||^2) on ``images``, from one forward-mode pass.

        The Gauss-Newton model is E(x + g delta) ~ E + g grad E . delta + g^2 ||J delta||^2
        (= ||F + g J delta||^2 here, where grad E = 2 J^T F exactly).
        """
        out, tangent = torch.func.jvp(self.residual_fn(theta, images), (theta.detach(),), (delta.to(theta),))
        return float(out.square().sum()), 2.0 * float(torch.dot(out, tangent)), float(tangent.square().sum())


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory where the Jacobian state will live: GPU free memory, else MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate" in text or "not enough memory" in text)


@dataclass
class BatchPlan:
    images_per_batch: int
    num_batches: int
    bytes_per_image: int
    budget_bytes: int
    available_bytes: int
    reason: str

    def describe(self) -> str:
        return (
            f"LM batches: {self.num_batches} x {self.images_per_batch} images "
            f"(~{self.bytes_per_image / 2**20:.0f} MiB of Jacobian state per image, budget {self.budget_bytes / 2**20:.0f} MiB "
            f"of {self.available_bytes / 2**20:.0f} MiB available; {self.reason})"
        )


def plan_batches(
    config: LMConfig, num_images: int, bytes_per_image: int, device: torch.device | str = "cpu", fixed_bytes: int = 0
) -> BatchPlan:
    """Images per batch and batch count so one batch's Jacobian state fits the budget.

    ``fixed_bytes`` (the iteration's parameter-sized vectors) is taken off the budget first. The
    iteration keeps the requested total (batch_images x num_batches, at most every image); when a
    batch must shrink, more (equal-sized) batches are used.
    """
    available = available_memory_bytes(device)
    budget = int(config.memory_fraction * available)
    if config.memory_budget_bytes > 0:
        budget = min(budget, config.memory_budget_bytes)
    budget -= fixed_bytes
    total = min(config.batch_images * config.num_batches, num_images)
    wanted = min(config.batch_images, total)
    fit = max(budget // max(bytes_per_image, 1), 0)
    if fit < 1:
        raise LMOutOfMemory(
            f"one image needs ~{bytes_per_image / 2**20:.0f} MiB of Jacobian state but the LM budget leaves "
            f"{max(budget, 0) / 2**20:.0f} MiB after {fixed_bytes / 2**20:.0f} MiB of solver vectors "
            f"({available / 2**20:.0f} MiB available)"
        )
    per_batch = min(wanted, fit)
    reason = "as configured" if per_batch == wanted else f"memory allows {fit} images per batch"
    return BatchPlan(per_batch, math.ceil(total / per_batch), bytes_per_image, budget, available, reason)


# ---------------------------------------------------------------------------------------------
# The LM driver
# ---------------------------------------------------------------------------------------------
@dataclass
class LMStats:
    cost_before: float = 0.0
    cost_after: float = 0.0
    gain_ratio: float = 0.0
    accepted: bool = False
    gamma: float = 0.0
    damping: float = 0.0
    pcg_iterations: list[int] = field(default_factory=list)
    images_per_batch: int = 0
    num_batches: int = 0
    seconds: float = 0.0
    linearize_seconds: float = 0.0
    solve_seconds: float = 0.0
    line_search_seconds: float = 0.0
    batch_bytes: int = 0

    def as_dict(self) -> dict[str, float]:
        return {
            "lm_cost_before": self.cost_before,
            "lm_cost_after": self.cost_after,
            "lm_gain_ratio": self.gain_ratio,
            "lm_accepted": float(self.accepted),
            "lm_gamma": self.gamma,
            "lm_damping": self.damping,
            "lm_pcg_iterations": float(sum(self.pcg_iterations)),
            "lm_images_per_batch": float(self.images_per_batch),
            "lm_batches": float(self.num_batches),
            "lm_seconds": self.seconds,
            "lm_batch_bytes": float(self.batch_bytes),
        }


class LevenbergMarquardt:
    """Damped Gauss-Newton iterations on a :class:`Problem` (state: damping lambda and nu)."""

    def __init__(self, config: LMConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.damping = config.initial_damping
        self.nu = 2.0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.bytes_per_image: int | None = None
        self.last_plan: BatchPlan | None = None

    # -- one batch ----------------------------------------------------------------------------
    def solve_batch(self, lin: Linearization) -> tuple[Tensor, Tensor, PCGResult]:
        """(delta_i, diag(J_i^T J_i), CG info) for one linearised batch at the current damping."""
        diag = lin.diag_jtj()
        damp = self.damping * damping_diagonal(diag, self.config.diag_floor)
        a_diag = diag + damp
        m_inv = torch.where(a_diag > 0, 1.0 / a_diag, torch.zeros_like(a_diag))

        def apply_A(p: Tensor) -> Tensor:
            return lin.vjp(lin.jvp(p)) + damp * p

        result = pcg(apply_A, -lin.gradient, m_inv, self.config.pcg_iterations, self.config.pcg_rtol)
        return result.x, diag, result

    def _linearize_measured(self, problem: Problem, theta: Tensor, images: list[int]) -> tuple[Linearization, int]:
        before = current_rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        lin = problem.linearize(theta, images)
        used = lin.nbytes()
        if used <= 0:
            after = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else current_rss_bytes()
            used = max(after - before, 1)
        return lin, used

    def _batches(self, problem: Problem, theta: Tensor) -> tuple[list[list[int]], BatchPlan]:
        """Image batches for this iteration; the first call measures the per-image memory cost."""
        order = torch.randperm(problem.num_images, generator=self.generator).tolist()
        if self.bytes_per_image is None:
            estimate = getattr(problem, "bytes_per_image", None)
            if estimate is not None:
                used = estimate(theta, order[0])
            else:  # linearise one image and measure what stayed allocated
                try:
                    lin, used = self._linearize_measured(problem, theta, order[:1])
                except Exception as error:  # noqa: BLE001 - only allocation failures are handled
                    if not is_out_of_memory(error):
                        raise
                    raise LMOutOfMemory(f"linearising one image ran out of memory ({str(error).splitlines()[0][:200]})") from None
                del lin
            self.bytes_per_image = int(used * 1.25)  # margin for CG vectors and allocator slack
        # CG (x, r, z, p, A p, b, M^-1, damping), diag, delta, the two mean sums, line-search copies
        fixed = SOLVER_VECTORS * theta.numel() * theta.element_size()
        plan = plan_batches(self.config, problem.num_images, self.bytes_per_image, self.device, fixed)
        chosen = order[: min(self.config.batch_images * self.config.num_batches, problem.num_images)]
        # plan.num_batches batches of nearly equal size (never more than plan.images_per_batch)
        bounds = [round(i * len(chosen) / plan.num_batches) for i in range(plan.num_batches + 1)]
        return [chosen[bounds[i] : bounds[i + 1]] for i in range(plan.num_batches)], plan

    def _linearize_fitting(self, problem: Problem, theta: Tensor, images: list[int]) -> list[tuple[Linearization, list[int]]]:
        """Linearise ``images``; on an allocation failure split the batch in two and retry."""
        try:
            lin, used = self._linearize_measured(problem, theta, images)
            self.bytes_per_image = max(self.bytes_per_image or 0, int(1.25 * used / max(len(images), 1)))
            return [(lin, images)]
        except Exception as error:  # noqa: BLE001 - only allocation failures are handled
            if not is_out_of_memory(error):
                raise
            if len(images) == 1:
                raise LMOutOfMemory(f"linearising one image ran out of memory ({str(error).splitlines()[0][:200]})") from None
            log.warning("LM: out of memory with %d images per batch; splitting the batch", len(images))
            self.bytes_per_image = int((self.bytes_per_image or 1) * 2)
            half = len(images) // 2
            return [(None, images[:half]), (None, images[half:])]  # type: ignore[list-item]

    def step(self, problem: Problem, theta: Tensor) -> tuple[Tensor, LMStats]:
        """One LM iteration from flat parameters ``theta``; returns (new theta, stats)."""
        cfg = self.config
        stats = LMStats()
        start = time.perf_counter()
        batches, plan = self._batches(problem, theta)
        self.last_plan = plan
        stats.images_per_batch = plan.images_per_batch

        # Running sums of the diag(J^T J)-weighted mean: two parameter vectors, whatever the batch count.
        weighted_sum, weight_sum = torch.zeros_like(theta), torch.zeros_like(theta)
        last: tuple[Linearization, list[int]] | None = None
        pending: list[tuple[Linearization | None, list[int]]] = [(None, b) for b in batches]
        while pending:
            lin, images = pending.pop(0)
            t0 = time.perf_counter()
            if lin is None:
                parts = self._linearize_fitting(problem, theta, images)
                if parts[0][0] is None:  # split after an allocation failure
                    pending = parts + pending
                    continue
                lin = parts[0][0]
                del parts  # keep no second reference: only one batch's Jacobian state may be alive
            stats.linearize_seconds += time.perf_counter() - t0
            stats.batch_bytes = max(stats.batch_bytes, int((self.bytes_per_image or 0) * len(images)))
            t0 = time.perf_counter()
            delta, diag, info = self.solve_batch(lin)
            stats.solve_seconds += time.perf_counter() - t0
            stats.pcg_iterations.append(info.iterations)
            weighted_sum += diag * delta
            weight_sum += diag
            stats.num_batches += 1
            single = delta if stats.num_batches == 1 else None
            del delta, diag
            last = (lin, images) if not pending and cfg.line_search_images == "last_batch" else None
            del lin
        if stats.num_batches == 1:
            delta = single
        else:  # (sum_i M_i)^-1 sum_i M_i delta_i, 0 where no batch sees a parameter (= weighted_mean)
            delta = torch.where(weight_sum > 0, weighted_sum / torch.where(weight_sum > 0, weight_sum, 1.0), 0.0)
        del weighted_sum, weight_sum
        delta = delta.clamp(-cfg.max_step, cfg.max_step)
        all_images = [i for b in batches for i in b]

        t0 = time.perf_counter()
        theta_new, stats = self._line_search_and_damping(problem, theta, delta, all_images, stats, last)
        stats.line_search_seconds = time.perf_counter() - t0
        stats.seconds = time.perf_counter() - start
        return theta_new, stats

    def _line_search_and_damping(
        self, problem: Problem, theta: Tensor, delta: Tensor, images: list[int], stats: LMStats,
        last: tuple[Linearization, list[int]] | None = None,
    ):
        cfg = self.config
        if last is not None:  # the last batch, still linearised
            lin, subset = last
            last = None
            cost0 = lin.cost
            slope = 2.0 * float(torch.dot(lin.gradient, delta.to(lin.gradient)))
            curvature = float(lin.jvp(delta).square().sum())
            del lin
        else:
            count = max(1, round(cfg.line_search_fraction * len(images)))
            if count >= len(images):
                subset = list(images)
            else:
                pick = torch.randperm(len(images), generator=self.generator)[:count].tolist()
                subset = [images[i] for i in sorted(pick)]
            cost0, slope, curvature = problem.model_terms(theta, subset, delta)

        def model(gamma: float) -> float:
            return cost0 + gamma * slope + gamma * gamma * curvature

        gamma = 1.0
        best_gamma, best_cost = gamma, problem.cost(theta + gamma * delta, subset)
        if cfg.line_search:
            for _ in range(cfg.line_search_steps - 1):
                gamma *= cfg.line_search_shrink
                value = problem.cost(theta + gamma * delta, subset)
                if value < best_cost:
                    best_gamma, best_cost = gamma, value
                else:
                    break
        rho = gain_ratio(cost0, best_cost, model(best_gamma))
        self.damping, self.nu, accepted = damping_update(self.damping, self.nu, rho, cfg)
        stats.cost_before, stats.gain_ratio, stats.accepted, stats.damping = cost0, rho, accepted, self.damping
        stats.gamma = best_gamma if accepted else 0.0
        stats.cost_after = best_cost if accepted else cost0
        return (theta + best_gamma * delta if accepted else theta), stats


def make_problem(
    params: dict[str, Tensor],
    cameras: Cameras,
    images: Tensor,
    sh_degree: int,
    background: Tensor,
    config: LMConfig,
    generator: torch.Generator | None = None,
) -> tuple[ParamLayout, Problem, str]:
    """(layout, problem, backend name) for ``config.backend``; auto prefers the native cache.

    The native cache has a CPU and a CUDA build, picked by the parameters' device. When auto
    cannot use it, the fallback to the torch.func reference is logged once per reason.
    """
    layout = ParamLayout.of(params)
    device = params["means"].device
    if config.backend in ("auto", "native"):
        try:
            if device.type not in ("cpu", "cuda"):
                raise RuntimeError(f"the native LM gradient cache has CPU and CUDA builds only, not {device.type}")
            from fieldkit.optim import lm_native

            if device.type == "cuda" and config.backend == "auto" and not lm_native.CUDA_CACHE_VERIFIED:
                raise RuntimeError("its CUDA build has not yet been run on a GPU (parity tests pending); "
                                   "--gs.lm.backend native uses it anyway")
            problem = lm_native.NativeProblem(layout, cameras, images, sh_degree, background, config, device=device)
            return layout, problem, "native"
        except (ImportError, RuntimeError, AttributeError) as error:
            if config.backend == "native":
                raise RuntimeError(f"LM native cache unavailable: {error}") from error
            message = f"LM: native gradient cache unavailable on {device.type} ({error}); using the torch.func reference"
            if message not in _fallback_warned:
                _fallback_warned.add(message)
                log.warning("%s", message)
    return layout, ReferenceProblem(layout, cameras, images, sh_degree, background, config, generator), "reference"


_fallback_warned: set[str] = set()


# ---------------------------------------------------------------------------------------------
# The LM phase of Gaussian splatting training (``--optimizer lm``)
# ---------------------------------------------------------------------------------------------
class SplatLMPhase:
    """Runs the last ``config.iterations`` training steps of a GaussianSplatting method as LM iterations.

    LM starts at ``max(max_steps - iterations, densify_stop)``: never while densification still
    edits the Gaussians. Parameters are updated in place (the Adam optimizer keeps its
    ``Parameter`` objects). When one image's Jacobian state does not fit in memory the phase
    says so once and the method continues with Adam.
    """

    def __init__(self, config: LMConfig, max_steps: int, densify_stop: int, device: torch.device | str = "cpu"):
        self.config = config
        self.start_step = max(max_steps - config.iterations, densify_stop)
        self.solver = LevenbergMarquardt(config, device)
        self.disabled_reason: str | None = None
        self.backend: str | None = None
        if self.start_step >= max_steps and config.iterations > 0:
            log.warning(
                "LM: densification runs until step %d of %d, so no LM iteration fits; raise --max-steps", densify_stop, max_steps
            )

    def active(self, step: int) -> bool:
        return self.disabled_reason is None and step >= self.start_step

    def train_step(self, method, step: int) -> dict[str, float] | None:
        """One LM iteration on ``method.params``; None when LM is unavailable (caller uses Adam)."""
        params = method.params
        sh_degree = method.active_sh_degree(step)
        try:
            layout, problem, backend = make_problem(
                {k: v.detach() for k, v in params.items()}, method.train_cameras, method.train_images, sh_degree,
                method.background, self.config, self.solver.generator,
            )
            if self.backend is None:
                log.info("LM: from step %d, %s Jacobian products", step, backend)
            self.backend = backend
            theta = layout.flatten(params)
            theta_new, stats = self.solver.step(problem, theta)
        except LMOutOfMemory as error:
            self.disabled_reason = str(error)
            log.warning("LM: %s; continuing with Adam", error)
            return None
        if self.solver.last_plan is not None and step == self.start_step:
            log.info("%s", self.solver.last_plan.describe())
        with torch.no_grad():
            for name, value in layout.unflatten(theta_new).items():
                params[name].copy_(value)
        out = {"loss": stats.cost_after, **stats.as_dict()}
        return out

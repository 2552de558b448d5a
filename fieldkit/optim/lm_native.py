"""Native 3DGS-LM gradient cache (CPU and CUDA): J p, J^T u and diag(J^T J) without re-marching rays.

The LM Jacobian of a batch factors as J = D * J_img * J_q:

- J_q: the per-(camera, Gaussian) screen-space quantities q = (2D mean, conic, opacity, RGB),
  9 per *visible pair* (a Gaussian that the projection keeps in a camera), as functions of the
  raw parameters. Held as explicit per-pair blocks (:class:`PairJacobian`): geometry from the
  native rasterizer's projection VJP, colour w.r.t. position from the analytic SH basis
  gradient, SH columns as basis values x clamp mask, the sigmoid slope for opacity. J_q p and
  J_q^T g are small einsums: O(pairs), no pixels.
- J_img: pixel colours w.r.t. q, the expensive part. The extension ``fieldkit_lm_cpu``
  (``kernels/lm/lm_cache_cpu.cpp``; for CUDA tensors ``fieldkit_lm_cuda``,
  ``kernels/lm/lm_cache_cuda.cu``, same functions, same cache layout entry for entry) walks every
  ray once after the forward and caches, per blended (pixel, pair): the colour weight alpha T,
  alpha (0 where the 0.999 clamp is active) and dC/dalpha (3), i.e. 3DGS-LM's gradient cache,
  stored sorted by pair, plus each pixel's entry list. J_img^T u is parallel over pairs, J_img p
  parallel over pairs then pixels, both without atomics; the 2D derivatives of alpha are
  recomputed from the pixel position.
- D: per pixel, d r / d colour: the L1 residuals' elementwise slope, and for SSIM the paper's
  approximation that keeps rays independent: the SSIM residual centred on pixel p depends only
  on p's colour, with slope G_p / (2 r_p) where G_p is the exact gradient of the summed
  SSIM term w.r.t. p's colour. The right-hand side b = -(1/2) grad E is exact (autograd
  through the SSIM); only the curvature model uses the approximation.

diag(J^T J) is exact for this J: the extension accumulates per pair the 9x9 block
H = sum_p (dC_p/dq)^T (D_p^T D_p) (dC_p/dq) and :meth:`PairJacobian.diag` forms
diag(J_q^T H J_q) per raw parameter.

Memory per batch (float32 parameters): 28 bytes per cache entry (pixel, weight, alpha,
dC/dalpha x3, the pixel's entry index) + 12 transient in J p, ~100 bytes per pixel, ~600 bytes
per visible pair (q, J_q blocks, Hessian blocks); ``NativeProblem.bytes_per_image`` counts one
image's entries with a forward pass so the LM driver can size batches before building anything.

Devices: everything follows the device of the parameters. CPU tensors use ``fieldkit_lm_cpu`` and
the native CPU rasterizer (projection, its VJP, tile lists); CUDA tensors use ``fieldkit_lm_cuda``
and the CUDA rasterizer (:mod:`fieldkit.render.backends.cuda`). The two cache builds produce the
same entries in the same order; the CUDA build needs a GPU, nvcc and a CUDA build of torch.

Build: compiled on first use with :func:`torch.utils.cpp_extension.load` (like the native
rasterizer, :mod:`fieldkit.render.backends.cpu`), cached under ``$FIELDKIT_CACHE_DIR`` in a
folder keyed by a hash of the sources, torch and Python versions and flags.
``FIELDKIT_NO_NATIVE=1`` disables it (the LM then uses the torch.func reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Sequence

import torch
from torch import Tensor

from fieldkit.cameras import Cameras
from fieldkit.native_build import NativeExtension
from fieldkit.metrics import ssim_map
from fieldkit.optim.levenberg_marquardt import (
    SSIM_WINDOW,
    LMConfig,
    ParamLayout,
    activated,
    l1_residual,
    residual_scales,
    ssim_residual,
)
from fieldkit.render.projection import project_gaussians
from fieldkit.render.sh import sh_basis, sh_to_rgb

EXTENSION_NAME = "fieldkit_lm_cpu"
CUDA_EXTENSION_NAME = "fieldkit_lm_cuda"
# The CUDA build is compile-checked only; backend "auto" uses it once tests/test_lm_cuda.py has passed on a GPU
# (set this to True in that change). Until then auto keeps the reference on CUDA and "native" opts in.
CUDA_CACHE_VERIFIED = False
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-Wno-psabi"]
LDFLAGS = ["-fopenmp"]
# No FMA contraction on either side, so per entry the CUDA build computes the CPU build's values.
CUDA_CFLAGS = ["-O3"]
CUDA_NVCC_FLAGS = ["-O3", "--fmad=false"]
_HEADERS = ("include/fieldkit/common.h", "include/fieldkit/composite.h", "include/fieldkit/lm_cache.h")
_SOURCES = ("lm/lm_cache_cpu.cpp",)
_CUDA_SOURCES = ("lm/lm_bindings_cuda.cpp", "lm/lm_cache_cuda.cu")
_CUDA_HEADERS = ("lm/lm_cache_cuda.cuh", "bindings/cuda_glue.h", *_HEADERS)
PAIR_CHUNK = 1 << 15  # pairs per chunk of the J_q products (bounds their temporaries)
BYTES_PER_ENTRY = 44  # int32 pixel + 5 float32 + int32 pixel->entry, + 12 for the J p buffer
BYTES_PER_PIXEL = 100
BYTES_PER_PAIR = 600  # q, J_q blocks, Hessian blocks (transient)

_EXTENSION = NativeExtension(EXTENSION_NAME, _SOURCES, _HEADERS, cflags=CFLAGS, ldflags=LDFLAGS,
                             what="LM kernel sources (kernels/lm)")


def _cuda_requirements() -> str | None:
    from fieldkit.render.backends import cuda as cuda_backend

    return cuda_backend._requirements()  # CUDA build of torch, a device, nvcc


def _cuda_key_parts() -> list[str]:
    from fieldkit.render.backends import cuda as cuda_backend

    return cuda_backend._key_parts()  # torch's CUDA version, nvcc, compute capability, arch list


_CUDA_EXTENSION = NativeExtension(CUDA_EXTENSION_NAME, _CUDA_SOURCES, _CUDA_HEADERS, cflags=CUDA_CFLAGS,
                                  cuda_cflags=CUDA_NVCC_FLAGS, include_dirs=("include", "lm"),
                                  what="LM CUDA kernel sources (kernels/lm)", requirements=_cuda_requirements,
                                  key_parts=_cuda_key_parts)


def _is_cuda(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def extension(device: torch.device | str | None = None) -> ModuleType:
    """The compiled extension for ``device`` (CPU by default; CUDA devices get ``fieldkit_lm_cuda``),
    built on first call; raises RuntimeError with the reason if unavailable."""
    return (_CUDA_EXTENSION if _is_cuda(device) else _EXTENSION).module()


def is_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    return (_CUDA_EXTENSION if _is_cuda(device) else _EXTENSION).is_available()


def rasterizer(device: torch.device | str | None = None):
    """The native rasterizer backend module for ``device`` (projection, its VJP, tile lists):
    :mod:`fieldkit.render.backends.cpu` or :mod:`fieldkit.render.backends.cuda`."""
    if _is_cuda(device):
        from fieldkit.render.backends import cuda as backend
    else:
        from fieldkit.render.backends import cpu as backend
    return backend


# ---------------------------------------------------------------------------------------------
# Visible pairs and their screen-space quantities q [V, 9]
# ---------------------------------------------------------------------------------------------
@dataclass
class Pairs:
    """Visible (camera, Gaussian) pairs, grouped by camera; ``bounds[c]:bounds[c+1]`` is camera c."""

    camera: Tensor  # [V] int64
    gaussian: Tensor  # [V] int64
    bounds: list[int]
    flat_to_pair: Tensor  # [C*N] int64, -1 when not visible

    @property
    def count(self) -> int:
        return int(self.gaussian.numel())


def visible_pairs(params: dict[str, Tensor], cameras: Cameras, sh_degree: int | None = None):
    """(pairs, tile lists over pair ids, q [V,9] or None) at ``params``.

    No gradients; native projection and binning on the parameters' device (CPU or CUDA). q (2D
    mean, conic, opacity, RGB per visible pair) is computed when ``sh_degree`` is given.
    """
    device = params["means"].device
    rast = rasterizer(device).extension()
    with torch.no_grad():
        means, quats, scales, _, _ = activated({k: v.detach() for k, v in params.items()})
        dtype = means.dtype
        m2d, conics, depths, radii = rast.project_forward(
            means.contiguous(), quats.contiguous(), scales.contiguous(),
            cameras.world_to_cam.to(device=device, dtype=dtype).contiguous(),
            cameras.K.to(device=device, dtype=dtype).contiguous(), cameras.width, cameras.height, 0.3, 0.01, 1e10,
        )
        isect = rasterizer(device).backend().intersect(m2d, radii, depths, cameras.width, cameras.height)
    visible = (radii[..., 0] > 0).flatten()
    C, N = depths.shape
    flat = torch.nonzero(visible).flatten()  # camera-major: grouped by camera
    flat_to_pair = torch.full((C * N,), -1, dtype=torch.int64, device=device)
    flat_to_pair[flat] = torch.arange(flat.numel(), device=device)
    camera, gaussian = flat // N, flat % N
    counts = torch.bincount(camera, minlength=C)
    bounds = [0] + torch.cumsum(counts, 0).tolist()
    isect.gaussian_ids = flat_to_pair[isect.gaussian_ids]
    pairs = Pairs(camera, gaussian, bounds, flat_to_pair)
    if sh_degree is None:
        return pairs, isect, None
    with torch.no_grad():
        _, _, _, opacities, sh = activated({k: v.detach() for k, v in params.items()})
        q = torch.empty(flat.numel(), 9, dtype=dtype, device=device)
        q[:, 0:2] = m2d.reshape(-1, 2)[flat]
        q[:, 2:5] = conics.reshape(-1, 3)[flat]
        q[:, 5] = opacities[gaussian]
        centers = cameras.centers.to(device=device, dtype=dtype)
        for lo in range(0, flat.numel(), PAIR_CHUNK):
            hi = min(lo + PAIR_CHUNK, flat.numel())
            g = gaussian[lo:hi]
            q[lo:hi, 6:9] = sh_to_rgb(sh_degree, means[g] - centers[camera[lo:hi]], sh[g])
    return pairs, isect, q


def pair_quantities(params: dict[str, Tensor], cameras: Cameras, pairs: Pairs, sh_degree: int) -> Tensor:
    """q [V, 9] = (2D mean, conic a b c, opacity, RGB) of every visible pair (differentiable)."""
    means, quats, scales, opacities, sh = activated(params)
    out = []
    w2c, K, centers = cameras.world_to_cam.to(means), cameras.K.to(means), cameras.centers.to(means)
    for c in range(len(cameras)):
        idx = pairs.gaussian[pairs.bounds[c] : pairs.bounds[c + 1]]
        if idx.numel() == 0:
            continue
        proj = project_gaussians(means[idx], quats[idx], scales[idx], w2c[c : c + 1], K[c : c + 1], cameras.width, cameras.height)
        rgb = sh_to_rgb(sh_degree, means[idx] - centers[c], sh[idx])
        out.append(torch.cat([proj.means2d[0], proj.conics[0], opacities[idx, None], rgb], dim=-1))
    if not out:
        return means.new_zeros(0, 9)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# J_q as explicit per-pair blocks
# ---------------------------------------------------------------------------------------------


@dataclass
class PairJacobian:
    """d q / d raw parameters for every visible pair, as small dense blocks.

    q = (mean2d x y, conic a b c, opacity, r g b). Nonzero blocks: geometry [V,5,10]
    (mean2d and conic w.r.t. means, quats, log-scales), colour w.r.t. means [V,3,3], colour
    w.r.t. SH (basis [V,L] times the clamp mask [V,3]) and opacity w.r.t. its logit ([N]).
    """

    gaussian: Tensor  # [V]
    geometry: Tensor  # [V,5,10]
    color_means: Tensor  # [V,3,3]
    basis: Tensor  # [V,L]
    mask: Tensor  # [V,3]
    opacity_slope: Tensor  # [N]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.geometry, self.color_means, self.basis, self.mask))

    def jvp(self, p: dict[str, Tensor]) -> Tensor:
        """dq [V,9] for a parameter tangent ``p`` (dict of raw-parameter tensors)."""
        g = self.gaussian
        V, L = g.numel(), self.basis.shape[1]
        geo = torch.cat([p["means"], p["quats"], p["log_scales"]], dim=1)
        sh = torch.cat([p["sh_dc"], p["sh_rest"]], dim=1) if "sh_rest" in p else p["sh_dc"]
        out = torch.empty(V, 9, dtype=geo.dtype, device=geo.device)
        for lo in range(0, V, PAIR_CHUNK):
            hi = min(lo + PAIR_CHUNK, V)
            gi = g[lo:hi]
            out[lo:hi, :5] = torch.einsum("vqj,vj->vq", self.geometry[lo:hi], geo[gi])
            out[lo:hi, 6:] = torch.einsum("vcj,vj->vc", self.color_means[lo:hi], p["means"][gi]) + self.mask[lo:hi] * torch.einsum(
                "vl,vlc->vc", self.basis[lo:hi], sh[gi, :L]
            )
        out[:, 5] = (self.opacity_slope * p["opacity_logits"])[g]
        return out

    def vjp(self, gq: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
        """Parameter cotangents (dict shaped like ``like``) for q cotangents ``gq`` [V,9]."""
        g = self.gaussian
        V, L = g.numel(), self.basis.shape[1]
        N = like["means"].shape[0]
        geo = torch.zeros(N, 10, dtype=gq.dtype, device=gq.device)
        sh = torch.zeros(N, L, 3, dtype=gq.dtype, device=gq.device)
        for lo in range(0, V, PAIR_CHUNK):
            hi = min(lo + PAIR_CHUNK, V)
            gi = g[lo:hi]
            part = torch.einsum("vqj,vq->vj", self.geometry[lo:hi], gq[lo:hi, :5])
            part[:, :3] += torch.einsum("vcj,vc->vj", self.color_means[lo:hi], gq[lo:hi, 6:])
            geo.index_add_(0, gi, part)
            sh.index_add_(0, gi, self.basis[lo:hi, :, None] * (self.mask[lo:hi] * gq[lo:hi, 6:])[:, None, :])
        out = {k: torch.zeros_like(v) for k, v in like.items()}
        out["means"], out["quats"], out["log_scales"] = geo[:, :3], geo[:, 3:7], geo[:, 7:]
        opacity = torch.zeros(N, dtype=gq.dtype, device=gq.device).index_add_(0, g, gq[:, 5])
        out["opacity_logits"] = opacity * self.opacity_slope
        out["sh_dc"] = sh[:, :1].clone()
        if "sh_rest" in out and L > 1:
            out["sh_rest"][:, : L - 1] = sh[:, 1:]
        return out

    def diag(self, H: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
        """diag(J_q^T H J_q) per raw parameter, H = packed per-pair 9x9 blocks [V,45]."""
        g = self.gaussian
        V, L = g.numel(), self.basis.shape[1]
        N = like["means"].shape[0]
        rows, cols = torch.triu_indices(9, 9, device=H.device)
        geo = torch.zeros(N, 10, dtype=H.dtype, device=H.device)
        sh = torch.zeros(N, L, 3, dtype=H.dtype, device=H.device)
        color_idx = [_packed(6 + c, 6 + c) for c in range(3)]
        for lo in range(0, V, PAIR_CHUNK):
            hi = min(lo + PAIR_CHUNK, V)
            full = torch.zeros(hi - lo, 9, 9, dtype=H.dtype, device=H.device)
            full[:, rows, cols] = H[lo:hi]
            full[:, cols, rows] = H[lo:hi]
            P = torch.zeros(hi - lo, 9, 10, dtype=H.dtype, device=H.device)
            P[:, :5] = self.geometry[lo:hi]
            P[:, 6:, :3] = self.color_means[lo:hi]
            geo.index_add_(0, g[lo:hi], torch.einsum("vqj,vqr,vrj->vj", P, full, P))
            color = H[lo:hi][:, color_idx] * self.mask[lo:hi]  # [v,3]
            sh.index_add_(0, g[lo:hi], self.basis[lo:hi, :, None] ** 2 * color[:, None, :])
        out = {k: torch.zeros_like(v) for k, v in like.items()}
        out["means"], out["quats"], out["log_scales"] = geo[:, :3], geo[:, 3:7], geo[:, 7:]
        opacity = torch.zeros(N, dtype=H.dtype, device=H.device).index_add_(0, g, H[:, _packed(5, 5)])
        out["opacity_logits"] = opacity * self.opacity_slope**2
        out["sh_dc"] = sh[:, :1].clone()
        if "sh_rest" in out and L > 1:
            out["sh_rest"][:, : L - 1] = sh[:, 1:]
        return out


def sh_basis_gradient(degree: int, dirs: Tensor) -> Tensor:
    """d Y_l / d (x, y, z) of :func:`fieldkit.render.sh.sh_basis` at unit ``dirs`` [..., 3]: [..., L, 3].

    The basis polynomials differentiated term by term (the normalisation is chained by the caller).
    """
    from fieldkit.render.sh import C1, C2, C3

    x, y, z = dirs.unbind(-1)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows = [(zero, zero, zero)]
    if degree >= 1:
        rows += [(zero, -C1 * one, zero), (zero, zero, C1 * one), (-C1 * one, zero, zero)]
    if degree >= 2:
        rows += [
            (C2[0] * y, C2[0] * x, zero),
            (zero, C2[1] * z, C2[1] * y),
            (-2 * C2[2] * x, -2 * C2[2] * y, 4 * C2[2] * z),
            (C2[3] * z, zero, C2[3] * x),
            (2 * C2[4] * x, -2 * C2[4] * y, zero),
        ]
    if degree >= 3:
        xx, yy, zz = x * x, y * y, z * z
        rows += [
            (C3[0] * 6 * x * y, C3[0] * (3 * xx - 3 * yy), zero),
            (C3[1] * y * z, C3[1] * x * z, C3[1] * x * y),
            (-2 * C3[2] * x * y, C3[2] * (4 * zz - xx - 3 * yy), 8 * C3[2] * y * z),
            (-6 * C3[3] * x * z, -6 * C3[3] * y * z, C3[3] * (6 * zz - 3 * xx - 3 * yy)),
            (C3[4] * (4 * zz - 3 * xx - yy), -2 * C3[4] * x * y, 8 * C3[4] * x * z),
            (2 * C3[5] * x * z, -2 * C3[5] * y * z, C3[5] * (xx - yy)),
            (C3[6] * (3 * xx - 3 * yy), -6 * C3[6] * x * y, zero),
        ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def pair_jacobian(params: dict[str, Tensor], cameras: Cameras, pairs: Pairs, sh_degree: int) -> PairJacobian:
    """Per-pair blocks of d q / d parameters at ``params``.

    Geometry: the native rasterizer's projection VJP (``project_backward`` of ``fieldkit_cpu`` or,
    for CUDA parameters, ``fieldkit_cuda``), called per camera on the visible Gaussians repeated 5
    times with one-hot cotangents (one per output row), so each pair gets its own rows (one
    camera: no two rows accumulate into the same output, so the CUDA build's atomics are exact).
    Colour w.r.t. means: three forward-mode products of the SH evaluation; w.r.t. SH: the basis values.
    """
    device = params["means"].device
    rast = rasterizer(device).extension()
    with torch.no_grad():
        means, quats, scales, opacities, sh = activated({k: v.detach() for k, v in params.items()})
        dtype = means.dtype
        V, L = pairs.count, (sh_degree + 1) ** 2
        like = dict(dtype=dtype, device=device)
        geometry = torch.empty(V, 5, 10, **like)
        color_means = torch.empty(V, 3, 3, **like)
        basis = torch.empty(V, L, **like)
        mask = torch.empty(V, 3, **like)
        w2c, K, centers = (t.to(**like) for t in (cameras.world_to_cam, cameras.K, cameras.centers))
        eye = torch.eye(5, **like)
        for c in range(len(cameras)):
            lo, hi = pairs.bounds[c], pairs.bounds[c + 1]
            n = hi - lo
            if n == 0:
                continue
            idx = pairs.gaussian[lo:hi]
            m5, q5, s5 = (t[idx].repeat(5, 1).contiguous() for t in (means, quats, scales))
            cam_w2c, cam_K = w2c[c : c + 1].contiguous(), K[c : c + 1].contiguous()
            _, _, _, radii = rast.project_forward(m5, q5, s5, cam_w2c, cam_K, cameras.width, cameras.height, 0.3, 0.01, 1e10)
            cot = eye.repeat_interleave(n, dim=0)[None]  # [1, 5n, 5]: block r has cotangent e_r
            v_means, v_quats, v_scales, _ = rast.project_backward(
                m5, q5, s5, cam_w2c, cam_K, cameras.width, cameras.height, 0.3, radii,
                cot[..., :2].contiguous(), cot[..., 2:].contiguous(), torch.zeros(1, 5 * n, **like), False,
            )
            geometry[lo:hi, :, 0:3] = v_means.reshape(5, n, 3).transpose(0, 1)
            geometry[lo:hi, :, 3:7] = v_quats.reshape(5, n, 4).transpose(0, 1)
            geometry[lo:hi, :, 7:10] = (v_scales.reshape(5, n, 3) * scales[idx]).transpose(0, 1)  # d/d log s = s d/ds

            coeffs = sh[idx, :L]
            offset = means[idx] - centers[c]
            norm = offset.norm(dim=-1, keepdim=True)
            dirs = offset / norm.clamp_min(1e-12)
            basis[lo:hi] = sh_basis(sh_degree, dirs)
            raw = (basis[lo:hi, :, None] * coeffs).sum(1) + 0.5
            mask[lo:hi] = (raw >= 0).to(dtype)
            # d rgb / d mean = mask * sum_l coeff_l (grad Y_l)^T (I - d d^T) / |offset|  (normalisation chained)
            d_rgb_d_dir = torch.einsum("vlc,vlk->vck", coeffs, sh_basis_gradient(sh_degree, dirs))  # [n,3,3]
            projector = (torch.eye(3, **like) - dirs[:, :, None] * dirs[:, None, :]) / norm.clamp_min(1e-12)[..., None]
            color_means[lo:hi] = mask[lo:hi, :, None] * (d_rgb_d_dir @ projector)
        slope = opacities * (1 - opacities)
    return PairJacobian(pairs.gaussian, geometry, color_means, basis, mask, slope)


# ---------------------------------------------------------------------------------------------
# Problem and linearisation
# ---------------------------------------------------------------------------------------------
class NativeLinearization:
    """Gradient cache of one batch at ``theta``: J p, J^T u, diag(J^T J) for the LM driver."""

    def __init__(self, problem: "NativeProblem", theta: Tensor, images: Sequence[int]):
        self.problem = problem
        self.theta = theta.detach()
        self.num_images = len(images)
        ext = self._ext = extension(self.theta.device)
        cfg = problem.config
        cams = problem.cameras[list(images)]
        self.cameras = cams
        self.W, self.H = cams.width, cams.height
        targets = problem.images[list(images)].to(theta)
        params = problem.layout.unflatten(self.theta)
        self._like = params
        self.pairs, isect, q = visible_pairs(params, cams, problem.sh_degree)
        self.jq = pair_jacobian(params, cams, self.pairs, problem.sh_degree)
        q = q.contiguous()
        self.m2d, self.conic, self.opac = q[:, 0:2].contiguous(), q[:, 2:5].contiguous(), q[:, 5].contiguous()
        bg = problem.background.to(theta).expand(len(cams), 3).contiguous()
        out = ext.build_cache(
            self.m2d, self.conic, self.opac, q[:, 6:9].contiguous(), bg, isect.gaussian_ids.contiguous(),
            isect.tile_offsets.contiguous(), self.W, self.H, isect.tiles_x, isect.tiles_y, isect.tile_size, True,
        )
        self.image = out[0]
        self.entries = int(out[1])
        self.pair_offsets, self.e_pix, self.e_w, self.e_a, self.e_dc, self.pixel_offsets, self.pix_entries = out[2:]

        # Residual layer: values, slopes and the exact half-gradient w.r.t. the image.
        s_l1, s_ssim = residual_scales(self.image.shape)
        image = self.image.detach().requires_grad_(True)
        err = image - targets
        r1 = l1_residual(err, cfg.l1_weight * s_l1, cfg.l1_eps)
        (self.d1,) = torch.autograd.grad(r1.sum(), image)  # elementwise slope d r1 / d colour
        r1 = r1.detach()
        half_grad = self.d1 * r1
        parts = [r1.reshape(-1)]
        self.ssim_row = None
        if cfg.ssim_weight > 0:
            rs = ssim_residual(ssim_map(image, targets), cfg.ssim_weight * s_ssim, cfg.ssim_eps)
            (G,) = torch.autograd.grad(rs.square().sum(), image)  # exact gradient of the SSIM term
            rs = rs.detach()
            half_grad = half_grad + 0.5 * G
            r = SSIM_WINDOW // 2
            row = torch.zeros_like(G)
            row[:, r : r + rs.shape[1], r : r + rs.shape[2]] = G[:, r : r + rs.shape[1], r : r + rs.shape[2]] / (2 * rs[..., None])
            self.ssim_row = row  # d r_ssim(centred at p) / d colour_p, 0 off the SSIM map
            self._ssim_shape = rs.shape
            parts.append(rs.reshape(-1))
        self.residuals = torch.cat(parts)
        self.cost = float(self.residuals.square().sum())
        self.gradient = self._pull(half_grad)
        self._diag: Tensor | None = None

    # image-space products -------------------------------------------------------------------
    def jvp_image(self, p: Tensor) -> Tensor:
        dq = self.jq.jvp(self.problem.layout.unflatten(p.to(self.theta))).contiguous()
        d_img = self._ext.cache_jvp(self.m2d, self.conic, self.opac, self.pair_offsets, self.e_pix, self.e_w, self.e_a,
                                    self.e_dc, self.pixel_offsets, self.pix_entries, dq, self.W, self.H)
        return d_img.reshape(self.image.shape)

    def _pull(self, u_img: Tensor) -> Tensor:
        gq = self._ext.cache_vjp(self.m2d, self.conic, self.opac, self.pair_offsets, self.e_pix, self.e_w, self.e_a,
                                 self.e_dc, u_img.reshape(-1, 3).contiguous().to(self.theta), self.W, self.H)
        return self.problem.layout.flatten(self.jq.vjp(gq, self._like))

    # residual-space products (the LM driver's interface) ------------------------------------------
    def jvp(self, p: Tensor) -> Tensor:
        d_img = self.jvp_image(p)
        parts = [(self.d1 * d_img).reshape(-1)]
        if self.ssim_row is not None:
            r = SSIM_WINDOW // 2
            hs, ws = self._ssim_shape[1], self._ssim_shape[2]
            parts.append((self.ssim_row * d_img).sum(-1)[:, r : r + hs, r : r + ws].reshape(-1))
        return torch.cat(parts)

    def vjp(self, u: Tensor) -> Tensor:
        n1 = self.d1.numel()
        u_img = self.d1 * u[:n1].reshape(self.image.shape)
        if self.ssim_row is not None:
            r = SSIM_WINDOW // 2
            us = torch.zeros(self.image.shape[:-1], dtype=u.dtype, device=u.device)
            us[:, r : r + self._ssim_shape[1], r : r + self._ssim_shape[2]] = u[n1:].reshape(self._ssim_shape)
            u_img = u_img + self.ssim_row * us[..., None]
        return self._pull(u_img)

    def diag_jtj(self) -> Tensor:
        if self._diag is None:
            H = self._ext.hessian_blocks(self.m2d, self.conic, self.opac, self.pair_offsets, self.e_pix, self.e_w,
                                         self.e_a, self.e_dc, self._pixel_weights(), self.W, self.H)
            self._diag = self.problem.layout.flatten(self.jq.diag(H, self._like))
        return self._diag

    def _pixel_weights(self) -> Tensor:
        """D_p^T D_p per pixel as (w00, w01, w02, w11, w12, w22)."""
        d = self.d1.reshape(-1, 3)
        W = torch.zeros(d.shape[0], 6, dtype=d.dtype, device=d.device)
        W[:, 0], W[:, 3], W[:, 5] = d[:, 0] ** 2, d[:, 1] ** 2, d[:, 2] ** 2
        if self.ssim_row is not None:
            s = self.ssim_row.reshape(-1, 3)
            W[:, 0] += s[:, 0] * s[:, 0]
            W[:, 1] += s[:, 0] * s[:, 1]
            W[:, 2] += s[:, 0] * s[:, 2]
            W[:, 3] += s[:, 1] * s[:, 1]
            W[:, 4] += s[:, 1] * s[:, 2]
            W[:, 5] += s[:, 2] * s[:, 2]
        return W.contiguous()

    def nbytes(self) -> int:
        cache = sum(t.numel() * t.element_size() for t in (self.e_pix, self.e_w, self.e_a, self.e_dc, self.pix_entries))
        pixels = self.image.numel() * self.image.element_size() * 4 + self.pixel_offsets.numel() * 8
        return int(cache + pixels + self.jq.nbytes() + 9 * 4 * self.pairs.count)


def _packed(r: int, c: int) -> int:
    """Index of (r, c), r <= c, in the row-major upper triangle of a 9x9 matrix."""
    return r * 9 - r * (r - 1) // 2 + (c - r)


class NativeProblem:
    """Same interface as :class:`fieldkit.optim.levenberg_marquardt.ReferenceProblem`, on the gradient cache.

    ``device`` (default: that of ``images``) picks the builds: CPU or CUDA cache and rasterizer;
    the parameter vectors handed to the methods must live there.
    """

    def __init__(self, layout: ParamLayout, cameras: Cameras, images: Tensor, sh_degree: int, background: Tensor,
                 config: LMConfig, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else images.device
        extension(self.device)  # raises RuntimeError when the extension cannot be built
        rasterizer(self.device).extension()  # the projection and its VJP come from the native rasterizer
        self.layout = layout
        self.cameras = cameras
        self.images = images
        self.sh_degree = sh_degree
        self.background = background
        self.config = config
        self.num_images = len(cameras)

    def render(self, theta: Tensor, images: Sequence[int], count: bool = False) -> tuple[Tensor, int]:
        """(RGB [B,H,W,3], cache entries it would need or 0) with the extension's forward."""
        cams = self.cameras[list(images)]
        with torch.no_grad():
            params = self.layout.unflatten(theta.detach())
            pairs, isect, q = visible_pairs(params, cams, self.sh_degree)
            bg = self.background.to(theta).expand(len(cams), 3).contiguous()
            out = extension(theta.device).build_cache(
                q[:, 0:2].contiguous(), q[:, 2:5].contiguous(), q[:, 5].contiguous(), q[:, 6:9].contiguous(), bg,
                isect.gaussian_ids.contiguous(), isect.tile_offsets.contiguous(), cams.width, cams.height, isect.tiles_x,
                isect.tiles_y, isect.tile_size, False,
            )
        return out[0], int(out[1])

    def cost(self, theta: Tensor, images: Sequence[int]) -> float:
        from fieldkit.optim.levenberg_marquardt import batch_cost

        rgb, _ = self.render(theta, images)
        return batch_cost(rgb, self.images[list(images)].to(theta), self.config)

    def bytes_per_image(self, theta: Tensor, image: int) -> int:
        """Jacobian state of one image, from a forward pass that counts its cache entries."""
        _, entries = self.render(theta, [image])
        pairs = int(self.layout.unflatten(theta)["means"].shape[0])
        pixels = self.cameras.width * self.cameras.height
        return entries * BYTES_PER_ENTRY + pixels * BYTES_PER_PIXEL + pairs * BYTES_PER_PAIR

    def linearize(self, theta: Tensor, images: Sequence[int]) -> NativeLinearization:
        return NativeLinearization(self, theta, images)

    def model_terms(self, theta: Tensor, images: Sequence[int], delta: Tensor) -> tuple[float, float, float]:
        """(E, grad E . delta, ||J delta||^2) on ``images``."""
        lin = self.linearize(theta, images)
        jd = lin.jvp(delta)
        return lin.cost, 2.0 * float(torch.dot(lin.gradient, delta.to(lin.gradient))), float(jd.square().sum())

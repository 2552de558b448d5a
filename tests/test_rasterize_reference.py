"""The torch reference rasterizer: closed-form projections, an independent per-pixel loop, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fieldkit.cameras import Cameras, intrinsics_matrix, look_at_w2c
from fieldkit.render import rasterize
from fieldkit.render.projection import project_gaussians
from fieldkit.render.sh import sh_to_rgb
from fieldkit.render.tiles import intersect_tiles


def _camera(width=40, height=30, focal=50.0, eye=(0.0, 0.0, -3.0), dtype=torch.float64) -> Cameras:
    w2c = look_at_w2c(torch.tensor(eye), torch.zeros(3), torch.tensor([0.0, -1.0, 0.0]))
    K = intrinsics_matrix(focal, focal * 1.1, width / 2 + 0.7, height / 2 - 0.4)
    return Cameras(w2c, K, width, height).to(dtype=dtype)


def test_projection_of_isotropic_gaussian_on_axis_matches_closed_form():
    cam = _camera()
    sigma = 0.05
    proj = project_gaussians(
        torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
        torch.full((1, 3), sigma, dtype=torch.float64), cam.world_to_cam, cam.K, cam.width, cam.height,
    )
    fx, fy, cx, cy = 50.0, 55.0, 20.7, 14.6
    z = 3.0
    var_x = (fx / z * sigma) ** 2 + 0.3
    var_y = (fy / z * sigma) ** 2 + 0.3
    assert torch.allclose(proj.means2d[0, 0], torch.tensor([cx, cy], dtype=torch.float64))
    assert torch.allclose(proj.depths[0, 0], torch.tensor(z, dtype=torch.float64))
    assert torch.allclose(proj.conics[0, 0], torch.tensor([1 / var_x, 0.0, 1 / var_y], dtype=torch.float64))
    assert proj.radii[0, 0].tolist() == [math.ceil(3 * math.sqrt(var_x)), math.ceil(3 * math.sqrt(var_y))]


def test_projection_rotated_anisotropic_gaussian_matches_monte_carlo():
    """Linearised screen covariance agrees with the covariance of projected samples (small Gaussian)."""
    torch.manual_seed(0)
    cam = _camera()
    mean = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    quat = torch.tensor([[0.8, 0.3, -0.4, 0.2]], dtype=torch.float64)
    scale = torch.tensor([[0.01, 0.004, 0.002]], dtype=torch.float64)
    proj = project_gaussians(mean, quat, scale, cam.world_to_cam, cam.K, cam.width, cam.height, eps2d=0.0)
    from fieldkit.render.projection import covariance_3d

    cov = covariance_3d(quat, scale)[0]
    samples = mean + torch.randn(200_000, 3, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    p = samples @ cam.world_to_cam[0, :3, :3].T + cam.world_to_cam[0, :3, 3]
    uv = torch.stack([50.0 * p[:, 0] / p[:, 2] + 20.7, 55.0 * p[:, 1] / p[:, 2] + 14.6], -1)
    emp = torch.cov(uv.T)
    a, b, c = proj.conics[0, 0]
    predicted = torch.linalg.inv(torch.tensor([[a, b], [b, c]]))
    assert torch.allclose(emp, predicted, rtol=0.03, atol=1e-4)


def test_gaussians_behind_camera_or_off_screen_are_culled():
    cam = _camera()
    means = torch.tensor([[0.0, 0.0, -4.0], [50.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    proj = project_gaussians(
        means, torch.tensor([[1.0, 0, 0, 0]] * 3, dtype=torch.float64), torch.full((3, 3), 0.05, dtype=torch.float64),
        cam.world_to_cam, cam.K, cam.width, cam.height,
    )
    assert proj.radii[0, :, 0].tolist()[:2] == [0, 0]
    assert proj.radii[0, 2, 0] > 0
    assert torch.isfinite(proj.conics).all() and torch.isfinite(proj.means2d).all()


def _random_scene(n: int, seed: int, dtype=torch.float64, sh_degree: int = 2):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * torch.tensor([1.6, 1.2, 1.0], dtype=dtype)
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = torch.rand(n, 3, generator=g, dtype=dtype) * 0.08 + 0.02
    opacities = torch.rand(n, generator=g, dtype=dtype) * 0.79 + 0.2
    sh = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g, dtype=dtype) * 0.3
    return means, quats, scales, opacities, sh


def _brute_force_render(means, quats, scales, opacities, sh, cam: Cameras, background):
    """Independent per-pixel loop: same rules, no tensors of tiles, plain Python/numpy."""
    proj = project_gaussians(means, quats, scales, cam.world_to_cam, cam.K, cam.width, cam.height)
    rgb = sh_to_rgb(2, means - cam.centers[0], sh).detach().numpy()
    m2d, conic = proj.means2d[0].detach().numpy(), proj.conics[0].detach().numpy()
    depth, radii = proj.depths[0].detach().numpy(), proj.radii[0].numpy()
    order = sorted(range(len(depth)), key=lambda i: (depth[i], i))
    out = np.zeros((cam.height, cam.width, 3))
    alpha_img = np.zeros((cam.height, cam.width))
    for row in range(cam.height):
        for col in range(cam.width):
            tile_x, tile_y = col // 16, row // 16
            T, acc = 1.0, np.zeros(3)
            for i in order:
                if radii[i, 0] == 0:
                    continue
                x0 = math.floor((m2d[i, 0] - radii[i, 0]) / 16)
                x1 = math.ceil((m2d[i, 0] + radii[i, 0]) / 16)
                y0 = math.floor((m2d[i, 1] - radii[i, 1]) / 16)
                y1 = math.ceil((m2d[i, 1] + radii[i, 1]) / 16)
                if not (x0 <= tile_x < x1 and y0 <= tile_y < y1):
                    continue
                dx, dy = m2d[i, 0] - (col + 0.5), m2d[i, 1] - (row + 0.5)
                a, b, c = conic[i]
                s = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                if s < 0:
                    continue
                alpha = min(0.999, float(opacities[i]) * math.exp(-s))
                if alpha < 1 / 255:
                    continue
                if T * (1 - alpha) <= 1e-4:
                    break
                acc += rgb[i] * alpha * T
                T *= 1 - alpha
            out[row, col] = acc + T * background
            alpha_img[row, col] = 1 - T
    return out, alpha_img


@pytest.mark.parametrize("seed", [0, 1])
def test_tiled_reference_matches_independent_per_pixel_loop(seed):
    cam = _camera(width=37, height=29)
    scene = _random_scene(60, seed)
    background = np.array([0.2, 0.5, 0.9])
    out = rasterize(*scene, cam, background=torch.tensor(background), backend="torch")
    expected_rgb, expected_alpha = _brute_force_render(*scene, cam, background)
    assert out.rgb.shape == (1, 29, 37, 3)
    np.testing.assert_allclose(out.rgb[0].numpy(), expected_rgb, atol=1e-10)
    np.testing.assert_allclose(out.alpha[0, ..., 0].numpy(), expected_alpha, atol=1e-10)
    assert expected_alpha.max() > 0.9  # the scene actually covers pixels, opaque ones too


def test_transmittance_stop_excludes_the_crossing_gaussian():
    """Five stacked opaque Gaussians: T goes 1 -> 1e-3 -> 1e-6: the second is not added."""
    cam = _camera(width=16, height=16, focal=20.0)
    n = 5
    means = torch.tensor([[0.0, 0.0, 0.1 * i] for i in range(n)], dtype=torch.float64)
    out = rasterize(
        means, torch.tensor([[1.0, 0, 0, 0]] * n, dtype=torch.float64), torch.full((n, 3), 1.0, dtype=torch.float64),
        torch.full((n,), 0.999, dtype=torch.float64), torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0, 1]], cam,
        backend="torch",
    )
    centre = out.rgb[0, 8, 8]
    # opacity 0.999 * exp(-small) < 0.999: first Gaussian (red) dominates, green never added.
    assert centre[1].item() == 0.0 and centre[2].item() == 0.0
    assert 0.99 < centre[0].item() < 0.999
    assert math.isclose(out.alpha[0, 8, 8, 0].item(), centre[0].item(), rel_tol=1e-12)


def test_gradients_match_finite_differences_float64():
    cam = _camera(width=24, height=20, focal=30.0)
    means, quats, scales, opacities, sh = _random_scene(6, seed=3, sh_degree=3)
    scales = scales * 2
    background = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    weights = torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def loss(m, q, s, o, c):
        out = rasterize(m, q, s, o, c, cam, background=background, backend="torch")
        return (out.rgb * weights).sum() + 0.1 * (out.depth * out.alpha).sum()

    inputs = tuple(t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, sh))
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_intersections_sorted_by_tile_then_depth():
    cam = _camera(width=64, height=48, dtype=torch.float32)
    means, quats, scales, opacities, sh = _random_scene(200, seed=5, dtype=torch.float32)
    proj = project_gaussians(means, quats, scales, cam.world_to_cam, cam.K, 64, 48)
    isect = intersect_tiles(proj.means2d, proj.radii, proj.depths, 64, 48)
    depths = proj.depths.flatten()
    for t in range(isect.num_tiles):
        ids = isect.gaussian_ids[isect.tile_offsets[t]: isect.tile_offsets[t + 1]]
        assert torch.all(depths[ids][1:] >= depths[ids][:-1])
    visible = proj.radii[0, :, 0] > 0
    assert isect.gaussian_ids.unique().numel() == int(visible.sum())

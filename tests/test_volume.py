"""Volume rendering against closed forms: slabs, spheres, rays, contraction, occupancy skipping."""

from __future__ import annotations

import math

import pytest
import torch

from fieldkit.cameras import Cameras, intrinsics_matrix, look_at_w2c
from fieldkit.fields.occupancy import OccupancyGrid
from fieldkit.render.volume import (
    Rays,
    SceneSpace,
    camera_rays,
    composite,
    contract,
    exclusive_segment_cumsum,
    pixel_rays,
    render_camera,
    render_rays,
    sample_along_rays,
    uncontract,
)

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


def _camera(eye=(0.0, 0.0, -4.0), size=48, focal=60.0):
    w2c = look_at_w2c(torch.tensor(eye), torch.zeros(3), torch.tensor([0.0, -1.0, 0.0]))
    return Cameras(w2c.float(), intrinsics_matrix(focal, focal, size / 2, size / 2).float(), size, size)


def _slab_field(space, sigma, lo, hi, color=(0.2, 0.4, 0.6)):
    def density(u):
        z = space.from_unit(u)[:, 2]
        return torch.where((z >= lo) & (z < hi), torch.full_like(z, sigma), torch.zeros_like(z))

    def field(u, d):
        s = density(u)
        return s, torch.tensor(color, dtype=u.dtype).expand(len(u), 3)

    return density, field


def _axis_rays(n=5, x0=-2.0):
    origins = torch.zeros(n, 3)
    origins[:, 2] = x0
    origins[:, 0] = torch.linspace(-0.5, 0.5, n)
    dirs = torch.zeros(n, 3)
    dirs[:, 2] = 1
    return Rays(origins, dirs, torch.ones(n))


def test_pixel_rays_go_through_pixel_centres():
    cam = _camera()
    cam.K[0, 0, 2] = 23.3
    rays = pixel_rays(cam, torch.zeros(3, dtype=torch.long), torch.tensor([0, 10, 47]), torch.tensor([5, 0, 47]))
    assert torch.allclose(rays.directions.norm(dim=-1), torch.ones(3))
    assert torch.allclose(rays.origins, cam.centers.float().expand(3, 3), atol=1e-5)
    pts = rays.origins + 2.7 * rays.directions
    cam_pts = (cam.world_to_cam[0, :3, :3] @ pts.T).T + cam.world_to_cam[0, :3, 3]
    uv = (cam.K[0] @ cam_pts.T).T
    uv = uv[:, :2] / uv[:, 2:]
    assert torch.allclose(uv, torch.tensor([[0.5, 5.5], [10.5, 0.5], [47.5, 47.5]]), atol=1e-4)
    # z_scale converts distance to camera depth
    assert torch.allclose(cam_pts[:, 2], 2.7 * rays.z_scale, atol=1e-5)


def test_camera_rays_row_major_and_centre_ray_on_axis():
    cam = _camera(size=4)
    rays = camera_rays(cam)
    assert len(rays) == 16
    # pixel centres (1.5, 1.5) and (2.5, 2.5) straddle the principal point (2, 2) symmetrically
    assert torch.allclose(rays.directions[5] + rays.directions[10], torch.tensor([0.0, 0.0, 2 * rays.directions[5, 2]]), atol=1e-6)


def test_contraction_identity_inside_bounded_and_invertible():
    y = torch.tensor([[0.3, -0.9, 0.5], [3.0, 0.0, 0.0], [-100.0, 50.0, 1.0]])
    z = contract(y)
    assert torch.allclose(z[0], y[0])
    assert torch.allclose(z[1], torch.tensor([2 - 1 / 3, 0.0, 0.0]))
    assert z.abs().max() < 2
    assert torch.allclose(uncontract(z), y, rtol=1e-4)
    space = SceneSpace.from_box(torch.tensor([[0.0, 0, 0], [2, 4, 6]]), contracted=True)
    u = space.to_unit(torch.tensor([[1.0, 2, 3], [2, 4, 6], [1e6, 2, 3]]))
    assert torch.allclose(u[0], torch.full((3,), 0.5)) and torch.allclose(u[1], torch.full((3,), 0.75))
    assert u.max() <= 1.0


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("sigma", [0.5, 3.0])
def test_constant_density_slab_opacity_closed_form(stratified, sigma):
    space = SceneSpace.from_box(BOX)
    density, field = _slab_field(space, sigma, -0.5, 0.3)
    rays = _axis_rays()
    out = render_rays(field, rays, space, 0.01, background=torch.zeros(3), stratified=stratified,
                      generator=torch.Generator().manual_seed(0), early_stop_eps=0)
    expected = 1 - math.exp(-sigma * 0.8)
    tol = 2e-5 if not stratified else sigma * 0.01 * 2  # jitter moves at most one bin per face
    assert torch.allclose(out.opacity, torch.full((5,), expected), atol=tol)
    assert torch.allclose(out.rgb, torch.tensor([0.2, 0.4, 0.6]) * out.opacity[:, None], atol=1e-5)


def test_depth_of_opaque_slab_face_and_background():
    space = SceneSpace.from_box(BOX)
    density, field = _slab_field(space, 1e3, -0.25, 0.5)
    rays = _axis_rays()
    out = render_rays(field, rays, space, 0.005, background=torch.tensor([1.0, 0.0, 1.0]), density_fn=density)
    assert torch.allclose(out.opacity, torch.ones(5), atol=1e-4)
    assert torch.allclose(out.distance, torch.full((5,), 1.75), atol=0.005)  # face at z = -0.25, ray starts at z = -2
    # an empty field shows the background
    empty = render_rays(lambda u, d: (torch.zeros(len(u)), torch.zeros(len(u), 3)), rays, space, 0.05,
                        background=torch.tensor([1.0, 0.0, 1.0]))
    assert torch.allclose(empty.rgb, torch.tensor([1.0, 0.0, 1.0]).expand(5, 3))
    assert torch.all(empty.opacity == 0) and torch.all(empty.depth == 0)


def test_early_termination_changes_nothing_visible():
    space = SceneSpace.from_box(BOX)
    density, field = _slab_field(space, 20.0, -0.6, 0.6)
    rays = _axis_rays()
    full = render_rays(field, rays, space, 0.01, background=torch.ones(3), early_stop_eps=0)
    pruned = render_rays(field, rays, space, 0.01, background=torch.ones(3), density_fn=density, early_stop_eps=1e-4)
    assert pruned.n_samples < 0.5 * full.n_samples
    assert torch.allclose(pruned.rgb, full.rgb, atol=2e-4)


def _sphere(space, radius=0.5, sigma=80.0):
    def density(u):
        x = space.from_unit(u)
        return torch.where(x.norm(dim=-1) < radius, torch.full((len(u),), sigma), torch.zeros(len(u)))

    return density, lambda u, d: (density(u), torch.ones(len(u), 3) * 0.5)


def test_sphere_silhouette_and_occupancy_grid_skipping():
    space = SceneSpace.from_box(BOX)
    density, field = _sphere(space)
    cam = _camera()
    rays = camera_rays(cam)
    # analytic silhouette: the ray passes within r of the centre
    closest = torch.cross(rays.directions, -rays.origins, dim=-1).norm(dim=-1)
    inside, outside = closest < 0.5 - 0.01, closest > 0.5 + 0.01
    out = render_camera(field, cam, space, 0.01, background=torch.zeros(3), density_fn=density)
    alpha = out["alpha"].reshape(-1)
    assert inside.sum() > 100
    assert torch.all(alpha[inside] > 0.99) and torch.all(alpha[outside] < 1e-6)
    # depth at the centre pixel ~ distance to the sphere's front (camera at 4, r 0.5)
    depth = out["depth"].reshape(-1)
    assert torch.allclose(depth[inside].min(), torch.tensor(3.5), atol=0.02)

    grid = OccupancyGrid(32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # one random point per cell per update: enough updates to find the boundary cells
        grid.update(lambda u: density(u) * 0.01, all_cells=True, generator=gen)
    assert 0.01 < grid.occupancy_fraction() < 0.1  # sphere volume / box volume = 0.065 (plus boundary cells)
    skipped = render_camera(field, cam, space, 0.01, background=torch.zeros(3), density_fn=density, occupancy=grid)
    # same image up to where the bins start (the march begins at the occupied box, not the scene box)
    assert torch.allclose(skipped["alpha"], out["alpha"], atol=1e-3)
    assert torch.allclose(skipped["rgb"], out["rgb"], atol=1e-3)
    samples_full = sample_along_rays(rays, space, 0.01)
    samples_grid = sample_along_rays(rays, space, 0.01, occupancy=grid)
    assert len(samples_grid) < 0.1 * len(samples_full)

    class FlatOnly:  # the same grid without the coarse level: the one-level sampler
        query = staticmethod(grid.query)
        occupied_box = staticmethod(grid.occupied_box)

    flat = sample_along_rays(rays, space, 0.01, occupancy=FlatOnly())
    assert torch.equal(flat.ray_ids, samples_grid.ray_ids)
    assert torch.equal(flat.t, samples_grid.t) and torch.equal(flat.deltas, samples_grid.deltas)


def test_contracted_space_reaches_far_in_disparity():
    space = SceneSpace.from_box(BOX, contracted=True)
    rays = _axis_rays(3, x0=0.0)
    samples = sample_along_rays(rays, space, 0.05, far=100.0, outer_samples=32)
    per_ray = torch.zeros(3).index_add(0, samples.ray_ids, samples.deltas)
    assert torch.allclose(per_ray, torch.full((3,), 100.0), rtol=1e-4)  # bins tile [0, far]
    outer = samples.t[samples.t > 1.0]
    gaps = outer.reshape(3, -1).diff(dim=-1)
    assert torch.all(gaps[:, 1:] >= gaps[:, :-1] * 0.999)  # steps grow with distance
    assert space.to_unit(samples.points(rays)).max() <= 1.0


def test_composite_gradcheck_and_segment_cumsum():
    ray_ids = torch.tensor([0, 0, 0, 2, 2, 3])
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert torch.equal(exclusive_segment_cumsum(vals, ray_ids, 4), torch.tensor([0.0, 1.0, 3.0, 0.0, 4.0, 0.0]))
    from fieldkit.render.volume import Samples

    samples = Samples(ray_ids, torch.tensor([0.1, 0.2, 0.3, 0.5, 0.7, 0.2], dtype=torch.float64),
                      torch.tensor([0.1, 0.1, 0.1, 0.2, 0.2, 0.3], dtype=torch.float64), 4)
    sig = torch.rand(6, dtype=torch.float64, requires_grad=True)
    rgb = torch.rand(6, 3, dtype=torch.float64, requires_grad=True)

    def fn(s, c):
        out_rgb, opacity, dist, _ = composite(s * 5, c, samples)
        return out_rgb, opacity, dist

    assert torch.autograd.gradcheck(fn, (sig, rgb))
    _, opacity, _, weights = composite(sig.detach() * 5, rgb.detach(), samples)
    assert opacity[1] == 0 and torch.all(opacity <= 1)
    # opacity telescopes: 1 - exp(-sum sigma delta)
    tau = (sig.detach() * 5 * samples.deltas)
    assert torch.allclose(opacity[0], 1 - torch.exp(-tau[:3].sum()))

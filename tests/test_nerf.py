"""The nerf method end to end on the shipped demo scene, its scene spaces, schedule and mesh export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, shared_path
from fieldkit.cameras import Cameras, intrinsics_matrix, look_at_w2c
from fieldkit.data import load_scene
from fieldkit.export.mesh import TSDFVolume, iso_surface, marching_tetrahedra, read_mesh_ply, write_mesh_ply
from fieldkit.methods.nerf import NeRF, NerfConfig, lr_factor, scene_space_for

DEMO = REPO_ROOT / "scenes" / "demo"
SMALL = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, finest_resolution=64, grid_resolution=32,
             rays_per_batch=512, target_samples=4096, samples_per_diagonal=64, grid_warmup_steps=16,
             grid_update_every=8, grid_cells_per_update=4096, hidden=32)


@pytest.fixture(scope="module")
def demo_scene():
    return load_scene(DEMO, downscale=4)


def _psnr(method, scene, view=0):
    images, cams = scene.subset("test")
    rgb = method.render(cams[view])["rgb"]
    return float(-10 * torch.log10(((rgb - images[view : view + 1]) ** 2).mean()))


def test_training_improves_and_checkpoint_round_trips(demo_scene):
    torch.manual_seed(0)
    method = NeRF(NerfConfig(**SMALL, warmup_steps=10), demo_scene, max_steps=150, seed=0, device="cpu")
    before = _psnr(method, demo_scene)
    losses = [method.train_step(step)["loss"] for step in range(150)]
    after = _psnr(method, demo_scene)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    assert after > before + 3.0
    assert 0 < method.grid.occupancy_fraction() < 1
    # a fresh method loaded from the state dict renders the same image
    state = method.state_dict()
    torch.save(state, "/tmp/_fk_nerf_state.pt")
    loaded = torch.load("/tmp/_fk_nerf_state.pt", weights_only=True)
    other = NeRF(NerfConfig(**SMALL), demo_scene, max_steps=60, seed=1, device="cpu")
    other.load_state_dict(loaded)
    images, cams = demo_scene.subset("test")
    a, b = method.render(cams[1]), other.render(cams[1])
    assert torch.allclose(a["rgb"], b["rgb"], atol=1e-6) and torch.allclose(a["depth"], b["depth"], atol=1e-5)
    assert a["rgb"].shape == (1, cams.height, cams.width, 3) and a["alpha"].shape == (1, cams.height, cams.width, 1)


def test_cam_and_s3im_switches_train(demo_scene):
    cfg = NerfConfig(**SMALL, cam=True, s3im_weight=1.0)
    method = NeRF(cfg, demo_scene, max_steps=10, device="cpu")
    names = [g["name"] for g in method.optimizer.param_groups]
    assert names == ["grid", "mlp", "cam"]
    lrs = {g["name"]: g["base_lr"] for g in method.optimizer.param_groups}
    assert lrs["cam"] == pytest.approx(cfg.cam_lr_scale * lrs["mlp"])
    before = method.model.cam.gamma.detach().clone()
    stats = [method.train_step(step) for step in range(4)]
    assert all(math.isfinite(s["loss"]) and "s3im" in s for s in stats)
    assert not torch.equal(before, method.model.cam.gamma)  # the grids learn
    assert method.rays_per_batch % 64 == 0


def test_lr_schedule_and_scene_spaces(demo_scene):
    assert lr_factor(0, 1000, 100) == pytest.approx(0.01)
    assert lr_factor(100, 1000, 100) == pytest.approx(1.0)
    assert lr_factor(500, 1000, 100) == pytest.approx(0.33)
    assert lr_factor(950, 1000, 100) == pytest.approx(0.33**3)
    space = scene_space_for(demo_scene)
    assert not space.contracted and torch.allclose(space.box, demo_scene.scene_box)
    assert scene_space_for(demo_scene, "contract").contracted
    with pytest.raises(ValueError, match="contract"):
        scene_space_for(demo_scene, "sphere")


def test_fern_gets_a_contracted_space_around_the_near_frusta():
    # LLFF reader: depth bounds -> a box around the training frusta from the near bound to twice it
    scene = load_scene(shared_path("fern"), downscale=4, format="llff")
    space = scene_space_for(scene)
    assert space.contracted
    idx = scene.split["train"]
    cams = scene.cameras[idx]
    axis = cams.world_to_cam[:, 2, :3].double()
    near_pts = cams.centers.double() + axis * scene.near_far[idx, :1].double()
    box = space.box.double()
    assert torch.all((near_pts >= box[0]) & (near_pts <= box[1]))
    # COLMAP reader (the default for fern): the sparse points' box, contracted beyond it
    scene = load_scene(shared_path("fern"), downscale=4)
    space = scene_space_for(scene)
    assert space.contracted and torch.allclose(space.box, scene.bounds)
    method = NeRF(NerfConfig(**SMALL), scene, max_steps=5, device="cpu")
    stats = method.train_step(0)
    assert math.isfinite(stats["loss"]) and stats["samples_per_ray"] > 1


def test_cli_train_eval_export(tmp_path):
    from fieldkit.cli import main

    run = tmp_path / "run"
    args = ["train", str(DEMO), "--method", "nerf", "--max-steps", "30", "--eval-every", "0", "--save-every", "0",
            "-o", str(run), "--data.downscale", "4", "--nerf.n-levels", "4", "--nerf.log2-hashmap-size", "12",
            "--nerf.finest-resolution", "64", "--nerf.grid-resolution", "32", "--nerf.target-samples", "8192",
            "--nerf.rays-per-batch", "512", "--nerf.samples-per-diagonal", "64", "--cam", "--s3im-weight", "0.5"]
    assert main(args) == 0
    import json

    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "nerf" and config["method_config"]["cam"] and config["method_config"]["s3im_weight"] == 0.5
    assert main(["eval", str(run)]) == 0
    assert 5 < json.loads((run / "eval.json").read_text())["results"]["psnr"] < 60
    from fieldkit.export.mesh import field_mesh
    from fieldkit.runs import load_run

    method, scene, _, step = load_run(run)
    assert step == 30
    lin = torch.linspace(0, 1, 24)
    with torch.no_grad():
        density = method.model.density(torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3))
    verts, faces, colors = field_mesh(method, resolution=24, level=float(density.median()))
    assert len(faces) > 0 and colors.shape == verts.shape and np.all((colors >= 0) & (colors <= 1))
    assert np.all(np.abs(verts) <= 1.5 + 1e-4)  # inside the Blender box


def test_marching_tetrahedra_sphere_is_closed_and_outward():
    n = 24
    lin = np.linspace(-1, 1, n)
    X, Y, Z = np.meshgrid(lin, lin, lin, indexing="ij")
    values = 1 - np.sqrt(X**2 + Y**2 + Z**2) / 0.6
    for fn in (marching_tetrahedra, iso_surface):
        verts, faces = fn(values, 0.0)
        verts = -1 + verts * 2 / (n - 1)
        assert np.allclose(np.linalg.norm(verts, axis=1), 0.6, atol=0.03)
        tri = verts[faces]
        volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
        assert volume == pytest.approx(4 / 3 * math.pi * 0.6**3, rel=0.05)  # positive: normals point out
        edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
        _, counts = np.unique(edges, axis=0, return_counts=True)
        assert np.all(counts == 2)  # closed, edge-manifold


def _sphere_depth(camera: Cameras, radius: float) -> torch.Tensor:
    from fieldkit.render.volume import camera_rays

    rays = camera_rays(camera)
    b = (rays.origins * rays.directions).sum(-1)
    c = (rays.origins**2).sum(-1) - radius**2
    disc = b**2 - c
    t = -b - torch.sqrt(disc.clamp_min(0))
    depth = torch.where(disc > 0, t * rays.z_scale, torch.zeros_like(t))
    return depth.reshape(camera.height, camera.width, 1)


def test_tsdf_fusion_recovers_a_sphere_and_ply_round_trip(tmp_path):
    radius = 0.5
    volume = TSDFVolume(torch.tensor([[-1.0, -1, -1], [1, 1, 1]]), resolution=48)
    K = intrinsics_matrix(60.0, 60.0, 32.0, 32.0).float()
    for i in range(12):
        theta = 2 * math.pi * i / 12
        phi = 0.6 * math.sin(3 * theta)
        eye = torch.tensor([3 * math.cos(theta) * math.cos(phi), 3 * math.sin(theta) * math.cos(phi), 3 * math.sin(phi)])
        cam = Cameras(look_at_w2c(eye, torch.zeros(3), torch.tensor([0.0, 0, 1])).float(), K, 64, 64)
        depth = _sphere_depth(cam, radius)
        volume.integrate(depth, torch.full((64, 64, 3), 0.25), cam)
    verts, faces, colors = volume.mesh()
    assert len(faces) > 100
    dist = np.linalg.norm(verts, axis=1)
    assert np.median(np.abs(dist - radius)) < volume.voxel
    assert np.allclose(colors, 0.25, atol=1e-5)
    path = write_mesh_ply(tmp_path / "sphere.ply", verts, faces, colors)
    v2, f2, c2 = read_mesh_ply(path)
    assert np.allclose(v2, verts, atol=1e-6) and np.array_equal(f2, faces) and np.allclose(c2, 0.25, atol=1 / 255)


def test_tsdf_mesh_of_a_gaussian_run(demo_scene, tmp_path):
    """The general mesh path serves Gaussian runs: fuse their rendered depth at the training views."""
    from fieldkit.export.mesh import export_mesh, tsdf_mesh
    from fieldkit.methods.gs import GaussianSplatting, GSConfig

    method = GaussianSplatting(GSConfig(init_random_points=2000), demo_scene, max_steps=20, seed=0, backend="torch")
    for step in range(20):
        method.train_step(step)
    verts, faces, colors = tsdf_mesh(method, demo_scene, resolution=40, max_views=8)
    assert len(faces) > 0 and colors.shape == verts.shape
    assert np.all(np.abs(verts) <= 1.5 + 1e-4)  # inside the Blender box
    with pytest.raises(ValueError, match="scene"):
        export_mesh(object(), tmp_path / "x.ply")

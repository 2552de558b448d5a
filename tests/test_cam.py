"""CAM: identity start, grid interpolation against closed forms, parameter overhead, image fitting."""

from __future__ import annotations

import pytest
import torch

from fieldkit.fields.cam import ModulatedMLP, ModulationGrid, normalize_features
from fieldkit.fit_image import ImageField, fit, load_image, pixel_coords


@pytest.mark.parametrize("resolution", [(7,), (5, 6), (4, 5, 6)])
def test_grid_starts_as_identity(resolution):
    grid = ModulationGrid(3, resolution)
    gamma, beta = grid(torch.rand(50, len(resolution)) * 2 - 1)
    assert gamma.shape == (3, 50, 1) and beta.shape == (3, 50, 1)
    assert torch.allclose(gamma, torch.ones(())) and torch.allclose(beta, torch.zeros(()))


def test_identity_modulation_leaves_the_mlp_unchanged():
    torch.manual_seed(0)
    mlp = ModulatedMLP(8, 16, 2, 3)
    grid = ModulationGrid(2, (4, 4))
    x = torch.randn(20, 8)
    assert torch.allclose(mlp(x, grid(torch.rand(20, 2) * 2 - 1)), mlp(x))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_interpolation_reproduces_linear_functions(dims):
    """Grid values a*x + b*y + c*z at the vertices (align_corners) interpolate exactly inside."""
    res = (5, 7, 4)[:dims]
    grid = ModulationGrid(1, res)
    coeffs = torch.tensor([0.7, -0.4, 0.25])[:dims]
    axes = [torch.linspace(-1, 1, r) for r in res]
    mesh = torch.meshgrid(*reversed(axes), indexing="ij")  # stored [.., z, y, x]
    values = sum(coeffs[d] * mesh[dims - 1 - d] for d in range(dims))
    with torch.no_grad():
        grid.gamma.copy_(values.reshape(grid.gamma.shape))
        grid.beta.copy_(2 * values.reshape(grid.beta.shape))
    c = torch.rand(100, dims) * 2 - 1
    gamma, beta = grid(c)
    assert torch.allclose(gamma[0, :, 0], c @ coeffs, atol=1e-5)
    assert torch.allclose(beta[0, :, 0], 2 * (c @ coeffs), atol=1e-5)
    # outside the grid: border padding clamps
    gamma_out, _ = grid(torch.full((1, dims), 3.0))
    assert torch.allclose(gamma_out[0, 0, 0], coeffs.sum(), atol=1e-5)


def test_modulation_is_applied_after_linear_and_norm_before_activation():
    torch.manual_seed(1)
    mlp = ModulatedMLP(4, 6, 1, 2, normalize=True)
    x = torch.randn(3, 4)
    gamma = torch.full((1, 3, 1), 2.0)
    beta = torch.full((1, 3, 1), -0.5)
    h = torch.relu(2.0 * normalize_features(mlp.hidden_layers[0](x)) - 0.5)
    assert torch.allclose(mlp(x, (gamma, beta)), mlp.output(h), atol=1e-6)
    h = normalize_features(torch.randn(5, 64) * 3 + 2)
    assert torch.allclose(h.mean(-1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(h.std(-1, unbiased=False), torch.ones(5), atol=1e-3)


def test_nerf_cam_overhead_and_learning_rate():
    from fieldkit.methods.nerf import NerfConfig
    from fieldkit.models.radiance_field import RadianceField

    plain = RadianceField(NerfConfig(cam=False, implementation="torch").field_config())
    cam = RadianceField(NerfConfig(cam=True, implementation="torch").field_config())
    extra = cam.n_params() - plain.n_params()
    assert 0 < extra <= 0.01 * plain.n_params()
    points, dirs = torch.rand(10, 3), torch.nn.functional.normalize(torch.randn(10, 3), dim=-1)
    cam.load_state_dict(plain.state_dict(), strict=False)
    cam.config.cam_normalize = False
    cam.density_mlp.normalize = cam.color_mlp.normalize = False
    assert torch.allclose(cam(points, dirs)[1], plain(points, dirs)[1])  # identity at initialisation


def test_fit_image_cam_learns_a_piecewise_image_faster():
    """A small image with a sharp, spatially varying pattern: the CAM grid helps within a few steps."""
    torch.manual_seed(0)
    H = W = 32
    _, coords = pixel_coords(H, W)
    x, y = coords[:, 0].reshape(H, W), coords[:, 1].reshape(H, W)
    image = torch.stack([(x > 0.1).float(), (y > -0.3).float() * 0.8, 0.5 + 0.4 * torch.sin(6 * x * y)], -1)
    kw = dict(steps=60, frequencies=32, sigma=3.0, hidden=32, layers=2, cam_grid=8, lr=3e-3)
    plain = fit(image, cam=False, **kw)
    cam = fit(image, cam=True, **kw)
    assert cam["params"] - plain["params"] == 2 * 2 * 8 * 8
    assert cam["psnr"] > plain["psnr"] + 1.0


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(bad)
    assert isinstance(ImageField(cam=True).cam, ModulationGrid)

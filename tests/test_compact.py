"""Compact Gaussians (gs-compact): mask STE, residual VQ, contraction, CLI train/export, .fkc round trip."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import fieldkit  # noqa: F401  (before torch: OMP_WAIT_POLICY)
import torch

from fieldkit.cli import main
from fieldkit.models.compact import ResidualVQ, contract_to_unit, straight_through_mask

REPO_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: 1 thread for this module


def test_mask_ste_forward_hard_backward_sigmoid() -> None:
    m = torch.tensor([-6.0, -4.0, 0.0, 3.0], requires_grad=True)
    out = straight_through_mask(m)
    assert torch.equal(out.detach(), (torch.sigmoid(m.detach()) > 0.01).float())
    out.sum().backward()
    s = torch.sigmoid(m.detach())
    assert torch.allclose(m.grad, s * (1 - s))


def test_contraction_range_and_identity_inside() -> None:
    c, h = torch.zeros(3), torch.ones(3)
    inside = torch.tensor([[0.3, -0.2, 0.1]])
    assert torch.allclose(contract_to_unit(inside, c, h), inside / 4 + 0.5)
    far = torch.tensor([[1e6, 0.0, 0.0], [0.0, -50.0, 3.0]])
    y = contract_to_unit(far, c, h)
    assert ((y >= 0) & (y <= 1)).all()
    assert torch.allclose((y - 0.5).norm(dim=-1) * 4, torch.tensor([2.0, 2 - 1 / far[1].norm()]), atol=1e-4)


def test_residual_vq_error_drops_with_stages_and_grads_pass_through() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 3, generator=g)
    errors = []
    for stages in (1, 3, 6):
        vq = ResidualVQ(3, stages, 16)
        vq.init_kmeans(x, 5, torch.Generator().manual_seed(0))
        q, idx = vq(x)
        assert idx.shape == (2000, stages) and int(idx.max()) < 16
        errors.append(float(((q.detach() - x) ** 2).mean()))
    assert errors[0] > errors[1] > errors[2]
    xr = x.clone().requires_grad_(True)
    q, _ = vq(xr)
    q.sum().backward()
    assert torch.allclose(xr.grad, torch.ones_like(x))
    assert vq.codebooks.grad is not None and vq.codebooks.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("fieldkit_make_demo_compact", REPO_ROOT / "scenes" / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("scene") / "tiny"
    module.main(["--out", str(out), "--size", "32", "--train", "8", "--test", "2"])
    return out


@pytest.fixture(scope="module")
def run(scene: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "compact"
    # 80 steps: densification refines at 100-step intervals are scaled in; rvq on for the last 10 steps.
    assert main(["train", str(scene), "-o", str(out), "--method", "gs-compact", "--max-steps", "80", "--backend", "torch",
                 "--gs-compact.init-random-points", "400", "--gs-compact.hash-log2-size", "12", "--gs-compact.hash-levels", "8",
                 "--gs-compact.lambda-mask", "0.05", "--eval-every", "80", "--save-every", "80"]) == 0
    return out


def test_cli_config_reaches_method(run: Path) -> None:
    import json

    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "gs-compact"
    assert cfg["method_config"]["hash_log2_size"] == 12


def test_export_roundtrip_renders_same_image(run: Path, tmp_path: Path) -> None:
    """export -> read -> render matches the trained model's render within quantisation:
    PSNR(decoded, original) >= 30 dB and max |diff| <= 0.25 (fp16 positions, 8-bit opacity and
    hash grid, fp16 codebooks/MLP)."""
    from fieldkit.export.compact import read_compact
    from fieldkit.runs import load_run

    out = tmp_path / "scene.fkc"
    assert main(["export", str(run), "--format", "compact", "-o", str(out)]) == 0
    method, scene, _, _ = load_run(run, backend="torch")
    assert method.rvq_active
    model = read_compact(out)
    assert len(model) == int(method.stats()["gaussians"])
    _, cameras = scene.subset("test")
    ref = method.render(cameras[0])["rgb"]
    dec = model.render(cameras[0], backend="torch")["rgb"]
    mse = float(((ref - dec) ** 2).mean())
    assert -10 * np.log10(max(mse, 1e-12)) >= 30.0
    assert float((ref - dec).abs().max()) <= 0.25
    # the compact file is far smaller than the standard PLY of the same run
    ply = tmp_path / "scene.ply"
    assert main(["export", str(run), "--format", "ply", "-o", str(ply)]) == 0
    from fieldkit.export import read_ply

    splats = read_ply(ply)
    assert len(splats) == len(model) and splats.sh.shape[1] == 1


def test_mask_pruning_removes_masked_gaussians(scene: Path) -> None:
    from fieldkit.data.scene import Scene
    from fieldkit.methods.gs_compact import CompactConfig, CompactGaussians

    sc = CompactGaussians.load_data(scene)
    m = CompactGaussians(CompactConfig(init_random_points=200, hash_log2_size=10, hash_levels=4), sc, max_steps=30, backend="torch")
    with torch.no_grad():
        m.params["mask_logits"][:50] = -10.0
    assert m.prune_masked() == 50
    assert m.params["means"].shape[0] == 150 and m.params["mask_logits"].shape[0] == 150
    stats = m.train_step(0)  # optimizer state still consistent after the surgery
    assert np.isfinite(stats["loss"])


@pytest.mark.parametrize("color_residual,sh_degree,n_features", [(False, 0, 0), (True, 1, 0), (True, 0, 3)])
def test_fkc_roundtrip_with_and_without_colour_offsets(scene: Path, tmp_path: Path, color_residual: bool, sh_degree: int, n_features: int) -> None:
    """Every model layout survives write -> read: per-Gaussian colour offsets and colour-MLP features (COLOR_OFFSET_BITS
    per channel over each channel's range) and SH residuals (residual VQ) are stored only when the model has them, the
    decoded render matches, and the PLY export carries the SH degree."""
    import json

    from fieldkit.export import read_ply
    from fieldkit.export.compact import COLOR_OFFSET_BITS, morton_order, read_compact, write_compact
    from fieldkit.methods.gs_compact import CompactConfig, CompactGaussians

    sc = CompactGaussians.load_data(scene)
    cfg = CompactConfig(init_random_points=300, hash_log2_size=10, hash_levels=4, color_residual=color_residual, sh_residual_degree=sh_degree,
                        color_features=n_features)
    m = CompactGaussians(cfg, sc, max_steps=30, backend="torch")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if color_residual:
            m.params["color_residual"].copy_(torch.randn(m.params["color_residual"].shape, generator=g) * 0.3)
        if n_features:
            m.params["color_features"].copy_(torch.randn(m.params["color_features"].shape, generator=g))
        if sh_degree:
            m.params["sh_residual"].copy_(torch.randn(m.params["sh_residual"].shape, generator=g) * 0.02)
    path = tmp_path / "s.fkc"
    sizes = write_compact(path, m)
    assert ("color_offset" in sizes) == color_residual and ("sh_indices" in sizes) == (sh_degree > 0)
    model = read_compact(path)
    if color_residual:
        ref = m.params["color_residual"].detach()[morton_order(m.params["means"].detach().numpy())]  # file order (POSITION_BITS codes)
        step = (ref.max(0).values - ref.min(0).values) / ((1 << COLOR_OFFSET_BITS) - 1)
        assert torch.all((model.color_offsets - ref).abs() <= step / 2 + 1e-6)
    else:
        assert model.color_offsets is None
    if n_features:
        ref = m.params["color_features"].detach()[morton_order(m.params["means"].detach().numpy())]
        step = (ref.max(0).values - ref.min(0).values) / ((1 << COLOR_OFFSET_BITS) - 1)
        assert model.field.extra_dim == n_features
        assert torch.all((model.color_features - ref).abs() <= step / 2 + 1e-6)
    else:
        assert model.color_features is None and model.field.extra_dim == 0
    if sh_degree:
        assert model.sh_rest.shape == (len(model), (sh_degree + 1) ** 2 - 1, 3)
    else:
        assert model.sh_rest is None
    _, cameras = sc.subset("test")
    a = m.render(cameras[0])["rgb"]
    b = model.render(cameras[0], backend="torch")["rgb"]
    assert -10 * np.log10(max(float(((a - b) ** 2).mean()), 1e-12)) >= 30.0
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[4:8], "little")])
    assert (header["color_offset_range"] is not None) == color_residual and header["sh_residual_degree"] == sh_degree
    m.export("ply", tmp_path / "s.ply")
    assert read_ply(tmp_path / "s.ply").sh.shape[1] == (sh_degree + 1) ** 2


def test_sigmoid_field_output_keeps_colour_in_range_and_gradients_alive() -> None:
    """With output='sigmoid' the field's colour 0.5 + C0·dc lies in (0, 1) whatever the MLP says, so the
    renderer's clamp at 0 never zeroes the field's gradient (the collapse seen on fern with 'linear')."""
    from fieldkit.fields.hashgrid import HashGridConfig
    from fieldkit.models.compact import SH_C0, ColorField

    grid = HashGridConfig(4, 2, 10, 4, 1.5)
    field = ColorField(grid, 16, generator=torch.Generator().manual_seed(0), output="sigmoid")
    with torch.no_grad():
        field.mlp[4].bias.fill_(-40.0)  # a linear field would be clamped black here
    means = torch.rand(50, 3) * 2 - 1
    dc = field(means, torch.tensor([0.0, 0.0, 4.0]))
    colour = 0.5 + SH_C0 * dc
    assert torch.all((colour >= 0) & (colour < 1e-6 + 1))
    colour.sum().backward()
    assert field.mlp[4].bias.grad.abs().sum() > 0
    linear = ColorField(grid, 16, generator=torch.Generator().manual_seed(0), output="linear")
    linear.load_state_dict(field.state_dict())
    with torch.no_grad():  # same weights: the sigmoid field is the linear one through (sigmoid(x) - 0.5) / C0
        raw = linear(means, torch.tensor([0.0, 0.0, 4.0]))
        torch.testing.assert_close(field(means, torch.tensor([0.0, 0.0, 4.0])), (torch.sigmoid(raw) - 0.5) / SH_C0)


def test_position_coding_morton_roundtrip_and_error_bound() -> None:
    """Morton codes decode to the exact grid coordinates, sort in Z-order, and the dequantised positions lie within
    half a grid step per axis of the originals (the documented precision of a version-2 .fkc)."""
    from fieldkit.export.compact import POSITION_BITS, dequantise_positions, morton_codes, morton_decode, morton_order, quantise_positions

    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(size=(500, 3)) * [1.0, 3.0, 0.2], [[40.0, -7.0, 1.5]]])
    for bits in (1, POSITION_BITS, 21):
        q, low, high = quantise_positions(pts, bits)
        codes = morton_codes(q, bits)
        assert np.array_equal(morton_decode(codes, bits), q)
        back = dequantise_positions(q, low, high, bits)
        step = (high - low) / ((1 << bits) - 1)
        assert np.all(np.abs(back - pts) <= step / 2 + 1e-5 * np.abs(pts) + 1e-7)
    # bit interleaving: x is the least significant bit, then y, then z
    assert morton_codes(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 0]], np.uint64), 2).tolist() == [1, 2, 4, 9]
    order = morton_order(pts)
    assert np.all(np.diff(morton_codes(quantise_positions(pts)[0], POSITION_BITS)[order].astype(np.float64)) >= 0)
    with pytest.raises(ValueError, match="64-bit"):
        morton_codes(q, 22)


def test_fkc_positions_and_version1_files_still_read(scene: Path, tmp_path: Path) -> None:
    """A version-2 file restores every position to within half a grid step of POSITION_BITS over the box; a version-1
    file (fp16 positions in a ``means`` section) written by older fieldkit still reads and renders the same."""
    import json
    import lzma
    import struct

    from fieldkit.export.compact import POSITION_BITS, morton_order, read_compact, write_compact
    from fieldkit.methods.gs_compact import CompactConfig, CompactGaussians

    sc = CompactGaussians.load_data(scene)
    m = CompactGaussians(CompactConfig(init_random_points=300, hash_log2_size=10, hash_levels=4), sc, max_steps=30, backend="torch")
    path = tmp_path / "v2.fkc"
    write_compact(path, m)
    model = read_compact(path)
    means = m.params["means"].detach().numpy()
    ref = means[morton_order(means)]
    step = float((means.max(0) - means.min(0)).max()) / ((1 << POSITION_BITS) - 1)  # one step: the box is a cube
    assert np.all(np.abs(model.means.numpy() - ref) <= step / 2 + 1e-6)

    data = path.read_bytes()
    head_len = int.from_bytes(data[4:8], "little")
    header = json.loads(data[8 : 8 + head_len])
    blobs, offset = [], 8 + head_len
    for s in header["sections"]:
        blobs.append(data[offset : offset + s["bytes"]])
        offset += s["bytes"]
    first = header["sections"][0]
    assert first["name"] == "position_deltas"
    fp16 = ref.astype("<f2")
    blobs[0] = lzma.compress(np.ascontiguousarray(fp16).view(np.uint8).reshape(-1, 2).T.tobytes())
    header["sections"][0] = {"name": "means", "dtype": "<f2", "shape": [len(ref), 3], "byte_planes": True, "bytes": len(blobs[0])}
    header["version"] = 1
    for key in ("position_bits", "position_box"):
        del header[key]
    head = json.dumps(header).encode()
    old = tmp_path / "v1.fkc"
    old.write_bytes(b"FKC1" + struct.pack("<I", len(head)) + head + b"".join(blobs))
    v1 = read_compact(old)
    assert torch.equal(v1.means, torch.from_numpy(fp16.astype(np.float32)))
    _, cameras = sc.subset("test")
    a, b = model.render(cameras[0], backend="torch")["rgb"], v1.render(cameras[0], backend="torch")["rgb"]
    assert -10 * np.log10(max(float(((a - b) ** 2).mean()), 1e-12)) >= 35.0
    header["version"] = 3
    head = json.dumps(header).encode()
    old.write_bytes(b"FKC1" + struct.pack("<I", len(head)) + head + b"".join(blobs))
    with pytest.raises(ValueError, match="version 3"):
        read_compact(old)


def test_mask_weight_shrinks_for_long_runs(scene: Path) -> None:
    """The mask loss only pushes masks down, so its weight is divided by max_steps / mask_reference_steps for runs
    longer than the reference (never raised for shorter ones; 0 turns the scaling off), and the loss uses it."""
    from fieldkit.methods.gs_compact import CompactConfig, CompactGaussians

    sc = CompactGaussians.load_data(scene)
    weights = {}
    for steps, ref in [(30, 3000), (3000, 3000), (12000, 3000), (12000, 0)]:
        cfg = CompactConfig(init_random_points=100, hash_log2_size=10, hash_levels=4, lambda_mask=0.02, mask_reference_steps=ref)
        weights[steps, ref] = CompactGaussians(cfg, sc, max_steps=steps, backend="torch").lambda_mask
    assert weights == {(30, 3000): 0.02, (3000, 3000): 0.02, (12000, 3000): pytest.approx(0.005), (12000, 0): 0.02}

    # the weight enters the loss: with the photometric part fixed, loss(λ) - loss(0) = λ · mean σ(m)
    m = CompactGaussians(CompactConfig(init_random_points=100, hash_log2_size=10, hash_levels=4), sc, max_steps=12000, backend="torch")
    with torch.no_grad():
        m.params["mask_logits"].fill_(2.0)
    m._order = [0] * 4
    state = {k: v.detach().clone() for k, v in m.params.items()}
    field = {k: v.clone() for k, v in m.field.state_dict().items()}
    losses = []
    for weight in (0.0, 0.5):
        with torch.no_grad():
            for k, v in state.items():
                m.params[k].copy_(v)
        m.field.load_state_dict(field)
        m.lambda_mask = weight
        m._order = [0]
        losses.append(m.train_step(0)["loss"])
    assert losses[1] - losses[0] == pytest.approx(0.5 * float(torch.sigmoid(torch.tensor(2.0))), rel=1e-4)

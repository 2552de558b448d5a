"""Splat file formats: Inria .ply, PlayCanvas compressed .ply, antimatter15 .splat, atomic writes."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from plyfile import PlyData, PlyElement

from fieldkit.export import SplatFormatError, inria_property_names, read_ply, read_splat, write_ply, write_splat
from fieldkit.io_atomic import atomic_path, atomic_write_bytes
from fieldkit.models.gaussians import SH_C0, Splats, sh_dc_to_rgb

GUITAR_N = 90_854
SPLAT_FIELDS = ["means", "quats", "log_scales", "opacity_logits", "sh"]


def random_splats(n: int, k: int, seed: int = 0) -> Splats:
    g = torch.Generator().manual_seed(seed)
    return Splats(
        means=torch.randn(n, 3, generator=g),
        quats=torch.randn(n, 4, generator=g),
        log_scales=torch.randn(n, 3, generator=g) - 4.0,
        opacity_logits=torch.randn(n, generator=g) * 3.0,
        sh=torch.randn(n, k, 3, generator=g),
    )


def assert_splats_equal(a: Splats, b: Splats) -> None:
    for name in SPLAT_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.float32, name
        assert x.shape == y.shape, name
        assert torch.equal(x, y), name


def header_and_body(path: Path) -> tuple[bytes, bytes]:
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    return data[:end], data[end:]


# ---------------------------------------------------------------- Inria .ply, real data


def test_guitar_ply_stats() -> None:
    splats = read_ply(shared_path("splats", "guitar_3dgs_sh0.ply"))
    assert len(splats) == GUITAR_N and splats.sh_degree == 0
    lo, hi = splats.means.min(0).values, splats.means.max(0).values
    # bbox from the data README (3 decimals).
    torch.testing.assert_close(lo, torch.tensor([-0.655, -4.292, -0.528]), atol=1e-3, rtol=0)
    torch.testing.assert_close(hi, torch.tensor([0.822, 0.086, 0.925]), atol=1e-3, rtol=0)
    median = splats.log_scales.median(0).values
    torch.testing.assert_close(median, torch.tensor([-6.27, -5.14, -5.32]), atol=6e-3, rtol=0)
    assert int((splats.opacity_logits == 40).sum()) == 667
    assert (splats.quats.norm(dim=1) - 1).abs().max() < 1e-6


def test_guitar_ply_round_trip_bit_exact(tmp_path: Path) -> None:
    src = shared_path("splats", "guitar_3dgs_sh0.ply")
    first = read_ply(src)
    out = tmp_path / "guitar.ply"
    write_ply(out, first)
    assert_splats_equal(first, read_ply(out))

    src_header, src_body = header_and_body(src)
    out_header, out_body = header_and_body(out)
    # The header is byte-identical (same property names, order, no comments).
    assert out_header == src_header
    assert out.stat().st_size == src.stat().st_size
    # The vertex block matches byte for byte except the normals: the derived file stores
    # nx = ny = nz = -0.0 on the 18,090 rows with x < 0 (sign of x times zero), whereas
    # write_ply writes +0.0 like Inria (Splats carries no normals). Every other column is identical.
    rows_src = np.frombuffer(src_body, "<u4").reshape(GUITAR_N, 17)
    rows_out = np.frombuffer(out_body, "<u4").reshape(GUITAR_N, 17)
    normals_src = rows_src[:, 3:6].view("<f4")
    assert np.all(normals_src == 0.0)
    negative_zero = np.signbit(normals_src).all(axis=1)
    assert int(negative_zero.sum()) == 18_090
    assert np.array_equal(negative_zero, rows_src[:, 0].view("<f4") < 0)
    assert np.all(rows_out[:, 3:6] == 0)  # +0.0 bit pattern
    keep = [c for c in range(17) if c not in (3, 4, 5)]
    assert np.array_equal(rows_out[:, keep], rows_src[:, keep])
    patched = rows_src.copy()
    patched[:, 3:6] = 0
    assert patched.tobytes() == out_body


def test_guitar_ply_plyfile_property_order() -> None:
    ply = PlyData.read(str(shared_path("splats", "guitar_3dgs_sh0.ply")))
    vertex = ply["vertex"]
    names = [p.name for p in vertex.properties]
    assert names == inria_property_names(0)
    assert names == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                     "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert all(p.val_dtype in ("f4", "float32") for p in vertex.properties)
    splats = read_ply(shared_path("splats", "guitar_3dgs_sh0.ply"))
    assert np.array_equal(splats.means[:, 1].numpy(), vertex["y"])
    assert np.array_equal(splats.quats[:, 0].numpy(), vertex["rot_0"])
    assert np.array_equal(splats.sh[:, 0, 2].numpy(), vertex["f_dc_2"])
    assert np.array_equal(splats.log_scales[:, 2].numpy(), vertex["scale_2"])


# ---------------------------------------------------------------- compressed .ply, real data


def test_guitar_compressed_matches_decoded_ply() -> None:
    packed = read_ply(shared_path("splats", "guitar.compressed.ply"))
    ref = read_ply(shared_path("splats", "guitar_3dgs_sh0.ply"))
    assert len(packed) == GUITAR_N and packed.sh_degree == 0
    # The reference was decoded from the same file with PlayCanvas' decompress() (float64 maths,
    # float32 storage). Tolerances are a few float32 ulps of each quantity, far below the
    # quantisation steps (position ~1.5e-3 of a chunk range, colour 1/255, rotation ~1.4e-3);
    # on x86-64 with numpy the decode is in fact bit-identical.
    torch.testing.assert_close(packed.means, ref.means, atol=1e-6, rtol=0)
    torch.testing.assert_close(packed.log_scales, ref.log_scales, atol=1e-5, rtol=0)
    torch.testing.assert_close(sh_dc_to_rgb(packed.sh), sh_dc_to_rgb(ref.sh), atol=1e-6, rtol=0)
    torch.testing.assert_close(packed.opacities, ref.opacities, atol=1e-6, rtol=0)
    assert torch.equal(packed.opacity_logits.abs() == 40, ref.opacity_logits.abs() == 40)
    same = (packed.quats - ref.quats).abs().amax(dim=1)
    flipped = (packed.quats + ref.quats).abs().amax(dim=1)
    assert torch.minimum(same, flipped).max() < 1e-6


def _pack_unorm(u: float, bits: int) -> int:
    return int(math.floor(u * ((1 << bits) - 1) + 0.5))


def test_compressed_ply_synthetic_with_sh_and_12_float_chunks(tmp_path: Path) -> None:
    """Hand-packed two-splat file: 12-float chunk (colour stored directly) and one SH band."""
    chunk = np.array([(-1.0, 0.0, 2.0, 1.0, 4.0, 6.0, -5.0, -4.0, -3.0, -1.0, -2.0, 1.0)],
                     dtype=[(n, "<f4") for n in ["min_x", "min_y", "min_z", "max_x", "max_y", "max_z",
                                                 "min_scale_x", "min_scale_y", "min_scale_z",
                                                 "max_scale_x", "max_scale_y", "max_scale_z"]])
    pos0 = (2047 << 21) | (0 << 11) | 1023
    pos1 = (0 << 21) | (1023 << 11) | 2047
    # Rotation 0: largest = x (index 1); others w, y, z = 0.5, -0.5, 0.0 (scaled by sqrt(2)/2).
    enc = [_pack_unorm(v * math.sqrt(2) / 2 + 0.5, 10) for v in (0.5, -0.5, 0.0)]
    rot0 = (1 << 30) | (enc[0] << 20) | (enc[1] << 10) | enc[2]
    rot1 = (0 << 30) | (512 << 20) | (512 << 10) | 512  # ~identity
    scale0 = (0 << 21) | (1023 << 11) | 2047
    colour0 = (255 << 24) | (0 << 16) | (51 << 8) | 204
    vertex = np.array([(pos0, rot0, scale0, colour0), (pos1, rot1, 0, 0)],
                      dtype=[(n, "<u4") for n in ["packed_position", "packed_rotation", "packed_scale", "packed_color"]])
    sh_q = np.zeros((2, 9), np.uint8)
    sh_q[0] = [0, 255, 128, 10, 20, 30, 40, 50, 60]
    sh = np.array([tuple(r) for r in sh_q], dtype=[(f"f_rest_{i}", "u1") for i in range(9)])
    path = tmp_path / "tiny.compressed.ply"
    PlyData([PlyElement.describe(chunk, "chunk"), PlyElement.describe(vertex, "vertex"),
             PlyElement.describe(sh, "sh")]).write(str(path))

    s = read_ply(path)
    assert len(s) == 2 and s.sh_degree == 1
    torch.testing.assert_close(s.means[0], torch.tensor([1.0, 0.0, 2.0 + 4.0 * 1023 / 2047]))
    torch.testing.assert_close(s.means[1], torch.tensor([-1.0, 4.0, 6.0]))
    torch.testing.assert_close(s.log_scales[0], torch.tensor([-5.0, -2.0, 1.0]))
    torch.testing.assert_close(s.log_scales[1], torch.tensor([-5.0, -4.0, -3.0]))
    # x = sqrt(1 - 0.25 - 0.25) up to 10-bit rounding; (w, x, y, z) order.
    torch.testing.assert_close(s.quats[0], torch.tensor([0.5, math.sqrt(0.5), -0.5, 0.0]), atol=2e-3, rtol=0)
    torch.testing.assert_close(s.quats[1], torch.tensor([1.0, 0.0, 0.0, 0.0]), atol=2e-3, rtol=0)
    torch.testing.assert_close(sh_dc_to_rgb(s.sh[0, 0]), torch.tensor([1.0, 0.0, 0.2]))
    torch.testing.assert_close(s.opacities, torch.tensor([0.8, 1 / (1 + math.exp(40))]))
    # SH: v = q * 8/255 - 4, channel-major: f_rest_{c*3 + k-1} -> sh[:, k, c].
    expected = torch.tensor(sh_q[0], dtype=torch.float64) * 8 / 255 - 4
    torch.testing.assert_close(s.sh[0, 1:, :], expected.reshape(3, 3).T.float())
    torch.testing.assert_close(s.sh[1, 1:, :], torch.full((3, 3), -4.0))


# ---------------------------------------------------------------- Inria .ply, synthetic


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_ply_round_trip_exact(tmp_path: Path, degree: int) -> None:
    splats = random_splats(257, (degree + 1) ** 2, seed=degree)
    path = tmp_path / "s.ply"
    write_ply(path, splats)
    back = read_ply(path)
    assert back.sh_degree == degree
    assert_splats_equal(splats, back)
    assert path.stat().st_size == len(header_and_body(path)[0]) + 257 * 4 * (14 + 3 * (degree + 1) ** 2)


def test_empty_splats_round_trip(tmp_path: Path) -> None:
    empty = random_splats(0, 4)
    write_ply(tmp_path / "e.ply", empty)
    assert_splats_equal(empty, read_ply(tmp_path / "e.ply"))
    write_splat(tmp_path / "e.splat", empty)
    assert (tmp_path / "e.splat").stat().st_size == 0 and len(read_splat(tmp_path / "e.splat")) == 0


def test_ply_f_rest_channel_major_order(tmp_path: Path) -> None:
    n, k = 5, 16
    coef = torch.arange(k, dtype=torch.float32).view(1, k, 1)
    chan = torch.arange(3, dtype=torch.float32).view(1, 1, 3)
    row = torch.arange(n, dtype=torch.float32).view(n, 1, 1)
    sh = 1000 * row + 10 * coef + chan  # encodes (row, coefficient, channel)
    splats = random_splats(n, k)
    splats.sh = sh
    path = tmp_path / "order.ply"
    write_ply(path, splats)

    vertex = PlyData.read(str(path))["vertex"]
    names = [p.name for p in vertex.properties]
    assert names == inria_property_names(3)
    assert len(names) == 62 and names[9] == "f_rest_0" and names[53] == "f_rest_44" and names[54] == "opacity"
    for c in range(3):
        assert np.array_equal(vertex[f"f_dc_{c}"], 1000 * np.arange(n) + c)
        for kk in range(1, k):
            # R_1..R_15, G_1..G_15, B_1..B_15
            assert np.array_equal(vertex[f"f_rest_{c * 15 + kk - 1}"], 1000 * np.arange(n) + 10 * kk + c)
    for name in ("nx", "ny", "nz"):
        assert np.array_equal(vertex[name], np.zeros(n, np.float32))
    assert np.array_equal(vertex["rot_0"], splats.quats[:, 0].numpy())
    assert np.array_equal(vertex["opacity"], splats.opacity_logits.numpy())
    assert torch.equal(read_ply(path).sh, sh)


def test_ply_reads_any_property_order_and_ignores_extras(tmp_path: Path) -> None:
    splats = random_splats(17, 4, seed=3)
    ref = tmp_path / "ref.ply"
    write_ply(ref, splats)
    data = PlyData.read(str(ref))["vertex"].data
    names = list(data.dtype.names)
    rng = np.random.default_rng(0)
    shuffled = [names[i] for i in rng.permutation(len(names))]
    dtype = [(name, "<f4") for name in shuffled] + [("red", "u1"), ("confidence", "<f8")]
    out = np.zeros(len(data), dtype=dtype)
    for name in shuffled:
        out[name] = data[name]
    out["red"] = 7
    path = tmp_path / "shuffled.ply"
    PlyData([PlyElement.describe(out, "vertex")], text=False).write(str(path))
    assert_splats_equal(splats, read_ply(path))
    # ASCII PLY and gsplat's layout without normals read the same way.
    PlyData([PlyElement.describe(out, "vertex")], text=True).write(str(tmp_path / "ascii.ply"))
    torch.testing.assert_close(read_ply(tmp_path / "ascii.ply").sh, splats.sh, atol=1e-6, rtol=1e-6)
    write_ply(tmp_path / "nonormals.ply", splats, normals=False)
    assert "nx" not in [p.name for p in PlyData.read(str(tmp_path / "nonormals.ply"))["vertex"].properties]
    assert_splats_equal(splats, read_ply(tmp_path / "nonormals.ply"))


def test_ply_missing_properties_error_names_file(tmp_path: Path) -> None:
    points = np.zeros(3, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1")])
    path = tmp_path / "pointcloud.ply"
    PlyData([PlyElement.describe(points, "vertex")]).write(str(path))
    with pytest.raises(SplatFormatError, match="pointcloud.ply") as info:
        read_ply(path)
    assert isinstance(info.value, ValueError)
    assert "f_dc_0" in str(info.value) and "opacity" in str(info.value)

    bad_rest = tmp_path / "badrest.ply"
    splats = random_splats(2, 1)
    write_ply(bad_rest, splats)
    data = PlyData.read(str(bad_rest))["vertex"].data
    extra = np.zeros(2, dtype=data.dtype.descr + [("f_rest_0", "<f4"), ("f_rest_1", "<f4")])
    PlyData([PlyElement.describe(extra, "vertex")]).write(str(bad_rest))
    with pytest.raises(SplatFormatError, match="badrest.ply"):
        read_ply(bad_rest)

    garbage = tmp_path / "garbage.ply"
    garbage.write_bytes(b"not a ply at all")
    with pytest.raises(SplatFormatError, match="garbage.ply"):
        read_ply(garbage)


# ---------------------------------------------------------------- .splat


def known_splats() -> Splats:
    ln2 = math.log(2.0)
    return Splats(
        means=torch.tensor([[1.0, 2.0, 3.0], [-0.5, 0.25, 8.0], [0.0, 0.0, 0.0]]),
        quats=torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, -3.0, 0.0]]),
        # volumes exp(sum): 1, 8, 1/8; times alpha below -> 0.5, 8*0.8808, 0.125*0.9999
        log_scales=torch.tensor([[0.0, ln2, -ln2], [ln2, ln2, ln2], [-ln2, -ln2, -ln2]]),
        opacity_logits=torch.tensor([0.0, 2.0, 10.0]),
        sh=torch.tensor([[[0.0, (0.9 - 0.5) / SH_C0, 10.0]], [[-10.0, 0.0, 1.0]], [[0.5, 0.5, 0.5]]]),
    )


def test_splat_record_bytes_and_order(tmp_path: Path) -> None:
    splats = known_splats()
    path = tmp_path / "known.splat"
    write_splat(path, splats)
    data = path.read_bytes()
    assert len(data) == 32 * 3  # no header
    # Descending exp(s0+s1+s2) * sigmoid(opacity): 8 * 0.881 = 7.05, then 1 * 0.5, then 0.125 * 1.0.
    records = [data[i * 32:(i + 1) * 32] for i in range(3)]
    assert [struct.unpack("<3f", r[:12]) for r in records] == [(-0.5, 0.25, 8.0), (1.0, 2.0, 3.0), (0.0, 0.0, 0.0)]

    r = records[1]  # the Gaussian at (1, 2, 3)
    assert r[0:12] == struct.pack("<3f", 1.0, 2.0, 3.0)
    assert r[12:24] == struct.pack("<3f", 1.0, 2.0, 0.5)  # linear scales
    # R: 0.5*255 = 127.5 -> 127; G: 0.9*255 = 229.5 -> 229; B: clipped 255; A: sigmoid(0)*255 = 127.5 -> 127.
    assert list(r[24:28]) == [127, 229, 255, 127]
    # q = (1,0,0,0): w -> 128 + 128 = 256 clipped to 255, others 128.
    assert list(r[28:32]) == [255, 128, 128, 128]

    r = records[0]  # q = (1,1,0,0)/sqrt2: 128 + 90.51 -> 218; colour R clipped to 0, G 127, B (0.5+C0)*255 = 199.43 -> 199
    assert list(r[28:32]) == [218, 218, 128, 128]
    assert list(r[24:28]) == [0, 127, 199, int(255 / (1 + math.exp(-2.0)))]
    r = records[2]  # q = (0,0,-1,0) -> (128,128,0,128)
    assert list(r[28:32]) == [128, 128, 0, 128]
    assert r[12:24] == struct.pack("<3f", 0.5, 0.5, 0.5)


def test_splat_round_trip_within_quantisation(tmp_path: Path) -> None:
    splats = random_splats(1000, 16, seed=5)
    splats.sh[:, 0] = torch.rand(1000, 3) * 2 - 1  # keep colours mostly inside [0, 1]
    path = tmp_path / "r.splat"
    write_splat(path, splats)
    assert path.stat().st_size // 32 == 1000 and path.stat().st_size % 32 == 0
    back = read_splat(path)
    assert back.sh_degree == 0 and len(back) == 1000

    key = torch.exp(splats.log_scales.double().sum(1)) * torch.sigmoid(splats.opacity_logits.double())
    order = torch.from_numpy(np.argsort(-key.numpy(), kind="stable"))
    src = splats[order]
    assert torch.equal(back.means, src.means)  # positions are exact, so this pins the sort order
    torch.testing.assert_close(back.log_scales, src.log_scales, atol=1e-6, rtol=1e-6)
    rgb, rgb_src = sh_dc_to_rgb(back.sh[:, 0]), sh_dc_to_rgb(src.sh[:, 0]).clamp(0, 1)
    err = rgb_src - rgb  # truncation: 0 <= err < 1/255
    assert err.min() >= -1e-6 and err.max() < 1 / 255 + 1e-6
    err = src.opacities - back.opacities
    assert err.min() >= -1e-6 and err.max() < 1 / 255 + 1e-6
    q, q_src = back.unit_quats, src.unit_quats
    diff = torch.minimum((q - q_src).abs().amax(1), (q + q_src).abs().amax(1))
    assert diff.max() < 2.5 / 128


def test_splat_rejects_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.splat"
    path.write_bytes(b"\0" * 33)
    with pytest.raises(SplatFormatError, match="bad.splat"):
        read_splat(path)


# ---------------------------------------------------------------- atomic writes


def test_atomic_path_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "model.ply"
    target.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_bytes(b"half written")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ply"]


def test_atomic_write_failing_writer_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fieldkit.export.ply as ply_module

    target = tmp_path / "out.ply"
    write_ply(target, random_splats(3, 1))
    before = target.read_bytes()

    def fail(_: object) -> memoryview:
        raise OSError("disk full")

    # write_ply has written the header when it wraps the vertex block: fail right there.
    monkeypatch.setattr(ply_module, "memoryview", fail, raising=False)
    with pytest.raises(OSError, match="disk full"):
        write_ply(target, random_splats(3, 1, seed=1))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.ply"]


def test_atomic_write_success_replaces_with_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"x")
    atomic_write_bytes(target, b"new bytes")
    assert target.read_bytes() == b"new bytes"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]

"""The ``.fkc`` compressed file of a Compact Gaussians model (layout: docs/compact.md).

``write_compact(path, method)`` stores the live (unmasked) Gaussians of a ``gs-compact`` method:
positions quantised to ``POSITION_BITS`` per axis and stored as delta-coded Morton codes (so the Gaussians
are in Morton order; version-1 files stored fp16 positions and still read), 8-bit opacity, residual-VQ indices of scale and
rotation (+ fp16 codebooks), the 8-bit hash grid and fp16 MLP of the colour field, each section
LZMA-coded. ``read_compact(path)`` returns a :class:`CompactModel` that renders like the method.
"""

from __future__ import annotations

import json
import lzma
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fieldkit.cameras import Cameras
from fieldkit.fields.hashgrid import HashGridConfig
from fieldkit.io_atomic import atomic_path
from fieldkit.models.compact import MASK_EPS, ColorField, ResidualVQ, gaussian_sh, lookup_codebooks

MAGIC = b"FKC1"
COLOR_OFFSET_BITS = 6
"""Quantisation levels of the per-Gaussian colour offsets: 2^6 - 1 steps over each channel's range (on lego
6 bits cost 0.005 dB against 8 bits and save about 30 % of the section)."""
HASH_ZERO_THRESHOLD = 0.0
"""Hash-grid values with |v| below this are zeroed before 8-bit quantisation (Compact-3DGS: 0.1;
0 here because short CPU runs leave most table entries small; see docs/compact.md)."""


POSITION_BITS = 13
"""Bits per axis of the stored positions (uniform over the Gaussians' box). 13 bits: the largest error is at most
half fp16's worst case on any box that holds the origin, and on lego it renders 0.004 dB better than fp16 at 28 % fewer bytes."""


def quantise_positions(points: np.ndarray, bits: int = POSITION_BITS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions -> integer grid coordinates [N,3] (uint64, ``bits`` per axis), and the low / high corners of the grid's
    cube: it starts at the points' lower corner and is as wide as their longest side, so one step serves every axis
    (a per-axis box costs 7 % more bytes on lego for precision the short axes do not need)."""
    points = np.asarray(points, np.float64).reshape(-1, 3)
    if len(points) == 0:
        return np.zeros((0, 3), np.uint64), np.zeros(3), np.zeros(3)
    low = points.min(0)
    high = low + float((points.max(0) - low).max())
    q = np.round((points - low) / np.maximum(high - low, 1e-30) * ((1 << bits) - 1))
    return q.astype(np.uint64), low, high


def dequantise_positions(q: np.ndarray, low: np.ndarray, high: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`quantise_positions` (to within half a grid step per axis)."""
    return (np.asarray(low, np.float64) + q.astype(np.float64) / ((1 << bits) - 1) * (np.asarray(high, np.float64) - low)).astype(np.float32)


def morton_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Interleave the bits of grid coordinates [N,3] (x, y, z from the least significant bit) into uint64 codes."""
    if 3 * bits > 64:
        raise ValueError(f"{bits} bits per axis do not fit a 64-bit Morton code")
    code = np.zeros(len(q), np.uint64)
    for b in range(bits):
        for axis in range(3):
            code |= ((q[:, axis] >> np.uint64(b)) & np.uint64(1)) << np.uint64(3 * b + axis)
    return code


def morton_decode(codes: np.ndarray, bits: int) -> np.ndarray:
    """Grid coordinates [N,3] of Morton codes (inverse of :func:`morton_codes`)."""
    q = np.zeros((len(codes), 3), np.uint64)
    for b in range(bits):
        for axis in range(3):
            q[:, axis] |= ((codes >> np.uint64(3 * b + axis)) & np.uint64(1)) << np.uint64(b)
    return q


def morton_order(points: np.ndarray, bits: int = POSITION_BITS) -> np.ndarray:
    """Stable argsort of the Morton (Z-order) codes of points quantised to ``bits`` per axis over their box
    (the order in which a ``.fkc`` stores its Gaussians)."""
    return np.argsort(morton_codes(quantise_positions(points, bits)[0], bits), kind="stable")


def _quantise_u8(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = float(values.min()) if values.size else 0.0, float(values.max()) if values.size else 1.0
    span = max(hi - lo, 1e-12)
    return np.round((values - lo) / span * 255).astype(np.uint8), lo, hi


def _dequantise_u8(q: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + q.astype(np.float32) / 255 * (hi - lo)


def _quantise_channels(x: np.ndarray, bits: int) -> tuple[np.ndarray, list[list[float]]]:
    """[N,C] -> channel-major uint8 [C,N] with 2^bits - 1 steps over each channel's own range, and [lo, hi] per channel."""
    lo, hi = (x.min(0), x.max(0)) if len(x) else (np.zeros(x.shape[1]), np.ones(x.shape[1]))
    q = np.round((x - lo) / np.maximum(hi - lo, 1e-12) * ((1 << bits) - 1)).astype(np.uint8)
    return np.ascontiguousarray(q.T), [np.asarray(lo, np.float32).tolist(), np.asarray(hi, np.float32).tolist()]


def _dequantise_channels(q: np.ndarray, value_range: list[list[float]], bits: int) -> Tensor:
    """Inverse of :func:`_quantise_channels`: channel-major [C,N] -> [N,C] float32."""
    lo, hi = (np.array(v, np.float32) for v in value_range)
    return torch.from_numpy(lo + q.T.astype(np.float32) / ((1 << bits) - 1) * (hi - lo))


def _byte_planes(a: np.ndarray) -> bytes:
    """Bytes of a little-endian array regrouped plane by plane (all low bytes, then high bytes...)."""
    raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1, a.dtype.itemsize)
    return raw.T.tobytes()


def _from_byte_planes(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    item = np.dtype(dtype).itemsize
    raw = np.frombuffer(data, np.uint8).reshape(item, -1).T
    return np.ascontiguousarray(raw).view(dtype).reshape(shape)


@torch.no_grad()
def write_compact(path: Path, method, hash_zero_threshold: float = HASH_ZERO_THRESHOLD, position_bits: int = POSITION_BITS) -> dict[str, int]:
    """Write ``method`` (a CompactGaussians) to ``path``; returns compressed bytes per section."""
    if not 1 <= position_bits <= 21:
        raise ValueError(f"position_bits must be in 1..21, got {position_bits}")
    p = {k: v.detach().cpu().float() for k, v in method.params.items()}
    live = torch.sigmoid(p["mask_logits"]) > MASK_EPS
    q, box_low, box_high = quantise_positions(p["means"][live].numpy(), position_bits)
    codes = morton_codes(q, position_bits)
    order = np.argsort(codes, kind="stable")
    codes = codes[order]
    scales = torch.exp(p["log_scales"][live])[order]
    quats = p["quats"][live][order]
    quats = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    opacity = torch.sigmoid(p["opacity_logits"][live])[order].numpy()
    offsets = p["color_residual"][live][order].numpy() if "color_residual" in p else None
    features = p["color_features"][live][order].numpy() if "color_features" in p else None
    sh_degree = int(getattr(method.config, "sh_residual_degree", 0))

    rvqs = []
    quantised = [("scale", method.rvq_scale, scales), ("rot", method.rvq_rot, quats)]
    if sh_degree > 0:
        quantised.append(("sh", method.rvq_sh, p["sh_residual"][live][order].flatten(1)))
    for name, vq, x in quantised:
        vq = vq.cpu() if method.rvq_active else None
        if vq is None:  # trained without VQ (short run): fit the quantiser now
            cfg = method.config
            vq = ResidualVQ(x.shape[1], cfg.rvq_stages, cfg.rvq_codebook_size)
            vq.init_kmeans(x, cfg.rvq_kmeans_iters, torch.Generator().manual_seed(0))
        idx = vq.indices(x).numpy()
        rvqs.append((name, vq.codebooks.detach().cpu().numpy().astype(np.float16), idx.astype(np.uint8 if vq.codebooks.shape[1] <= 256 else np.uint16)))
    for _, vq, _ in quantised:
        vq.to(method.device)

    table = method.field.grid.params.detach().cpu().float().numpy()
    table = np.where(np.abs(table) < hash_zero_threshold, 0.0, table).astype(np.float32)
    table_q, t_lo, t_hi = _quantise_u8(table)
    op_q = np.round(np.clip(opacity, 0, 1) * 255).astype(np.uint8)
    mlp = {k: v.detach().cpu().numpy().astype(np.float16) for k, v in method.field.mlp.state_dict().items()}

    sections: list[tuple[str, bytes, str, tuple[int, ...], bool]] = [
        # sorted Morton codes as differences from the previous code (small numbers: neighbours are close)
        ("position_deltas", _byte_planes(np.diff(codes, prepend=np.uint64(0)).astype("<u8")), "<u8", codes.shape, True),
        ("opacity", op_q.tobytes(), "u1", op_q.shape, False),
    ]
    for name, codebooks, idx in rvqs:
        sections.append((f"{name}_codebooks", codebooks.astype("<f2").tobytes(), "<f2", codebooks.shape, False))
        sections.append((f"{name}_indices", np.ascontiguousarray(idx.T).tobytes(), idx.dtype.str, idx.T.shape, False))  # stage-major
    sections.append(("hash_table", table_q.tobytes(), "u1", table_q.shape, False))
    offset_range = feature_range = None
    if offsets is not None:
        off_q, offset_range = _quantise_channels(offsets, COLOR_OFFSET_BITS)
        sections.append(("color_offset", off_q.tobytes(), "u1", off_q.shape, False))
    if features is not None:
        feat_q, feature_range = _quantise_channels(features, COLOR_OFFSET_BITS)
        sections.append(("color_features", feat_q.tobytes(), "u1", feat_q.shape, False))
    for k, v in mlp.items():
        sections.append((f"mlp.{k}", v.astype("<f2").tobytes(), "<f2", v.shape, False))

    grid = method.field.grid.config
    header = {
        "version": 2,
        "count": int(len(codes)),
        "position_bits": position_bits,
        "position_box": [box_low.tolist(), box_high.tolist()],
        "hash_grid": {"n_levels": grid.n_levels, "n_features_per_level": grid.n_features_per_level,
                      "log2_hashmap_size": grid.log2_hashmap_size, "base_resolution": grid.base_resolution,
                      "per_level_scale": grid.per_level_scale},
        "hash_range": [t_lo, t_hi],
        "mlp_hidden": int(method.field.mlp[0].out_features),
        "field_output": method.field.output,
        "center": method.field.center.cpu().tolist(),
        "half_extent": method.field.half_extent.cpu().tolist(),
        "background": method.background.cpu().tolist(),
        "color_offset_range": offset_range,
        "color_offset_bits": COLOR_OFFSET_BITS,
        "color_features_range": feature_range,
        "sh_residual_degree": sh_degree,
        "sections": [],
    }
    blobs, sizes = [], {}
    for name, raw, dtype, shape, planes in sections:
        blob = lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)
        blobs.append(blob)
        sizes[name] = len(blob)
        header["sections"].append({"name": name, "dtype": dtype, "shape": list(shape), "byte_planes": planes, "bytes": len(blob)})
    head = json.dumps(header, separators=(",", ":")).encode()
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(head)) + head)
            for blob in blobs:
                f.write(blob)
    return sizes


@dataclass
class CompactModel:
    """A decoded ``.fkc``: fixed geometry plus the colour field; ``render`` matches the method's."""

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    field: ColorField
    background: Tensor
    color_offsets: Tensor | None = None
    """Per-Gaussian offsets added to the field's colour (runs trained with ``--gs-compact.color-residual``)."""
    sh_rest: Tensor | None = None
    """Per-Gaussian SH coefficients of degrees 1..D [N, (D+1)^2-1, 3] (``--gs-compact.sh-residual-degree``)."""
    color_features: Tensor | None = None
    """Per-Gaussian inputs of the colour MLP [N, F] (``--gs-compact.color-features F``)."""

    def __len__(self) -> int:
        return self.means.shape[0]

    @torch.no_grad()
    def render(self, cameras: Cameras, backend: str = "auto") -> dict[str, Tensor]:
        from fieldkit.render import rasterize

        rgbs = []
        for i in range(len(cameras)):
            cam = cameras[i]
            sh = gaussian_sh(self.field(self.means, cam.centers[0].to(self.means), self.color_features), self.color_offsets, self.sh_rest)
            degree = 0 if self.sh_rest is None else int(round((self.sh_rest.shape[1] + 1) ** 0.5)) - 1
            out = rasterize(self.means, self.quats, self.scales, self.opacities, sh, cam, sh_degree=degree,
                            background=self.background, backend=backend)
            rgbs.append(out.rgb)
        return {"rgb": torch.cat(rgbs).clamp(0, 1)}


def read_compact(path: Path) -> CompactModel:
    data = Path(path).read_bytes()
    if data[:4] != MAGIC:
        raise ValueError(f"{path}: not a fieldkit compact file (magic {data[:4]!r})")
    (head_len,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8 : 8 + head_len])
    if header.get("version") not in (1, 2):
        raise ValueError(f"{path}: .fkc version {header.get('version')!r} is not supported (this reader knows 1 and 2)")
    offset = 8 + head_len
    arrays: dict[str, np.ndarray] = {}
    for s in header["sections"]:
        raw = lzma.decompress(data[offset : offset + s["bytes"]])
        offset += s["bytes"]
        shape = tuple(s["shape"])
        arrays[s["name"]] = _from_byte_planes(raw, s["dtype"], shape) if s["byte_planes"] else np.frombuffer(raw, s["dtype"]).reshape(shape)
    if "means" in arrays:  # version 1: fp16 positions
        means = torch.from_numpy(arrays["means"].astype(np.float32))
    else:  # version 2: sorted Morton codes of the quantised positions, delta coded
        bits = header["position_bits"]
        codes = np.cumsum(arrays["position_deltas"].astype(np.uint64), dtype=np.uint64)
        low, high = (np.array(v, np.float64) for v in header["position_box"])
        means = torch.from_numpy(dequantise_positions(morton_decode(codes, bits), low, high, bits))
    opac = torch.from_numpy(arrays["opacity"].astype(np.float32) / 255)
    scales = lookup_codebooks(torch.from_numpy(arrays["scale_codebooks"].astype(np.float32)), torch.from_numpy(arrays["scale_indices"].T.astype(np.int64)))
    quats = lookup_codebooks(torch.from_numpy(arrays["rot_codebooks"].astype(np.float32)), torch.from_numpy(arrays["rot_indices"].T.astype(np.int64)))
    bits = header.get("color_offset_bits", 8)
    offsets = _dequantise_channels(arrays["color_offset"], header["color_offset_range"], bits) if "color_offset" in arrays else None
    features = _dequantise_channels(arrays["color_features"], header["color_features_range"], bits) if "color_features" in arrays else None
    grid = HashGridConfig(**header["hash_grid"])
    field = ColorField(grid, header["mlp_hidden"], torch.tensor(header["center"]), torch.tensor(header["half_extent"]),
                       output=header.get("field_output", "linear"), extra_dim=0 if features is None else features.shape[1])
    lo, hi = header["hash_range"]
    with torch.no_grad():
        field.grid.params.copy_(torch.from_numpy(_dequantise_u8(arrays["hash_table"], lo, hi)))
        field.mlp.load_state_dict({k[4:]: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items() if k.startswith("mlp.")})
    sh_rest = None
    if header.get("sh_residual_degree", 0) > 0:
        flat = lookup_codebooks(torch.from_numpy(arrays["sh_codebooks"].astype(np.float32)), torch.from_numpy(arrays["sh_indices"].T.astype(np.int64)))
        sh_rest = flat.view(len(means), -1, 3)
    return CompactModel(means, quats, scales.clamp_min(0), opac, field, torch.tensor(header["background"]), offsets, sh_rest, features)

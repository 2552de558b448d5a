"""Gaussian splats as PLY: the Inria 3DGS layout (read/write) and the PlayCanvas compressed PLY (read).

Inria layout (reference ``gaussian-splatting.md`` §3.1): one ``element vertex`` with float32
properties ``x y z nx ny nz f_dc_0..2 f_rest_0..f_rest_{3(K-1)-1} opacity scale_0..2 rot_0..3``,
pre-activation values (opacity = logit, scale = log, rot = unnormalised w,x,y,z), normals zero.
``f_rest`` is channel-major: ``f_rest_{c*(K-1) + (k-1)} = sh[:, k, c]`` for k = 1..K-1.

PlayCanvas / SuperSplat compressed layout (§3.2): ``element chunk`` (18 or 12 float32 per block of
256 splats) + ``element vertex`` with four packed uint32 + optional ``element sh`` (uchar f_rest).
It is decoded the way the PlayCanvas engine decompresses it (``GSplatCompressedData.decompress``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement, PlyParseError

from fieldkit.io_atomic import atomic_path
from fieldkit.models.gaussians import SH_C0, Splats, sh_coeff_count, sh_degree_from_count

__all__ = [
    "SplatFormatError",
    "inria_property_names",
    "read_ply",
    "write_ply",
    "alpha_to_logit",
]

PathLike = str | os.PathLike[str]

_REQUIRED = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
_PACKED = ["packed_position", "packed_rotation", "packed_scale", "packed_color"]
_CHUNK18 = ["min_x", "min_y", "min_z", "max_x", "max_y", "max_z",
            "min_scale_x", "min_scale_y", "min_scale_z", "max_scale_x", "max_scale_y", "max_scale_z",
            "min_r", "min_g", "min_b", "max_r", "max_g", "max_b"]
_F_REST = re.compile(r"^f_rest_(\d+)$")

# Opacity logit used for alpha exactly 0 or 1 (PlayCanvas' decompress() uses the same +-40).
LOGIT_LIMIT = 40.0


class SplatFormatError(ValueError):
    """A splat file is malformed or lacks what the reader needs; the message names the file."""


def inria_property_names(sh_degree: int, normals: bool = True) -> list[str]:
    """Vertex property names of the Inria 3DGS PLY, in file order, for SH degree ``sh_degree``."""
    n_rest = 3 * (sh_coeff_count(sh_degree) - 1)
    names = ["x", "y", "z"]
    if normals:
        names += ["nx", "ny", "nz"]
    names += ["f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(n_rest)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


def _numpy32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


def _inria_rows(splats: Splats, normals: bool) -> np.ndarray:
    """[N, P] little-endian float32 rows in Inria property order."""
    n, k = len(splats), splats.sh.shape[1]
    sh = _numpy32(splats.sh)
    # [N,K-1,3] -> [N,3,K-1] -> [N,3(K-1)]: all R coefficients, then G, then B.
    rest = sh[:, 1:, :].transpose(0, 2, 1).reshape(n, 3 * (k - 1))
    parts = [_numpy32(splats.means)]
    if normals:
        parts.append(np.zeros((n, 3), np.float32))
    parts += [sh[:, 0, :], rest, _numpy32(splats.opacity_logits)[:, None],
              _numpy32(splats.log_scales), _numpy32(splats.quats)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype="<f4")


def write_ply(path: PathLike, splats: Splats, *, normals: bool = True) -> None:
    """Write ``splats`` as a binary little-endian Inria 3DGS PLY (atomically).

    ``normals=False`` drops ``nx ny nz`` (gsplat's 59-float variant); the default keeps them
    as zeros, which is what viewers expecting the Inria layout read.
    """
    names = inria_property_names(splats.sh_degree, normals)
    rows = _inria_rows(splats, normals)
    header = "ply\nformat binary_little_endian 1.0\n"
    header += f"element vertex {len(splats)}\n"
    header += "".join(f"property float {name}\n" for name in names)
    header += "end_header\n"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(memoryview(rows.reshape(-1).view(np.uint8)))


def alpha_to_logit(alpha: np.ndarray) -> np.ndarray:
    """logit(alpha) in float64, with alpha <= 0 -> -40 and alpha >= 1 -> +40 (PlayCanvas' rule)."""
    a = np.asarray(alpha, dtype=np.float64)
    inside = (a > 0) & (a < 1)
    safe = np.where(inside, a, 0.5)
    out = -np.log(1.0 / safe - 1.0)
    return np.where(inside, out, np.where(a <= 0, -LOGIT_LIMIT, LOGIT_LIMIT))


def _columns(path: Path, element: PlyElement, names: list[str], dtype: type = np.float64) -> np.ndarray:
    present = {p.name for p in element.properties}
    missing = [n for n in names if n not in present]
    if missing:
        raise SplatFormatError(
            f"{path}: element '{element.name}' lacks required properties {missing} "
            f"(has {sorted(present)}); expected an Inria 3DGS or PlayCanvas compressed splat PLY"
        )
    return np.stack([np.asarray(element.data[n], dtype=dtype) for n in names], axis=1)


def _rest_names(path: Path, element: PlyElement) -> list[str]:
    """The element's ``f_rest_*`` names sorted by index; checks they form a valid SH layout."""
    found = sorted((int(m.group(1)), p.name) for p in element.properties if (m := _F_REST.match(p.name)))
    idx = [i for i, _ in found]
    if idx != list(range(len(idx))) or len(idx) % 3 != 0:
        raise SplatFormatError(f"{path}: f_rest_* properties must be f_rest_0..f_rest_{{3m-1}}, got indices {idx[:8]}...")
    try:
        sh_degree_from_count(len(idx) // 3 + 1)
    except ValueError as exc:
        raise SplatFormatError(f"{path}: {len(idx)} f_rest_* values is not 3*((degree+1)^2-1)") from exc
    return [name for _, name in found]


def _rest_to_sh(rest: np.ndarray) -> np.ndarray:
    """Channel-major [N, 3m] -> [N, m, 3]."""
    n, m = rest.shape
    return rest.reshape(n, 3, m // 3).transpose(0, 2, 1)


def _to_splats(means: np.ndarray, quats: np.ndarray, log_scales: np.ndarray,
               logits: np.ndarray, sh: np.ndarray) -> Splats:
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return Splats(means=t(means), quats=t(quats), log_scales=t(log_scales), opacity_logits=t(logits), sh=t(sh))


def _read_inria(path: Path, vertex: PlyElement) -> Splats:
    rest_names = _rest_names(path, vertex)
    # Cast each property to float32 as stored (no float64 detour, so float32 files stay bit-exact).
    base = _columns(path, vertex, _REQUIRED, np.float32)
    n = base.shape[0]
    rest = _columns(path, vertex, rest_names, np.float32) if rest_names else np.zeros((n, 0), np.float32)
    sh = np.concatenate([base[:, None, 3:6], _rest_to_sh(rest)], axis=1)
    return _to_splats(base[:, 0:3], base[:, 10:14], base[:, 7:10], base[:, 6], sh)


def _unorm(bits: np.ndarray, shift: int, width: int) -> np.ndarray:
    mask = (1 << width) - 1
    return ((bits >> np.uint32(shift)) & np.uint32(mask)).astype(np.float64) / mask


def _lerp(lo: np.ndarray, hi: np.ndarray, u: np.ndarray) -> np.ndarray:
    return lo * (1.0 - u) + hi * u


def _unpack_111011(bits: np.ndarray) -> np.ndarray:
    return np.stack([_unorm(bits, 21, 11), _unorm(bits, 11, 10), _unorm(bits, 0, 11)], axis=1)


def _unpack_rotation(bits: np.ndarray) -> np.ndarray:
    """2-bit index of the largest |component| (w,x,y,z order) + three 10-bit others -> [N,4] wxyz."""
    others = np.stack([(_unorm(bits, s, 10) - 0.5) * math.sqrt(2.0) for s in (20, 10, 0)], axis=1)
    largest = np.sqrt(np.maximum(0.0, 1.0 - (others**2).sum(axis=1)))
    index = (bits >> np.uint32(30)).astype(np.int64)
    rows = np.arange(bits.shape[0])
    quats = np.empty((bits.shape[0], 4), np.float64)
    for k in range(4):
        src = np.clip(np.where(index < k, k - 1, k), 0, 2)
        quats[:, k] = np.where(index == k, largest, others[rows, src])
    return quats


def _read_compressed(path: Path, ply: PlyData) -> Splats:
    vertex, chunk = ply["vertex"], ply["chunk"]
    n = vertex.count
    chunk_names = {p.name for p in chunk.properties}
    with_colour_bounds = all(name in chunk_names for name in _CHUNK18[12:])
    bounds = _columns(path, chunk, _CHUNK18 if with_colour_bounds else _CHUNK18[:12])
    if chunk.count != (n + 255) // 256:
        raise SplatFormatError(f"{path}: {chunk.count} chunks for {n} splats, expected ceil(N/256) = {(n + 255) // 256}")
    packed = _columns(path, vertex, _PACKED, np.uint32)
    ch = bounds[np.arange(n) // 256]

    pos = _unpack_111011(packed[:, 0])
    means = _lerp(ch[:, 0:3], ch[:, 3:6], pos)
    quats = _unpack_rotation(packed[:, 1])
    log_scales = _lerp(ch[:, 6:9], ch[:, 9:12], _unpack_111011(packed[:, 2]))
    colour = np.stack([_unorm(packed[:, 3], s, 8) for s in (24, 16, 8, 0)], axis=1)
    rgb = _lerp(ch[:, 12:15], ch[:, 15:18], colour[:, :3]) if with_colour_bounds else colour[:, :3]
    dc = (rgb - 0.5) / SH_C0
    logits = alpha_to_logit(colour[:, 3])

    sh = dc[:, None, :]
    if "sh" in ply:
        element = ply["sh"]
        if element.count != n:
            raise SplatFormatError(f"{path}: element sh has {element.count} rows, vertex has {n}")
        names = _rest_names(path, element)
        if names:
            rest = _columns(path, element, names) * (8.0 / 255.0) - 4.0
            sh = np.concatenate([sh, _rest_to_sh(rest)], axis=1)
    return _to_splats(means, quats, log_scales, logits, sh)


def read_ply(path: PathLike) -> Splats:
    """Read Gaussian splats from an Inria 3DGS PLY or a PlayCanvas/SuperSplat compressed PLY.

    Inria layout: properties are found by name (order and extra properties do not matter), the SH
    degree (0-3, or 4) follows from the number of ``f_rest_*``; float32 values are returned bit-exactly.
    Compressed layout: decoded with the quantisation error of the encoding (positions and log-scales
    to 1/2047 or 1/1023 of each 256-splat chunk's range, colour and opacity 8 bit, rotations 10 bit,
    higher SH 8 bit over [-4, 4]); alpha 0 / 1 decode to opacity logits -40 / +40.
    Raises :class:`SplatFormatError` (a ``ValueError``) naming the file when it is not a splat PLY.
    """
    path = Path(path)
    try:
        ply = PlyData.read(str(path))
    except PlyParseError as exc:
        raise SplatFormatError(f"{path}: not a readable PLY file ({exc})") from exc
    if "vertex" not in ply:
        raise SplatFormatError(f"{path}: PLY has no 'vertex' element (elements: {[e.name for e in ply.elements]})")
    vertex = ply["vertex"]
    vertex_names = {p.name for p in vertex.properties}
    if "chunk" in ply and "packed_position" in vertex_names:
        return _read_compressed(path, ply)
    return _read_inria(path, vertex)

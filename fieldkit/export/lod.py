"""The ``.fklod`` file: a level-of-detail Gaussian tree (layout: docs/lod.md).

``write_lod(path, hierarchy)`` stores every node of a :class:`fieldkit.models.hierarchy.GaussianHierarchy`
(leaves = the trained Gaussians, interior nodes = their moment-matched merges) with the tree links and
boxes the cut needs, uncompressed little-endian, so a reader can memory-map it. ``read_lod(path)``
returns a :class:`LODModel` whose ``render(cameras, tau)`` draws the tau-cut exactly like ``gs-hier``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fieldkit.cameras import Cameras
from fieldkit.io_atomic import atomic_path
from fieldkit.models.hierarchy import BOX_SIGMAS, GaussianHierarchy

MAGIC = b"FKL1"
VERSION = 1

# name -> (stored dtype, trailing shape given K = SH coefficients per channel)
SECTIONS: dict[str, tuple[str, tuple]] = {
    "means": ("<f4", (3,)),
    "quats": ("<f4", (4,)),
    "scales": ("<f4", (3,)),
    "opacities": ("<f4", ()),
    "sh": ("<f4", ("K", 3)),
    "parent": ("<i4", ()),
    "children": ("<i4", (2,)),
    "box_min": ("<f4", (3,)),
    "box_max": ("<f4", (3,)),
    "weights": ("<f4", ()),
    "depth": ("<i4", ()),
}


class LODFormatError(ValueError):
    """A file that is not a valid .fklod (names the file and what is wrong)."""


@dataclass
class LODModel:
    """A decoded .fklod: the tree, the scene background and the default cut threshold."""

    hierarchy: GaussianHierarchy
    background: Tensor | None
    tau: float

    def render(self, cameras: Cameras, tau: float | None = None, backend: str = "auto", blend: bool = True) -> dict[str, Tensor]:
        from fieldkit.render.lod import render_lod

        out = render_lod(self.hierarchy, cameras, self.tau if tau is None else tau, blend=blend,
                         background=self.background, backend=backend)
        return {"rgb": out.rgb.clamp(0, 1), "alpha": out.alpha, "depth": out.depth, "counts": out.counts}


def write_lod(path: Path, hierarchy: GaussianHierarchy, background: Tensor | None = None, tau: float = 1.0) -> Path:
    path = Path(path)
    h = hierarchy.to("cpu")
    sections, blobs = [], []
    for name, (dtype, _) in SECTIONS.items():
        array = np.ascontiguousarray(getattr(h, name).detach().numpy().astype(dtype))
        blob = array.tobytes()
        sections.append({"name": name, "dtype": dtype, "shape": list(array.shape), "bytes": len(blob)})
        blobs.append(blob)
    header = {
        "version": VERSION,
        "leaves": h.num_leaves,
        "nodes": h.num_nodes,
        "root": h.root,
        "sh_degree": h.sh_degree,
        "levels": h.num_levels,
        "background": None if background is None else [float(v) for v in background.detach().cpu().reshape(-1)[:3]],
        "tau": float(tau),
        "box_sigmas": BOX_SIGMAS,
        "weight": "opacity * product of the two largest scales",
        "sections": sections,
    }
    head = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(head)) + head)
            for blob in blobs:
                f.write(blob)
    return path


def read_lod(path: Path, device: str | torch.device = "cpu") -> LODModel:
    path = Path(path)
    data = path.read_bytes()
    if data[:4] != MAGIC:
        raise LODFormatError(f"{path}: not a .fklod file (magic {data[:4]!r}, expected {MAGIC!r})")
    if len(data) < 8:
        raise LODFormatError(f"{path}: truncated header")
    (length,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8 : 8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LODFormatError(f"{path}: unreadable JSON header ({error})") from error
    if header.get("version") != VERSION:
        raise LODFormatError(f"{path}: .fklod version {header.get('version')} is not supported (this reader: {VERSION})")
    m, k = header["nodes"], (header["sh_degree"] + 1) ** 2
    if m != 2 * header["leaves"] - 1:
        raise LODFormatError(f"{path}: {m} nodes for {header['leaves']} leaves (a binary tree has 2N-1)")
    offset, arrays = 8 + length, {}
    by_name = {s["name"]: s for s in header["sections"]}
    for s in header["sections"]:
        end = offset + s["bytes"]
        if end > len(data):
            raise LODFormatError(f"{path}: section {s['name']} runs past the end of the file (truncated?)")
        arrays[s["name"]] = np.frombuffer(data[offset:end], dtype=s["dtype"]).reshape(s["shape"])
        offset = end
    for name, (dtype, trailing) in SECTIONS.items():
        if name not in by_name:
            raise LODFormatError(f"{path}: section {name} is missing")
        shape = (m, *(k if d == "K" else d for d in trailing))
        if arrays[name].shape != shape:
            raise LODFormatError(f"{path}: section {name} has shape {arrays[name].shape}, expected {shape}")
    links = np.concatenate([arrays["parent"], arrays["children"].reshape(-1)])
    if links.size and (links.min() < -1 or links.max() >= m):
        raise LODFormatError(f"{path}: tree links point outside the {m} nodes")

    def tensor(name: str, dtype: torch.dtype) -> Tensor:
        return torch.from_numpy(arrays[name].copy()).to(device=device, dtype=dtype)

    hierarchy = GaussianHierarchy(
        **{name: tensor(name, torch.int64 if name in ("parent", "children", "depth") else torch.float32) for name in SECTIONS}
    )
    background = header.get("background")
    return LODModel(hierarchy, None if background is None else torch.tensor(background, dtype=torch.float32, device=device), float(header.get("tau", 1.0)))

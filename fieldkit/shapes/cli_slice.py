"""``fieldkit slice``: cut a mesh into planar cross-sections and write them as a ``.csl`` file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import tyro


@dataclass
class SliceCommand:
    """Cut a closed mesh with planes and write the contours as a .csl file (input for `fieldkit train`)."""

    mesh: tyro.conf.Positional[Path]
    """Mesh file (.obj .ply .stl .glb .off ...; anything trimesh reads)."""
    planes: int = 20
    """Number of cutting planes."""
    parallel: bool = False
    """Evenly spaced parallel planes along --axis (the default layout)."""
    random: bool = False
    """Random planes (normal ~ N(0, I), offset uniform across the mesh), as in OReX's dataset generator."""
    axis: Literal["auto", "x", "y", "z"] = "auto"
    """Axis the parallel planes are stacked along (auto: the mesh's longest side)."""
    seed: int = 0
    output: Annotated[Optional[Path], tyro.conf.arg(aliases=("-o",))] = None
    """The .csl file to write (default: beside the mesh, <mesh>.csl)."""


def run_slice(cmd: SliceCommand) -> Path:
    from fieldkit.shapes.csl import validate, write_csl
    from fieldkit.shapes.metrics import load_mesh
    from fieldkit.shapes.slicer import slice_mesh

    if cmd.parallel and cmd.random:
        raise ValueError("choose one of --parallel and --random")
    if not cmd.mesh.is_file():
        raise FileNotFoundError(f"mesh {cmd.mesh} does not exist")
    mesh = load_mesh(cmd.mesh)
    if not mesh.is_watertight:
        print(f"warning: {cmd.mesh} is not watertight; contours may not close (degenerate cuts are nudged)")
    out = cmd.output or cmd.mesh.with_suffix(".csl")
    cs = slice_mesh(mesh, cmd.planes, "random" if cmd.random else "parallel", cmd.axis, cmd.seed, source=str(out))
    validate(cs)
    write_csl(cs, out)
    print(f"Wrote {out}: {len(cs.planes)} planes, {cs.n_contours} contours ({cs.n_holes} holes), {cs.n_vertices} vertices")
    print(f"Next: fieldkit train {out}   then   fieldkit eval <run> --reference {cmd.mesh}")
    return out

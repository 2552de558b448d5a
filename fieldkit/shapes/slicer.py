"""Make cross-sections from a closed mesh: cut it with planes and keep the contours (``fieldkit slice``).

Parallel planes are evenly spaced along one axis (cell-centred in the mesh's extent); random planes follow
OReX's dataset generator (normal ~ N(0, I), offset uniform across the mesh's bounding sphere), redrawn until
each one actually cuts the mesh. Contours keep the mesh's own coordinates, so the mesh itself is the
reference for ``fieldkit eval --reference``. Contours are oriented for the ``.csl`` format: material
counter-clockwise, holes clockwise about the plane normal, each hole pointing at its enclosing contour.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fieldkit.shapes.csl import Contour, CrossSections, Plane, _signed_area, inside_parity

AXES = {"x": 0, "y": 1, "z": 2}


def _chain_segments(segments: np.ndarray, tol: float) -> list[np.ndarray] | None:
    """Closed loops (lists of 3D points) from unordered segments, or None when they do not close cleanly."""
    if len(segments) == 0:
        return []
    ends = segments.reshape(-1, 3)
    keys = np.round(ends / tol).astype(np.int64)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    positions = np.zeros((len(unique), 3))
    positions[inverse] = ends
    node = inverse.reshape(-1, 2)
    node = node[node[:, 0] != node[:, 1]]  # zero-length pieces (plane through a mesh vertex)
    if len(node) == 0:
        return []
    # deduplicate undirected edges (two faces can yield the same piece along an edge in the plane)
    node = np.unique(np.sort(node, axis=1), axis=0)
    degree = np.bincount(node.ravel(), minlength=len(positions))
    if (degree[np.unique(node)] != 2).any():
        return None
    neighbours = [[] for _ in range(len(positions))]
    for a, b in node:
        neighbours[a].append(b)
        neighbours[b].append(a)
    seen = np.zeros(len(positions), dtype=bool)
    loops = []
    for start in np.unique(node):
        if seen[start]:
            continue
        loop = [start]
        seen[start] = True
        prev, cur = start, neighbours[start][0]
        while cur != start:
            if seen[cur]:
                return None
            loop.append(cur)
            seen[cur] = True
            nxt = neighbours[cur][0] if neighbours[cur][0] != prev else neighbours[cur][1]
            prev, cur = cur, nxt
        if len(loop) >= 3:
            loops.append(positions[loop])
    return loops


def section(mesh, normal: np.ndarray, offset: float) -> Plane | None:
    """The plane ``normal . x = offset`` with the mesh's contours on it, or None if the cut is degenerate."""
    from trimesh.intersections import mesh_plane

    normal = np.asarray(normal, np.float64) / np.linalg.norm(normal)
    scale = float(np.linalg.norm(mesh.extents))
    segments = mesh_plane(mesh, normal, normal * offset)
    loops = _chain_segments(np.asarray(segments), tol=1e-9 * scale)
    if loops is None:
        return None
    plane = Plane(normal, -offset, np.zeros((0, 3)), [])
    if not loops:
        return plane
    # snap onto the plane exactly, drop near-duplicate consecutive points
    cleaned = []
    for loop in loops:
        loop = loop - np.outer(loop @ normal - offset, normal)
        step = np.linalg.norm(np.diff(loop, axis=0, append=loop[:1]), axis=1)
        loop = loop[step > 1e-9 * scale]
        if len(loop) >= 3:
            cleaned.append(loop)
    vertices = np.concatenate(cleaned) if cleaned else np.zeros((0, 3))
    plane = Plane(normal, -offset, vertices, [])
    flat = plane.to_2d(vertices)
    starts = np.cumsum([0] + [len(c) for c in cleaned])
    polys = [flat[starts[i] : starts[i + 1]] for i in range(len(cleaned))]
    # nesting depth: how many other loops contain this one (loops of a closed mesh never cross)
    depth = []
    containers = []
    for i, poly in enumerate(polys):
        inside_of = [j for j, other in enumerate(polys) if j != i and inside_parity(poly[:1], [other])[0]]
        containers.append(inside_of)
        depth.append(len(inside_of))
    contours = []
    for i, poly in enumerate(polys):
        indices = np.arange(starts[i], starts[i + 1])
        hole = depth[i] % 2 == 1
        parent = None
        if hole:
            parent = next(j for j in containers[i] if depth[j] == depth[i] - 1)
        ccw = _signed_area(poly) > 0
        if ccw == hole:  # material CCW, holes CW
            indices = indices[::-1]
        contours.append(Contour(indices, 1, parent))
    plane.contours = contours
    return plane


def slice_mesh(mesh, planes: int = 20, mode: Literal["parallel", "random"] = "parallel", axis: Literal["x", "y", "z", "auto"] = "auto", seed: int = 0, source: str = "") -> CrossSections:
    """Cross-sections of a closed mesh with ``planes`` planes."""
    if planes < 1:
        raise ValueError("--planes must be at least 1")
    lo, hi = mesh.bounds
    centre = (lo + hi) / 2
    rng = np.random.default_rng(seed)
    result: list[Plane] = []
    if mode == "parallel":
        k = int(np.argmax(hi - lo)) if axis == "auto" else AXES[axis]
        normal = np.eye(3)[k]
        extent = hi[k] - lo[k]
        for i in range(planes):
            height = lo[k] + (i + 0.5) * extent / planes
            for attempt in range(20):  # nudge off degenerate cuts (through a vertex or along an edge)
                plane = section(mesh, normal, height + attempt * 1e-7 * extent * (-1) ** attempt)
                if plane is not None:
                    break
            else:
                raise ValueError(f"could not cut the mesh cleanly at {'xyz'[k]} = {height:.6g}; is it watertight?")
            result.append(plane)
    elif mode == "random":
        radius = float(np.linalg.norm(hi - lo)) / 2
        tries = 0
        while len(result) < planes:
            tries += 1
            if tries > 100 * planes:
                raise ValueError("random planes keep missing the mesh; is it empty?")
            normal = rng.normal(size=3)
            normal /= np.linalg.norm(normal)
            offset = float(normal @ centre + rng.uniform(-1, 1) * radius)
            plane = section(mesh, normal, offset)
            if plane is None or not plane.contours:
                continue
            result.append(plane)
    else:
        raise ValueError(f"unknown slicing mode {mode!r}")
    if not any(p.contours for p in result):
        raise ValueError("no plane cut the mesh")
    return CrossSections(result, 2, source)

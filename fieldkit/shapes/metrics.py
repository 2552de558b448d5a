"""Shape metrics: volumetric IoU, Chamfer-L1, Hausdorff, contour fidelity.

- ``volume_iou``: occupancy of both meshes at the centres of a ``resolution``^3 grid spanning the union
  of their bounding boxes (``resolution`` cells per axis), by ray parity along z (exact for closed meshes).
- ``surface_distances``: ``samples`` points drawn uniformly (by area) on each surface; distances to the
  nearest sample of the other surface. ``chamfer_l1`` = (mean pred->ref + mean ref->pred) / 2 of the
  Euclidean distances (the L1 Chamfer of Occupancy Networks / OReX-style evaluations, not squared),
  ``hausdorff`` = max of both directed maxima. Units are the meshes' own.
- ``contour_fidelity``: for points spread along every input contour (its vertices and edge midpoints),
  probes at +-delta along the in-plane contour normal; each probe's true label comes from the
  point-in-polygon test of its plane, and fidelity is the fraction of probes the shape labels right.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fieldkit.shapes.csl import CrossSections


def occupancy_grid(mesh, origin: np.ndarray, spacing: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Boolean occupancy of a closed mesh at cell centres ``origin + (i + 0.5) * spacing``, by counting the
    surface crossings of a ray along +z through each (x, y) column."""
    origin = np.asarray(origin, np.float64)
    spacing = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    nx, ny, nz = shape
    tri = np.asarray(mesh.triangles, dtype=np.float64)
    # columns at cell centres, nudged by an irrational fraction so no ray grazes an edge or vertex exactly
    nudge = np.array([1.2345e-7, 2.3456e-7]) * spacing[:2]
    col0 = origin[:2] + 0.5 * spacing[:2] + nudge
    counts = np.zeros((nx, ny, nz + 1), dtype=np.int32)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    lo = np.minimum(np.minimum(a, b), c)[:, :2]
    hi = np.maximum(np.maximum(a, b), c)[:, :2]
    i0 = np.clip(np.ceil((lo - col0) / spacing[:2]).astype(np.int64), 0, [nx, ny])
    i1 = np.clip(np.floor((hi - col0) / spacing[:2]).astype(np.int64) + 1, 0, [nx, ny])
    span = np.maximum(i1 - i0, 0)
    per_tri = span[:, 0] * span[:, 1]
    keep = per_tri > 0
    tri_ids = np.repeat(np.flatnonzero(keep), per_tri[keep])
    if len(tri_ids) == 0:
        return np.zeros(shape, dtype=bool)
    offsets = np.arange(len(tri_ids)) - np.repeat(np.cumsum(per_tri[keep]) - per_tri[keep], per_tri[keep])
    width = span[tri_ids, 1]
    ix = i0[tri_ids, 0] + offsets // np.maximum(width, 1)
    iy = i0[tri_ids, 1] + offsets % np.maximum(width, 1)
    px = col0[0] + ix * spacing[0]
    py = col0[1] + iy * spacing[1]
    ta, tb, tc = a[tri_ids], b[tri_ids], c[tri_ids]
    # barycentric coordinates of the column in the triangle's xy projection
    v0x, v0y = tb[:, 0] - ta[:, 0], tb[:, 1] - ta[:, 1]
    v1x, v1y = tc[:, 0] - ta[:, 0], tc[:, 1] - ta[:, 1]
    wx, wy = px - ta[:, 0], py - ta[:, 1]
    det = v0x * v1y - v1x * v0y
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (wx * v1y - v1x * wy) / det
        t = (v0x * wy - wx * v0y) / det
        hit = (det != 0) & (s >= 0) & (t >= 0) & (s + t <= 1)
    z = ta[hit, 2] + s[hit] * (tb[hit, 2] - ta[hit, 2]) + t[hit] * (tc[hit, 2] - ta[hit, 2])
    # a crossing at height z flips the parity of every cell centre above it
    k = np.clip(np.ceil((z - origin[2]) / spacing[2] - 0.5).astype(np.int64), 0, nz)
    np.add.at(counts, (ix[hit], iy[hit], k), 1)
    return (np.cumsum(counts, axis=2)[:, :, :nz] % 2).astype(bool)


def volume_iou(pred, ref, resolution: int = 128) -> float:
    """Intersection over union of the volumes of two closed meshes on a ``resolution``^3 grid."""
    if len(pred.faces) == 0 or len(ref.faces) == 0:
        return 0.0
    lo = np.minimum(pred.bounds[0], ref.bounds[0])
    hi = np.maximum(pred.bounds[1], ref.bounds[1])
    spacing = (hi - lo) / resolution
    spacing = np.where(spacing > 0, spacing, 1.0)
    shape = (resolution,) * 3
    a = occupancy_grid(pred, lo, spacing, shape)
    b = occupancy_grid(ref, lo, spacing, shape)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def sample_surface(mesh, count: int, seed: int = 0) -> np.ndarray:
    """``count`` points uniformly distributed (by area) on a triangle mesh."""
    rng = np.random.default_rng(seed)
    tri = np.asarray(mesh.triangles, dtype=np.float64)
    areas = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    pick = rng.choice(len(tri), size=count, p=areas / areas.sum())
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tri[pick]
    return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])


def surface_distances(pred, ref, samples: int = 100_000, seed: int = 0) -> dict[str, float]:
    """Chamfer-L1 and Hausdorff between two surfaces from ``samples`` points on each."""
    from scipy.spatial import cKDTree

    if len(pred.faces) == 0 or len(ref.faces) == 0:
        return {"chamfer_l1": float("inf"), "hausdorff": float("inf"), "accuracy": float("inf"), "completeness": float("inf")}
    p = sample_surface(pred, samples, seed)
    r = sample_surface(ref, samples, seed + 1)
    d_pr, _ = cKDTree(r).query(p, workers=-1)
    d_rp, _ = cKDTree(p).query(r, workers=-1)
    return {
        "chamfer_l1": float(0.5 * (d_pr.mean() + d_rp.mean())),
        "hausdorff": float(max(d_pr.max(), d_rp.max())),
        "accuracy": float(d_pr.mean()),
        "completeness": float(d_rp.mean()),
    }


def contour_probes(cs: CrossSections, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """(points [N,3], true inside labels [N]) probing +-delta either side of every contour."""
    points, labels = [], []
    for plane in cs.planes:
        if not plane.contours:
            continue
        probes2d = []
        for poly in plane.polygons_2d():
            nxt = np.roll(poly, -1, axis=0)
            edge = nxt - poly
            normal = np.stack([edge[:, 1], -edge[:, 0]], axis=1)
            normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-300)
            vertex_normal = normal + np.roll(normal, 1, axis=0)
            vertex_normal /= np.maximum(np.linalg.norm(vertex_normal, axis=1, keepdims=True), 1e-300)
            for base, direction in ((poly, vertex_normal), (0.5 * (poly + nxt), normal)):
                probes2d += [base + delta * direction, base - delta * direction]
        flat = np.concatenate(probes2d)
        points.append(plane.to_3d(flat))
        labels.append(plane.inside(flat))
    if not points:
        return np.zeros((0, 3)), np.zeros(0, dtype=bool)
    return np.concatenate(points), np.concatenate(labels)


def contour_fidelity(cs: CrossSections, inside: Callable[[np.ndarray], np.ndarray], delta: float) -> float:
    """Fraction of contour probes whose in/out label ``inside(points) -> bool[N]`` gets right."""
    points, truth = contour_probes(cs, delta)
    if len(points) == 0:
        return float("nan")
    return float(np.mean(np.asarray(inside(points), dtype=bool) == truth))


def load_mesh(path):
    """A triangle mesh from any format trimesh reads (scenes are merged into one mesh)."""
    import trimesh

    mesh = trimesh.load(str(path), force="mesh")
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"{path}: no triangles found")
    return mesh


def shape_metrics(mesh, cs: CrossSections, inside: Callable[[np.ndarray], np.ndarray], reference=None, iou_resolution: int = 128, samples: int = 100_000, delta: float | None = None, seed: int = 0) -> dict:
    """IoU, Chamfer-L1, Hausdorff (when a reference mesh is given), contour fidelity and mesh checks."""
    verts = cs.all_vertices()
    if delta is None:
        delta = 0.005 * float(np.linalg.norm(verts.max(0) - verts.min(0)))
    results: dict = {"contour_fidelity": contour_fidelity(cs, inside, delta), "fidelity_delta": delta}
    if reference is not None:
        ref = load_mesh(reference)
        results["iou"] = volume_iou(mesh, ref, iou_resolution)
        results.update(surface_distances(mesh, ref, samples, seed))
        results["reference_watertight"] = bool(ref.is_watertight)
    results["watertight"] = bool(mesh.is_watertight) if len(mesh.faces) else False
    results["winding_consistent"] = bool(mesh.is_winding_consistent) if len(mesh.faces) else False
    return results

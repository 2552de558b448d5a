"""Classic baselines for shapes from cross-sections, for side-by-side numbers with OReX.

- ``interpolate`` (parallel planes only): signed-distance interpolation between slices. Each plane gets
  the 2D signed distance of its contours (> 0 inside); between two neighbouring planes the value is the
  linear blend of theirs at the point's projection; beyond the first/last plane it is that plane's value
  minus the distance past it (a rounded cap).
- ``nearest`` (any planes): nearest-plane labelling. A point takes the in/out label (here the signed
  distance, so the surface is smooth within a cell) of its projection onto the nearest plane.

Both are evaluated in the normalised frame and clipped to the padded convex hull of the contours, like
OReX, and meshed with the same extractor.
"""

from __future__ import annotations

import numpy as np

from fieldkit.shapes.csl import CrossSections, Plane


class PlaneSDF:
    """2D signed distance to a plane's contours (> 0 inside, even-odd rule), from densely resampled edges."""

    def __init__(self, plane: Plane, spacing: float = 0.002):
        from scipy.spatial import cKDTree

        self.plane = plane
        samples = []
        for poly in plane.polygons_2d():
            nxt = np.roll(poly, -1, axis=0)
            length = np.linalg.norm(nxt - poly, axis=1)
            steps = np.maximum(np.ceil(length / spacing).astype(int), 1)
            t = np.concatenate([np.arange(s) / s for s in steps])
            start = np.repeat(poly, steps, axis=0)
            samples.append(start + t[:, None] * (np.repeat(nxt, steps, axis=0) - start))
        self.empty = not samples
        self.tree = cKDTree(np.concatenate(samples)) if samples else None

    def __call__(self, points3d: np.ndarray) -> np.ndarray:
        if self.empty:
            return np.full(len(points3d), -1.0)
        flat = self.plane.to_2d(points3d)
        dist, _ = self.tree.query(flat, workers=-1)
        return np.where(self.plane.inside(flat), dist, -dist)


class BaselineField:
    """Scalar field (> 0 inside) of a classic reconstruction of normalised cross-sections."""

    def __init__(self, cs: CrossSections, kind: str = "auto", spacing: float = 0.002):
        if kind == "auto":
            kind = "interpolate" if cs.is_parallel and len(cs.planes) > 1 else "nearest"
        if kind == "interpolate" and not cs.is_parallel:
            raise ValueError("signed-distance interpolation needs parallel planes; use kind='nearest'")
        self.kind = kind
        self.cs = cs
        self.sdfs = [PlaneSDF(p, spacing) for p in cs.planes]
        if kind == "interpolate":
            n = cs.planes[0].unit_normal
            self.normal = n
            heights = np.array([p.offset * float(np.sign(p.unit_normal @ n)) for p in cs.planes])
            self.order = np.argsort(heights)
            self.heights = heights[self.order]

    def __call__(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        out = np.empty(len(points))
        if self.kind == "nearest":
            dist = np.abs(np.stack([p.signed_distance(points) for p in self.cs.planes], axis=1))
            nearest = np.argmin(dist, axis=1)
            for i, sdf in enumerate(self.sdfs):
                pick = nearest == i
                if pick.any():
                    out[pick] = sdf(points[pick])
            return out
        t = points @ self.normal
        h = self.heights
        upper = np.clip(np.searchsorted(h, t), 1, len(h) - 1)
        lower = upper - 1
        weight = np.clip((t - h[lower]) / np.maximum(h[upper] - h[lower], 1e-12), 0.0, 1.0)
        below, above = t < h[0], t > h[-1]
        values = np.zeros(len(points))
        for slot, sdf_index in enumerate(self.order):
            sdf = self.sdfs[sdf_index]
            use_lower = lower == slot
            use_upper = upper == slot
            pick = use_lower | use_upper
            if not pick.any():
                continue
            v = sdf(points[pick])
            w = np.where(use_lower[pick], 1.0 - weight[pick], 0.0) + np.where(use_upper[pick], weight[pick], 0.0)
            values[pick] += w * v
        values[below] -= h[0] - t[below]
        values[above] -= t[above] - h[-1]
        out[:] = values
        return out


class BaselineReconstruction:
    """A baseline run end to end on cross-sections in their own units: field, mesh, in/out test."""

    def __init__(self, cs: CrossSections, kind: str = "auto", hull_margin: float = 1.05):
        from fieldkit.shapes.sampling import ScaledHull

        self.source = cs
        self.centre, self.scale = cs.normalization()
        self.cs = cs.transformed(self.centre, self.scale)
        self.field = BaselineField(self.cs, kind)
        self.kind = self.field.kind
        self.hull = ScaledHull.of(self.cs.all_vertices(), hull_margin)

    def field_normalised(self, points: np.ndarray) -> np.ndarray:
        return np.minimum(self.field(points), -self.hull.signed_distance(points))

    def inside(self, points: np.ndarray) -> np.ndarray:
        return self.field_normalised((np.asarray(points, np.float64) - self.centre) / self.scale) > 0

    def mesh(self, resolution: int = 256, coarse_resolution: int = 64):
        import time

        from fieldkit.shapes.meshing import extract_mesh, mesh_report, oriented_mesh

        started = time.perf_counter()
        mesh, info = extract_mesh(self.field_normalised, self.hull.lo, self.hull.hi, resolution, coarse_resolution, near=lambda h: h)
        mesh = oriented_mesh(mesh.vertices * self.scale + self.centre, mesh.faces)
        return mesh, {**info, "seconds": time.perf_counter() - started, **mesh_report(mesh)}

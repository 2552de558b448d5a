"""The ``.csl`` cross-section format (OReX's "CSLC"): reader, writer, validation and plane geometry.

Layout (whitespace separated, blank lines and leading spaces ignored)::

    CSLC
    <nPlanes> <nLabels>
    <planeIdx> <nVerts> <nComponents> A B C D      # plane A x + B y + C z + D = 0, planeIdx 1-based
    x y z                                          # nVerts lines: this plane's vertices
    <n>[h<parent>] <label> i0 i1 ... i(n-1)        # nComponents lines: 0-based vertex indices

Contours are closed polygons (the last vertex joins the first). Material contours run counter-clockwise
seen from the side the plane normal points to, holes clockwise; a hole names the 0-based index of its
enclosing component after ``h``. Label values are kept but, as in OReX, every component counts as
material (multi-label files become inside/outside). In/out labelling uses the even-odd rule over all
contours of a plane, so it does not depend on how the file orients them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["CSLError", "Contour", "Plane", "CrossSections", "read_csl", "write_csl", "find_csl", "validate", "inside_parity"]


class CSLError(ValueError):
    """A malformed or invalid ``.csl`` file; the message names the file, the line and the plane."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None, plane: int | None = None):
        self.path, self.line, self.plane = path, line, plane
        where = []
        if path is not None:
            where.append(f"{path}" + (f", line {line}" if line else ""))
        elif line:
            where.append(f"line {line}")
        if plane is not None:
            where.append(f"plane {plane}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


@dataclass
class Contour:
    """One closed polygon of a plane: indices into the plane's vertices."""

    indices: np.ndarray
    label: int = 1
    parent: int | None = None
    """Index of the enclosing component when this contour is a hole, else None."""
    line: int = 0
    """1-based line of the component in the file it was read from (0 when built in memory)."""

    @property
    def is_hole(self) -> bool:
        return self.parent is not None

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Plane:
    """A cutting plane ``normal . x + d = 0`` with its vertices and contours."""

    normal: np.ndarray
    d: float
    vertices: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    contours: list[Contour] = field(default_factory=list)
    line: int = 0
    vertex_lines: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.normal = np.asarray(self.normal, dtype=np.float64).reshape(3)
        self.vertices = np.asarray(self.vertices, dtype=np.float64).reshape(-1, 3)
        self.d = float(self.d)
        self._frame: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def unit_normal(self) -> np.ndarray:
        return self.normal / np.linalg.norm(self.normal)

    @property
    def offset(self) -> float:
        """Signed position of the plane along its unit normal (``unit_normal . x = offset``)."""
        return -self.d / float(np.linalg.norm(self.normal))

    def signed_distance(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) @ self.unit_normal - self.offset

    def frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(origin, u, v): origin on the plane (vertex mean), u the main PCA axis, u x v = unit normal."""
        if self._frame is None:
            n = self.unit_normal
            if len(self.vertices):
                origin = self.vertices.mean(axis=0)
                origin = origin - (origin @ n - self.offset) * n
                centred = self.vertices - origin
                centred = centred - np.outer(centred @ n, n)
                _, _, vt = np.linalg.svd(centred, full_matrices=False) if len(centred) > 1 else (None, None, np.eye(3))
                u = vt[0] - (vt[0] @ n) * n
                if np.linalg.norm(u) < 1e-9:
                    u = _any_perpendicular(n)
            else:
                origin = self.offset * n
                u = _any_perpendicular(n)
            u = u / np.linalg.norm(u)
            v = np.cross(n, u)
            self._frame = (origin, u, v)
        return self._frame

    def to_2d(self, points: np.ndarray) -> np.ndarray:
        origin, u, v = self.frame()
        rel = np.asarray(points, dtype=np.float64) - origin
        return np.stack([rel @ u, rel @ v], axis=-1)

    def to_3d(self, points2d: np.ndarray) -> np.ndarray:
        origin, u, v = self.frame()
        points2d = np.asarray(points2d, dtype=np.float64)
        return origin + points2d[..., :1] * u + points2d[..., 1:2] * v

    def polygons_2d(self) -> list[np.ndarray]:
        flat = self.to_2d(self.vertices)
        return [flat[c.indices] for c in self.contours]

    def inside(self, points2d: np.ndarray) -> np.ndarray:
        """Even-odd in/out of 2D points (in this plane's frame) against all contours."""
        return inside_parity(points2d, self.polygons_2d())

    def signed_areas(self) -> np.ndarray:
        """Signed area of each contour seen from the normal side (> 0: counter-clockwise)."""
        return np.array([_signed_area(p) for p in self.polygons_2d()])

    def transformed(self, centre: np.ndarray, scale: float) -> "Plane":
        """The plane with coordinates mapped by ``x -> (x - centre) / scale``."""
        n = self.unit_normal
        offset = (self.offset - centre @ n) / scale
        contours = [Contour(c.indices.copy(), c.label, c.parent, c.line) for c in self.contours]
        return Plane(n, -offset, (self.vertices - centre) / scale, contours, self.line, self.vertex_lines)


@dataclass
class CrossSections:
    """All planes of a ``.csl`` file."""

    planes: list[Plane]
    n_labels: int = 2
    source: str = ""

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source else "shape"

    def all_vertices(self) -> np.ndarray:
        chunks = [p.vertices for p in self.planes if len(p.vertices)]
        return np.concatenate(chunks) if chunks else np.zeros((0, 3))

    @property
    def n_vertices(self) -> int:
        return sum(len(p.vertices) for p in self.planes)

    @property
    def n_contours(self) -> int:
        return sum(len(p.contours) for p in self.planes)

    @property
    def n_holes(self) -> int:
        return sum(c.is_hole for p in self.planes for c in p.contours)

    def directions(self, tol: float = 1e-6) -> list[np.ndarray]:
        """Distinct plane directions (unit normals up to sign)."""
        found: list[np.ndarray] = []
        for plane in self.planes:
            n = plane.unit_normal
            if not any(abs(abs(n @ m) - 1) < tol for m in found):
                found.append(n)
        return found

    @property
    def is_parallel(self) -> bool:
        return len(self.directions()) == 1

    def normalization(self) -> tuple[np.ndarray, float]:
        """(centre, scale) mapping the contours into [-1, 1]^3 as OReX does: centre on the vertex mean, then
        divide by 1.1 * max |coordinate| (always applied here, so tiny and huge inputs train alike)."""
        verts = self.all_vertices()
        if len(verts) == 0:
            raise CSLError("no contour vertices: nothing to reconstruct", self.source or None)
        centre = verts.mean(axis=0)
        extent = float(np.abs(verts - centre).max())
        return centre, 1.1 * extent if extent > 0 else 1.0

    def transformed(self, centre: np.ndarray, scale: float) -> "CrossSections":
        return CrossSections([p.transformed(centre, scale) for p in self.planes], self.n_labels, self.source)


def _any_perpendicular(n: np.ndarray) -> np.ndarray:
    axis = np.eye(3)[int(np.argmin(np.abs(n)))]
    u = np.cross(n, axis)
    return u / np.linalg.norm(u)


def _signed_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def inside_parity(points2d: np.ndarray, polygons: list[np.ndarray]) -> np.ndarray:
    """Even-odd rule: a point is inside when an odd number of polygons contain it."""
    from matplotlib.path import Path as MplPath

    points2d = np.asarray(points2d, dtype=np.float64).reshape(-1, 2)
    result = np.zeros(len(points2d), dtype=bool)
    for poly in polygons:
        if len(poly) < 3 or len(points2d) == 0:
            continue
        lo, hi = poly.min(axis=0), poly.max(axis=0)
        near = np.all((points2d >= lo) & (points2d <= hi), axis=1)
        if near.any():
            hit = MplPath(poly, closed=False).contains_points(points2d[near])
            result[np.flatnonzero(near)[hit]] ^= True
    return result


# ----------------------------------------------------------------------------------------------- reading

_COUNT = re.compile(r"^(\d+)(?:h(\d+))?$")


def find_csl(path: str | Path) -> Path:
    """The ``.csl`` file itself, or the single ``.csl`` inside a folder."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".csl" and p.is_file())
        if not found:
            raise FileNotFoundError(f"{path} holds no .csl file")
        if len(found) > 1:
            raise ValueError(f"{path} holds {len(found)} .csl files ({', '.join(p.name for p in found[:5])}); pass one of them")
        return found[0]
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def read_csl(path: str | Path, validate_geometry: bool = True, plane_tolerance: float | None = None) -> CrossSections:
    """Parse a ``.csl`` file (or the one inside a folder); raises :class:`CSLError` naming line and plane."""
    path = find_csl(path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as error:
        raise CSLError(f"not a text file ({error})", path) from error
    cs = parse_csl(text, source=str(path))
    if validate_geometry:
        validate(cs, plane_tolerance=plane_tolerance)
    return cs


def parse_csl(text: str, source: str = "") -> CrossSections:
    """Parse ``.csl`` text (structure only; see :func:`validate` for the geometry checks)."""
    where = source or None
    lines = [(i + 1, ln.split()) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    cursor = 0

    def take(what: str, plane: int | None = None) -> tuple[int, list[str]]:
        nonlocal cursor
        if cursor >= len(lines):
            last = lines[-1][0] if lines else 0
            raise CSLError(f"file ends early: expected {what}", where, last, plane)
        item = lines[cursor]
        cursor += 1
        return item

    def ints(tokens: list[str], lineno: int, what: str, plane: int | None = None) -> list[int]:
        try:
            return [int(t) for t in tokens]
        except ValueError:
            raise CSLError(f"expected integers for {what}, got {' '.join(tokens)!r}", where, lineno, plane) from None

    def floats(tokens: list[str], lineno: int, what: str, plane: int | None = None) -> list[float]:
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise CSLError(f"expected numbers for {what}, got {' '.join(tokens)!r}", where, lineno, plane) from None
        if not all(math.isfinite(v) for v in values):
            raise CSLError(f"{what} must be finite, got {' '.join(tokens)!r}", where, lineno, plane)
        return values

    lineno, tokens = take("the header CSLC")
    if tokens != ["CSLC"]:
        raise CSLError(f"expected the header 'CSLC', got {' '.join(tokens)[:40]!r}", where, lineno)
    lineno, tokens = take("'<nPlanes> <nLabels>'")
    if len(tokens) != 2:
        raise CSLError(f"expected '<nPlanes> <nLabels>', got {' '.join(tokens)!r}", where, lineno)
    n_planes, n_labels = ints(tokens, lineno, "'<nPlanes> <nLabels>'")
    if n_planes < 0 or n_labels < 0:
        raise CSLError("plane and label counts must not be negative", where, lineno)

    planes: list[Plane] = []
    for k in range(1, n_planes + 1):
        lineno, tokens = take(f"the header of plane {k} of {n_planes} '<planeIdx> <nVerts> <nComponents> A B C D'", k)
        if len(tokens) != 7:
            raise CSLError(f"expected a plane header '<planeIdx> <nVerts> <nComponents> A B C D' (7 values), got {len(tokens)}: {' '.join(tokens)[:80]!r}", where, lineno, k)
        idx, n_verts, n_comps = ints(tokens[:3], lineno, "'<planeIdx> <nVerts> <nComponents>'", k)
        a, b, c, d = floats(tokens[3:], lineno, "the plane coefficients A B C D", k)
        if idx != k:
            raise CSLError(f"plane index {idx} out of order: expected {k} (planes are numbered 1..{n_planes} in order)", where, lineno, k)
        if n_verts < 0 or n_comps < 0:
            raise CSLError("vertex and component counts must not be negative", where, lineno, k)
        if math.hypot(a, b, c) == 0:
            raise CSLError("plane normal (A, B, C) is zero", where, lineno, k)
        plane_line = lineno
        verts = np.empty((n_verts, 3))
        vlines = np.empty(n_verts, dtype=np.int64)
        for i in range(n_verts):
            lineno, tokens = take(f"vertex {i} of {n_verts} of plane {k}", k)
            if len(tokens) != 3:
                raise CSLError(f"expected vertex {i} of {n_verts} as 'x y z', got {len(tokens)} values: {' '.join(tokens)[:80]!r} (is nVerts={n_verts} in the plane header right?)", where, lineno, k)
            verts[i] = floats(tokens, lineno, f"vertex {i}", k)
            vlines[i] = lineno
        contours: list[Contour] = []
        for j in range(n_comps):
            lineno, tokens = take(f"component {j} of {n_comps} of plane {k}", k)
            match = _COUNT.match(tokens[0])
            if not match:
                raise CSLError(f"component {j}: expected '<n>[h<parent>] <label> indices...', got {' '.join(tokens)[:60]!r} (is nComponents={n_comps} or nVerts={n_verts} in the plane header right?)", where, lineno, k)
            count = int(match.group(1))
            parent = int(match.group(2)) if match.group(2) is not None else None
            if len(tokens) < 2:
                raise CSLError(f"component {j}: missing label and vertex indices", where, lineno, k)
            label = ints(tokens[1:2], lineno, f"the label of component {j}", k)[0]
            indices = np.array(ints(tokens[2:], lineno, f"the vertex indices of component {j}", k), dtype=np.int64)
            if len(indices) != count:
                raise CSLError(f"component {j} declares {count} vertices but lists {len(indices)} indices", where, lineno, k)
            if len(indices) and (indices.min() < 0 or indices.max() >= n_verts):
                bad = int(indices[(indices < 0) | (indices >= n_verts)][0])
                raise CSLError(f"component {j}: vertex index {bad} out of range 0..{n_verts - 1}", where, lineno, k)
            if len(indices) > 3 and indices[0] == indices[-1]:
                indices = indices[:-1]  # an explicitly closed loop: the format closes contours implicitly
            contours.append(Contour(indices, label, parent, lineno))
        planes.append(Plane(np.array([a, b, c]), d, verts, contours, plane_line, vlines))
    if cursor < len(lines):
        lineno, tokens = lines[cursor]
        raise CSLError(f"unexpected content after the last of {n_planes} planes: {' '.join(tokens)[:60]!r} (is nPlanes right?)", where, lineno)
    return CrossSections(planes, n_labels, source)


# -------------------------------------------------------------------------------------------- validation


def validate(cs: CrossSections, plane_tolerance: float | None = None) -> None:
    """Check the geometry: vertices on their plane, contours closed (>= 3 distinct vertices, non-zero area),
    not self-intersecting, holes pointing at a material component of the same plane."""
    where = cs.source or None
    verts = cs.all_vertices()
    diag = float(np.linalg.norm(verts.max(0) - verts.min(0))) if len(verts) else 1.0
    tol = plane_tolerance if plane_tolerance is not None else 1e-5 * max(diag, 1e-12)
    for k, plane in enumerate(cs.planes, start=1):
        if len(plane.vertices):
            dist = np.abs(plane.signed_distance(plane.vertices))
            worst = int(np.argmax(dist))
            if dist[worst] > tol:
                line = int(plane.vertex_lines[worst]) if plane.vertex_lines is not None else None
                raise CSLError(f"vertex {worst} lies {dist[worst]:.3g} off its plane (tolerance {tol:.3g}): the plane equation and the vertex disagree", where, line, k)
        flat = plane.to_2d(plane.vertices) if len(plane.vertices) else np.zeros((0, 2))
        scale = float(np.abs(flat).max()) if len(flat) else 1.0
        for j, contour in enumerate(plane.contours):
            line = contour.line or None
            if len(contour) < 3:
                raise CSLError(f"component {j} is an open contour: it has {len(contour)} vertices, a closed contour needs at least 3", where, line, k)
            poly = flat[contour.indices]
            spread = np.linalg.svd(poly - poly.mean(axis=0), compute_uv=False)
            if spread[-1] <= 1e-12 * max(scale, 1e-300) * math.sqrt(len(poly)):
                raise CSLError(f"component {j} is an open contour: its vertices are collinear (zero area)", where, line, k)
            pinch = _crossing_at_repeated_vertex(contour.indices, poly)
            if pinch is not None:
                raise CSLError(f"component {j} is self-intersecting: it crosses itself at vertex {pinch}, which it passes through twice", where, line, k)
            crossing = _self_intersection(poly, eps=1e-12 * max(scale, 1e-300), indices=contour.indices)
            if crossing is not None:
                a, b = crossing
                ia, ib = int(contour.indices[a]), int(contour.indices[b])
                raise CSLError(f"component {j} is self-intersecting: its edge from vertex {ia} crosses its edge from vertex {ib}", where, line, k)
            if contour.parent is not None:
                p = contour.parent
                if not 0 <= p < len(plane.contours) or p == j:
                    raise CSLError(f"component {j} is a hole of component {p}, which does not exist in this plane", where, line, k)
                if plane.contours[p].is_hole:
                    raise CSLError(f"component {j} is a hole of component {p}, which is itself a hole", where, line, k)


def _crossing_at_repeated_vertex(indices: np.ndarray, poly: np.ndarray) -> int | None:
    """A contour may touch itself at a vertex it lists twice (a pinch, as in some medical data); it must not
    cross there. Returns the vertex index where two passes cross, else None."""
    unique, counts = np.unique(indices, return_counts=True)
    if not (counts > 1).any():
        return None
    m = len(indices)
    for vertex in unique[counts > 1]:
        passes = np.flatnonzero(indices == vertex)
        centre = poly[passes[0]]
        arcs = []
        for at in passes:  # each pass enters from the previous vertex and leaves to the next one
            before, after = poly[(at - 1) % m] - centre, poly[(at + 1) % m] - centre
            arcs.append((math.atan2(before[1], before[0]), math.atan2(after[1], after[0])))
        for a in range(len(arcs)):
            for b in range(a + 1, len(arcs)):
                start, end = arcs[a]
                span = (end - start) % (2 * math.pi)
                inside = [0 < (angle - start) % (2 * math.pi) < span for angle in arcs[b]]
                if inside[0] != inside[1]:
                    return int(vertex)
    return None


def _self_intersection(poly: np.ndarray, eps: float, indices: np.ndarray | None = None) -> tuple[int, int] | None:
    """First pair (i, j) of non-adjacent edges of a closed polygon that touch or cross, else None.
    Edges that share a vertex index (a pinch, checked separately) are not compared."""
    m = len(poly)
    if m < 4:
        return None
    ids = np.arange(m) if indices is None else np.asarray(indices)
    ea, eb = ids, np.roll(ids, -1)
    p, q = poly, np.roll(poly, -1, axis=0)
    lo, hi = np.minimum(p, q), np.maximum(p, q)
    order = np.argsort(lo[:, 0], kind="stable")
    # sweep along x: each edge against the edges that start before it ends
    starts = lo[order, 0]
    for pos, i in enumerate(order):
        stop = np.searchsorted(starts, hi[i, 0] + eps, side="right")
        cand = order[pos + 1 : stop]
        if len(cand) == 0:
            continue
        cand = cand[(lo[cand, 1] <= hi[i, 1] + eps) & (hi[cand, 1] >= lo[i, 1] - eps)]
        gap = np.abs(cand - i)
        cand = cand[(gap != 1) & (gap != m - 1)]
        cand = cand[(ea[cand] != ea[i]) & (ea[cand] != eb[i]) & (eb[cand] != ea[i]) & (eb[cand] != eb[i])]
        if len(cand) == 0:
            continue
        hit = _segments_touch(p[i], q[i], p[cand], q[cand], eps)
        if hit.any():
            j = int(cand[np.argmax(hit)])
            return (min(i, j), max(i, j))
    return None


def _segments_touch(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, eps: float) -> np.ndarray:
    """Whether segment ab touches or crosses each segment c[k]d[k] (2D)."""

    def orient(p, q, r):
        return (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])

    def on_segment(p, q, r):  # r collinear with pq: within its box?
        return (np.minimum(p[..., 0], q[..., 0]) - eps <= r[..., 0]) & (r[..., 0] <= np.maximum(p[..., 0], q[..., 0]) + eps) & (
            np.minimum(p[..., 1], q[..., 1]) - eps <= r[..., 1]) & (r[..., 1] <= np.maximum(p[..., 1], q[..., 1]) + eps)

    a = np.broadcast_to(a, c.shape)
    b = np.broadcast_to(b, c.shape)
    scale = eps * (np.linalg.norm(b - a, axis=-1) + np.linalg.norm(d - c, axis=-1) + 1.0)
    o1, o2, o3, o4 = orient(a, b, c), orient(a, b, d), orient(c, d, a), orient(c, d, b)
    s1, s2, s3, s4 = (np.where(np.abs(o) <= scale, 0, np.sign(o)) for o in (o1, o2, o3, o4))
    proper = (s1 * s2 < 0) & (s3 * s4 < 0)
    touch = ((s1 == 0) & on_segment(a, b, c)) | ((s2 == 0) & on_segment(a, b, d)) | ((s3 == 0) & on_segment(c, d, a)) | ((s4 == 0) & on_segment(c, d, b))
    return proper | touch


# ----------------------------------------------------------------------------------------------- writing


def _fmt(x: float) -> str:
    text = repr(float(x))
    return "0.0" if text == "-0.0" else text


def format_csl(cs: CrossSections, orient: bool = True) -> str:
    """The ``.csl`` text of ``cs``. ``orient`` makes material contours CCW and holes CW about the normal."""
    out = ["CSLC", f"{len(cs.planes)} {max(cs.n_labels, 2)}", ""]
    for k, plane in enumerate(cs.planes, start=1):
        a, b, c = plane.normal
        out.append(f"{k} {len(plane.vertices)} {len(plane.contours)} {_fmt(a)} {_fmt(b)} {_fmt(c)} {_fmt(plane.d)}")
        out.append("")
        out.extend(f"{_fmt(x)} {_fmt(y)} {_fmt(z)}" for x, y, z in plane.vertices)
        out.append("")
        areas = plane.signed_areas() if orient and plane.contours else None
        for j, contour in enumerate(plane.contours):
            idx = contour.indices
            if areas is not None and (areas[j] < 0) != contour.is_hole:
                idx = idx[::-1]
            head = f"{len(idx)}" + (f"h{contour.parent}" if contour.is_hole else "")
            out.append(f"{head} {contour.label} " + " ".join(str(int(i)) for i in idx))
        out.append("")
    return "\n".join(out) + "\n"


def write_csl(cs: CrossSections, path: str | Path, orient: bool = True) -> Path:
    """Write ``cs`` as a ``.csl`` file atomically."""
    from fieldkit.io_atomic import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = format_csl(cs, orient=orient)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path

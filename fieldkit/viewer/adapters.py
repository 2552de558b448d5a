"""What the viewer can show for a method beyond ``render``, discovered by duck typing.

The preferred protocol is explicit (a method defines these and the viewer uses them as-is):

* ``viewer_mesh() -> (vertices [V,3], faces [F,3]) | None``
* ``viewer_polylines() -> list of [K,3] arrays``

Without them, two common shapes are recognised so that existing methods work unchanged:

* a ``mesh(resolution=..., refine=...)`` method returning a trimesh-like object (``.vertices``,
  ``.faces``), optionally as ``(mesh, info)`` (OReX); a ``_mesh_cache`` it keeps is cleared
  first so that the mesh follows training;
* cross-sections (``.planes``, each with ``.vertices`` and ``.contours`` of vertex ``.indices``)
  held as ``source``, ``scene`` or ``cs``: drawn as closed contour polylines.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def has_mesh(method) -> bool:
    return callable(getattr(method, "viewer_mesh", None)) or callable(getattr(method, "mesh", None))


def _as_arrays(out: Any) -> tuple[np.ndarray, np.ndarray] | None:
    if out is None:
        return None
    if isinstance(out, tuple) and len(out) == 2 and hasattr(out[0], "vertices"):
        out = out[0]  # (mesh, info)
    if hasattr(out, "vertices") and hasattr(out, "faces"):
        vertices, faces = out.vertices, out.faces
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        vertices, faces = out
    else:
        return None
    vertices = np.asarray(vertices, dtype=np.float32).reshape(-1, 3)
    faces = np.asarray(faces, dtype=np.int32).reshape(-1, 3)
    if len(vertices) == 0 or len(faces) == 0:
        return None
    return vertices, faces


def mesh_of(method, resolution: int = 64) -> tuple[np.ndarray, np.ndarray] | None:
    """(vertices float32 [V,3], faces int32 [F,3]) of the method's current surface, or None."""
    explicit = getattr(method, "viewer_mesh", None)
    if callable(explicit):
        return _as_arrays(explicit())
    mesh = getattr(method, "mesh", None)
    if not callable(mesh):
        return None
    if hasattr(method, "_mesh_cache"):
        method._mesh_cache = None  # a cache keyed by resolution alone would freeze the mesh during training
    try:
        out = mesh(resolution=resolution, refine=False)
    except TypeError:
        out = mesh()
    return _as_arrays(out)


def polylines_of(method) -> list[np.ndarray]:
    """Polylines to draw (input contours of cross-section methods), each [K,3] float32."""
    explicit = getattr(method, "viewer_polylines", None)
    if callable(explicit):
        return [np.asarray(p, dtype=np.float32).reshape(-1, 3) for p in (explicit() or [])]
    for name in ("source", "scene", "cs"):
        planes = getattr(getattr(method, name, None), "planes", None)
        if not planes:
            continue
        lines = []
        for plane in planes:
            vertices = np.asarray(getattr(plane, "vertices", np.zeros((0, 3))), dtype=np.float32)
            for contour in getattr(plane, "contours", []):
                idx = np.asarray(getattr(contour, "indices", []), dtype=np.int64)
                if len(idx) >= 2 and idx.max() < len(vertices):
                    lines.append(vertices[np.append(idx, idx[0])])  # closed
        return lines
    return []

"""Pictures of meshes without a GPU or a display: a small numpy z-buffer rasteriser plus matplotlib layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _rotation(azimuth_deg: float, elevation_deg: float, up_axis: int = 2) -> np.ndarray:
    """World -> view rotation: rows are screen right, screen up, towards the viewer."""
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    up = np.eye(3)[up_axis]
    a1, a2 = np.eye(3)[(up_axis + 1) % 3], np.eye(3)[(up_axis + 2) % 3]
    toward = np.cos(el) * (np.cos(az) * a1 + np.sin(az) * a2) + np.sin(el) * up
    right = np.cross(up, toward)
    if np.linalg.norm(right) < 1e-9:
        right = a2
    right /= np.linalg.norm(right)
    screen_up = np.cross(toward, right)
    return np.stack([right, screen_up, toward])


def rasterize_mesh(mesh, size: int = 480, azimuth: float = 30.0, elevation: float = 20.0, up_axis: int = 2, color=(0.55, 0.7, 0.9), centre=None, extent=None) -> np.ndarray:
    """Shaded orthographic image [size, size, 3] in [0, 1] (white background) of a triangle mesh."""
    image = np.ones((size, size, 3))
    if len(mesh.faces) == 0:
        return image
    rot = _rotation(azimuth, elevation, up_axis)
    verts = np.asarray(mesh.vertices, np.float64)
    centre = verts.mean(axis=0) if centre is None else centre
    view = (verts - centre) @ rot.T
    extent = float(np.abs(view[:, :2]).max()) * 1.08 if extent is None else extent
    px = (view[:, 0] / extent * 0.5 + 0.5) * (size - 1)
    py = (0.5 - view[:, 1] / extent * 0.5) * (size - 1)
    depth = view[:, 2]
    faces = np.asarray(mesh.faces)
    normals = np.asarray(mesh.face_normals) @ rot.T
    light = np.array([0.4, 0.5, 0.77])
    light /= np.linalg.norm(light)
    shade = 0.25 + 0.75 * np.clip(normals @ light, 0, 1)
    shade = np.where(normals[:, 2] < 0, 0.35 * shade, shade)  # back faces (should not show on closed meshes)
    x, y, z = px[faces], py[faces], depth[faces]
    x0 = np.clip(np.floor(x.min(1)).astype(int), 0, size - 1)
    x1 = np.clip(np.ceil(x.max(1)).astype(int), 0, size - 1)
    y0 = np.clip(np.floor(y.min(1)).astype(int), 0, size - 1)
    y1 = np.clip(np.ceil(y.max(1)).astype(int), 0, size - 1)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    counts = w * h
    tri = np.repeat(np.arange(len(faces)), counts)
    offs = np.arange(len(tri)) - np.repeat(np.cumsum(counts) - counts, counts)
    qx = x0[tri] + offs % w[tri]
    qy = y0[tri] + offs // w[tri]
    ax, ay, bx, by, cx, cy = x[tri, 0], y[tri, 0], x[tri, 1], y[tri, 1], x[tri, 2], y[tri, 2]
    det = (bx - ax) * (cy - ay) - (cx - ax) * (by - ay)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = ((qx - ax) * (cy - ay) - (cx - ax) * (qy - ay)) / det
        t = ((bx - ax) * (qy - ay) - (qx - ax) * (by - ay)) / det
    inside = (det != 0) & (s >= -1e-6) & (t >= -1e-6) & (s + t <= 1 + 1e-6)
    tri, qx, qy, s, t = tri[inside], qx[inside], qy[inside], s[inside], t[inside]
    zq = z[tri, 0] + s * (z[tri, 1] - z[tri, 0]) + t * (z[tri, 2] - z[tri, 0])
    pixel = qy * size + qx
    order = np.lexsort((-zq, pixel))  # per pixel, nearest (largest depth towards viewer) first
    pixel, tri = pixel[order], tri[order]
    first = np.ones(len(pixel), dtype=bool)
    first[1:] = pixel[1:] != pixel[:-1]
    flat = image.reshape(-1, 3)
    flat[pixel[first]] = shade[tri[first], None] * np.asarray(color)
    return image


def save_mesh_views(mesh, path: str | Path, title: str = "", contours=None, views=((30, 20), (120, 20), (210, 35)), up_axis: int = 2, size: int = 420) -> Path:
    """A PNG with the mesh from a few directions, plus the input contours in 3D when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fieldkit.io_atomic import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panels = len(views) + (1 if contours is not None else 0)
    fig = plt.figure(figsize=(3.6 * panels, 3.9))
    if contours is not None:
        ax = fig.add_subplot(1, panels, 1, projection="3d")
        for plane in contours.planes:
            for contour in plane.contours:
                loop = plane.vertices[np.append(contour.indices, contour.indices[0])]
                ax.plot(loop[:, 0], loop[:, 1], loop[:, 2], lw=0.6, color="tab:red" if contour.is_hole else "tab:blue")
        verts = contours.all_vertices()
        mid, half = (verts.max(0) + verts.min(0)) / 2, (verts.max(0) - verts.min(0)).max() / 2
        ax.set(xlim=(mid[0] - half, mid[0] + half), ylim=(mid[1] - half, mid[1] + half), zlim=(mid[2] - half, mid[2] + half))
        ax.set_title(f"input: {len(contours.planes)} planes, {len(contours.directions())} directions", fontsize=9)
        ax.tick_params(labelsize=6)
    for i, (az, el) in enumerate(views):
        ax = fig.add_subplot(1, panels, i + 1 + (1 if contours is not None else 0))
        ax.imshow(rasterize_mesh(mesh, size, az, el, up_axis))
        ax.set_axis_off()
        ax.set_title(f"azimuth {az}, elevation {el}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path

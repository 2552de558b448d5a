"""Meshes from trained models: marching cubes on a field's density, TSDF fusion of rendered depth.

* :func:`field_mesh` — density of a radiance field sampled on a grid over its (bounded) box,
  iso-surface at the density whose opacity over one render step is 1/2, vertex colours from the
  field seen along the inward normal.
* :func:`tsdf_mesh` — the general path for any method that renders depth (Gaussian splats
  included): render depth and colour at the training views, fuse a truncated signed distance
  field (open3d's ScalableTSDFVolume when importable, the torch implementation below otherwise),
  take its zero level set.

Iso-surfaces use scikit-image's marching cubes when importable and a table-free marching
tetrahedra (:func:`marching_tetrahedra`) otherwise. Meshes are written as binary PLY with
per-vertex ``red green blue`` (uchar), which MeshLab, Blender, open3d and trimesh read.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fieldkit.cameras import Cameras
from fieldkit.io_atomic import atomic_path

log = logging.getLogger("fieldkit")

# ---------------------------------------------------------------------------------------------
# Iso-surfaces
# ---------------------------------------------------------------------------------------------

# Kuhn decomposition of the unit cube into 6 tetrahedra sharing the main diagonal 0 -> 7
# (corner c has offset (c & 1, c >> 1 & 1, c >> 2 & 1)); neighbouring cubes' faces match.
_TETS = [(0, 7) + pair for pair in ((1, 3), (3, 2), (2, 6), (6, 4), (4, 5), (5, 1))]
_TETS = [(a, c, d, b) for a, b, c, d in _TETS]  # (0, x, y, 7)


def _tet_cases() -> dict[int, list[tuple[tuple[int, int], ...]]]:
    """For each inside-mask of a tetrahedron's 4 corners: triangles as triples of crossing edges."""
    cases = {}
    for mask in range(16):
        inside = [i for i in range(4) if mask >> i & 1]
        outside = [i for i in range(4) if not mask >> i & 1]
        if len(inside) in (0, 4):
            cases[mask] = []
        elif len(inside) in (1, 3):
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            cases[mask] = [tuple((lone, o) for o in others)]
        else:
            (a, b), (c, d) = inside, outside
            cases[mask] = [((a, c), (a, d), (b, d)), ((a, c), (b, d), (b, c))]
    return cases


_CASES = _tet_cases()


def marching_tetrahedra(values: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface of a grid [X,Y,Z] at ``level`` (inside: values > level), in index coordinates.

    Each cube is split into 6 tetrahedra; crossing edges get one shared vertex each (linear
    interpolation), so the mesh is closed wherever the surface does not leave the grid.
    Triangles face from inside to outside.
    """
    values = np.asarray(values, dtype=np.float64)
    X, Y, Z = values.shape
    if min(X, Y, Z) < 2:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    flat = values.reshape(-1)
    ii, jj, kk = np.meshgrid(np.arange(X - 1), np.arange(Y - 1), np.arange(Z - 1), indexing="ij")
    base = (ii * Y * Z + jj * Z + kk).reshape(-1)
    corner_offset = [(c & 1) * Y * Z + (c >> 1 & 1) * Z + (c >> 2 & 1) for c in range(8)]
    edge_keys, tri_edges = [], []
    for tet in _TETS:
        nodes = np.stack([base + corner_offset[c] for c in tet], axis=1)  # [cubes, 4]
        inside = flat[nodes] > level
        mask = (inside * (1 << np.arange(4))).sum(axis=1)
        for case, triangles in _CASES.items():
            if not triangles:
                continue
            sel = nodes[mask == case]
            if len(sel) == 0:
                continue
            for tri in triangles:
                edges = np.stack([np.stack([sel[:, a], sel[:, b]], axis=-1) for a, b in tri], axis=1)  # [n, 3, 2]
                tri_edges.append(edges)
    if not tri_edges:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    edges = np.concatenate(tri_edges)  # [T, 3, 2] node pairs, first node inside or outside
    lo, hi = np.minimum(edges[..., 0], edges[..., 1]), np.maximum(edges[..., 0], edges[..., 1])
    keys = lo.astype(np.int64) * flat.size + hi
    unique, faces = np.unique(keys.reshape(-1), return_inverse=True)
    faces = faces.reshape(-1, 3)
    a, b = unique // flat.size, unique % flat.size
    va, vb = flat[a], flat[b]
    t = np.clip((level - va) / np.where(va == vb, 1e-12, vb - va), 0.0, 1.0)
    coords = lambda n: np.stack([n // (Y * Z), n // Z % Y, n % Z], axis=-1).astype(np.float64)  # noqa: E731
    verts = coords(a) + t[:, None] * (coords(b) - coords(a))
    # orient: normal along (outside - inside), estimated from the grid gradient at the face centre
    tri = verts[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    centre = np.clip(np.round(tri.mean(axis=1)).astype(np.int64), 0, np.array([X - 1, Y - 1, Z - 1]))
    grad = np.stack(np.gradient(values), axis=-1)[centre[:, 0], centre[:, 1], centre[:, 2]]
    flip = (normal * grad).sum(-1) > 0  # values grow inwards: outward normals oppose the gradient
    faces[flip] = faces[flip][:, ::-1]
    keep = np.linalg.norm(normal, axis=-1) > 0
    return verts, faces[keep]


def iso_surface(values: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (index coordinates) and faces of ``values > level``: scikit-image's marching cubes
    when importable, :func:`marching_tetrahedra` otherwise. Normals point outwards."""
    values = np.asarray(values, dtype=np.float32)
    if not (values > level).any() or (values > level).all():
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    if importlib.util.find_spec("skimage") is not None:
        from skimage.measure import marching_cubes

        verts, faces, _, _ = marching_cubes(values, level=level, allow_degenerate=False)
        return verts.astype(np.float64), faces[:, ::-1].astype(np.int64)  # skimage faces point to low values
    return marching_tetrahedra(values, level)


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    normals = np.zeros_like(verts)
    tri = verts[faces]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    for k in range(3):
        np.add.at(normals, faces[:, k], face_n)
    return normals / np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)


def write_mesh_ply(path: Path, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> Path:
    """Binary PLY: float x y z (+ uchar red green blue), faces as uchar-counted int lists."""
    from plyfile import PlyData, PlyElement

    fields = [("x", "f4"), ("y", "f4"), ("z", "f4")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertex = np.empty(len(verts), dtype=fields)
    for i, axis in enumerate("xyz"):
        vertex[axis] = verts[:, i]
    if colors is not None:
        c8 = np.clip(np.round(np.asarray(colors) * 255), 0, 255).astype(np.uint8)
        for i, ch in enumerate(("red", "green", "blue")):
            vertex[ch] = c8[:, i]
    face = np.empty(len(faces), dtype=[("vertex_indices", "i4", (3,))])
    face["vertex_indices"] = faces.astype(np.int32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        PlyData([PlyElement.describe(vertex, "vertex"), PlyElement.describe(face, "face")], text=False).write(str(tmp))
    return path


def read_mesh_ply(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    from plyfile import PlyData

    ply = PlyData.read(str(path))
    v = ply["vertex"]
    verts = np.stack([v["x"], v["y"], v["z"]], axis=-1).astype(np.float64)
    names = v.data.dtype.names
    colors = np.stack([v["red"], v["green"], v["blue"]], -1) / 255.0 if "red" in names else None
    faces = np.stack(ply["face"]["vertex_indices"]).astype(np.int64) if len(ply["face"].data) else np.zeros((0, 3), np.int64)
    return verts, faces, colors


# ---------------------------------------------------------------------------------------------
# Radiance fields: marching cubes on density
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def field_mesh(method, resolution: int = 256, level: float | None = None, chunk: int = 1 << 18):
    """(verts [V,3] world, faces [F,3], colours [V,3]) of a NeRF method's density iso-surface.

    The grid spans the bounded box (the inner box of a contracted scene). ``level`` defaults to
    the density whose opacity over one render step is 1/2: ln 2 / step.
    """
    model, space = method.model, method.space
    level = math.log(2.0) / method.step_size if level is None else level
    device = next(model.parameters()).device
    lin = torch.linspace(0.0, 1.0, resolution, device=device)
    inner = (0.25, 0.75) if space.contracted else (0.0, 1.0)
    lin = inner[0] + (inner[1] - inner[0]) * lin
    grid = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), dim=-1).reshape(-1, 3)
    density = torch.cat([model.density(grid[i : i + chunk]) for i in range(0, len(grid), chunk)])
    values = density.reshape(resolution, resolution, resolution).cpu().numpy()
    verts_idx, faces = iso_surface(values, level)
    if len(faces) == 0:
        return np.zeros((0, 3)), faces, np.zeros((0, 3))
    unit = inner[0] + (inner[1] - inner[0]) * torch.from_numpy(verts_idx / (resolution - 1)).float().to(device)
    verts = space.from_unit(unit)
    normals = torch.from_numpy(vertex_normals(verts.cpu().numpy(), faces)).float().to(device)
    colors = torch.cat([model(unit[i : i + chunk], -normals[i : i + chunk])[1] for i in range(0, len(unit), chunk)])
    return verts.cpu().numpy(), faces, colors.cpu().numpy()


def export_field_mesh(method, path: Path, resolution: int = 256) -> Path:
    verts, faces, colors = field_mesh(method, resolution)
    if len(faces) == 0:
        raise ValueError("the field has no surface at the default density level (is the run trained?)")
    return write_mesh_ply(path, verts, faces, colors)


# ---------------------------------------------------------------------------------------------
# TSDF fusion of rendered depth (any method)
# ---------------------------------------------------------------------------------------------


class TSDFVolume:
    """Truncated signed distance volume over a box (torch; CPU or CUDA).

    ``integrate`` adds one depth map (camera z, 0 = no surface) and colour image: every voxel
    whose centre projects inside the image and has depth > 0 there gets
    sdf = (depth - z_voxel) / trunc clipped to [-1, 1], averaged with weight 1 while sdf > -1.
    """

    def __init__(self, box: Tensor, resolution: int = 256, trunc: float | None = None, device="cpu"):
        box = torch.as_tensor(box, dtype=torch.float32, device=device)
        self.box = box
        self.resolution = resolution
        self.voxel = float((box[1] - box[0]).max()) / (resolution - 1)
        self.trunc = trunc if trunc is not None else 4.0 * self.voxel
        lin = [torch.linspace(float(box[0, d]), float(box[0, d]) + self.voxel * (resolution - 1), resolution, device=device) for d in range(3)]
        self.points = torch.stack(torch.meshgrid(*lin, indexing="ij"), dim=-1).reshape(-1, 3)
        n = self.points.shape[0]
        self.tsdf = torch.ones(n, device=device)
        self.weight = torch.zeros(n, device=device)
        self.color = torch.zeros(n, 3, device=device)

    @torch.no_grad()
    def integrate(self, depth: Tensor, rgb: Tensor, camera: Cameras) -> None:
        H, W = depth.shape[:2]
        w2c = camera.world_to_cam[0].float().to(self.points.device)
        K = camera.K[0].float().to(self.points.device)
        cam = self.points @ w2c[:3, :3].T + w2c[:3, 3]
        z = cam[:, 2]
        u = K[0, 0] * cam[:, 0] / z.clamp_min(1e-6) + K[0, 2]
        v = K[1, 1] * cam[:, 1] / z.clamp_min(1e-6) + K[1, 2]
        col, row = torch.floor(u).long(), torch.floor(v).long()
        ok = (z > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
        idx = ok.nonzero()[:, 0]
        d = depth.reshape(H, W)[row[idx], col[idx]].to(z)
        sdf = ((d - z[idx]) / self.trunc).clamp(max=1.0)
        use = (d > 0) & (sdf > -1.0)
        idx, sdf = idx[use], sdf[use]
        c = rgb.reshape(H, W, 3)[row[idx], col[idx]].to(z)
        w = self.weight[idx]
        self.tsdf[idx] = (self.tsdf[idx] * w + sdf) / (w + 1)
        self.color[idx] = (self.color[idx] * w[:, None] + c) / (w + 1)[:, None]
        self.weight[idx] = w + 1

    def mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        R = self.resolution
        # inside = negative sdf; unobserved voxels count as outside
        values = torch.where(self.weight > 0, -self.tsdf, torch.full_like(self.tsdf, -1.0)).reshape(R, R, R).cpu().numpy()
        verts_idx, faces = iso_surface(values, 0.0)
        if len(faces) == 0:
            return np.zeros((0, 3)), faces, np.zeros((0, 3))
        verts = self.box[0].cpu().numpy() + verts_idx * self.voxel
        nearest = np.clip(np.round(verts_idx).astype(np.int64), 0, R - 1)
        flat = (nearest[:, 0] * R + nearest[:, 1]) * R + nearest[:, 2]
        return verts, faces, self.color[torch.from_numpy(flat).to(self.color.device)].cpu().numpy()


def _open3d_tsdf(frames, box, resolution):
    import open3d as o3d  # type: ignore[import-not-found]

    voxel = float((box[1] - box[0]).max()) / resolution
    volume = o3d.pipelines.integration.ScalableTSDFVolume(
        voxel_length=voxel, sdf_trunc=4 * voxel, color_type=o3d.pipelines.integration.TSDFVolumeColorType.RGB8)
    for depth, rgb, camera in frames:
        H, W = depth.shape[:2]
        K = camera.K[0].double().numpy()
        intr = o3d.camera.PinholeCameraIntrinsic(W, H, K[0, 0], K[1, 1], K[0, 2], K[1, 2])
        color = o3d.geometry.Image(np.ascontiguousarray((rgb.numpy() * 255).astype(np.uint8)))
        dimg = o3d.geometry.Image(np.ascontiguousarray(depth.reshape(H, W).numpy().astype(np.float32)))
        rgbd = o3d.geometry.RGBDImage.create_from_color_and_depth(color, dimg, depth_scale=1.0, depth_trunc=1e6,
                                                                  convert_rgb_to_intensity=False)
        volume.integrate(rgbd, intr, camera.world_to_cam[0].double().numpy())
    mesh = volume.extract_triangle_mesh()
    lo, hi = box[0].numpy(), box[1].numpy()
    verts = np.asarray(mesh.vertices)
    keep_v = np.all((verts >= lo) & (verts <= hi), axis=1)
    faces = np.asarray(mesh.triangles)
    faces = faces[keep_v[faces].all(axis=1)]
    return verts, faces, np.asarray(mesh.vertex_colors)


@torch.no_grad()
def tsdf_mesh(method, scene, *, resolution: int = 256, split: str = "train", max_views: int | None = None,
              box: Tensor | None = None, use_open3d: bool | None = None):
    """(verts, faces, colours) fused from the method's rendered depth at a split's views."""
    images, cameras = scene.subset(split)
    ids = list(range(len(cameras)))
    if max_views is not None and len(ids) > max_views:
        ids = torch.linspace(0, len(ids) - 1, max_views).round().long().tolist()
    if box is None:
        space = getattr(method, "space", None)
        box = space.box.cpu() if space is not None and not space.contracted else scene.bounds
    box = torch.as_tensor(box, dtype=torch.float32)
    frames = []
    for i in ids:
        out = method.render(cameras[i])
        depth = out["depth"][0, ..., 0].cpu()
        if "alpha" in out:  # pixels the model leaves (mostly) empty carry no surface
            depth = torch.where(out["alpha"][0, ..., 0].cpu() > 0.5, depth, torch.zeros_like(depth))
        frames.append((depth, out["rgb"][0].cpu(), cameras[i]))
    if use_open3d is None:
        use_open3d = importlib.util.find_spec("open3d") is not None
    if use_open3d:
        return _open3d_tsdf(frames, box, resolution)
    volume = TSDFVolume(box, resolution)
    for depth, rgb, camera in frames:
        volume.integrate(depth, rgb, camera)
    return volume.mesh()


def export_tsdf_mesh(method, scene, path: Path, resolution: int = 256, max_views: int | None = 50) -> Path:
    verts, faces, colors = tsdf_mesh(method, scene, resolution=resolution, max_views=max_views)
    if len(faces) == 0:
        raise ValueError("TSDF fusion found no surface (do the renders have depth?)")
    return write_mesh_ply(path, verts, faces, colors)


def export_mesh(method, path: Path, scene=None, *, tsdf: bool | None = None, resolution: int = 256) -> Path:
    """Mesh of any image-trained method: marching cubes on density for fields in a bounded box,
    TSDF fusion of rendered depth otherwise (or when ``tsdf``)."""
    has_field = hasattr(method, "model") and hasattr(method, "space")
    if tsdf is None:
        tsdf = not has_field
    if not tsdf:
        return export_field_mesh(method, path, resolution)
    if scene is None:
        scene = getattr(method, "scene", None)
    if scene is None:
        raise ValueError("TSDF fusion needs the run's scene (its training views)")
    return export_tsdf_mesh(method, scene, path, resolution)


__all__ = [
    "TSDFVolume", "export_field_mesh", "export_mesh", "export_tsdf_mesh", "field_mesh", "iso_surface",
    "marching_tetrahedra", "read_mesh_ply", "tsdf_mesh", "vertex_normals", "write_mesh_ply",
]

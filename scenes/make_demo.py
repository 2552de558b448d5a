#!/usr/bin/env python3
"""Generate the demo scene: an analytic ray-traced tabletop in the NeRF "Blender" layout.

This is an independent ground truth for the project's Gaussian-splatting trainer: it
uses only numpy (ray/primitive intersection in closed form) and Pillow (PNG writing),
never a splat renderer.

Scene (world Z-up, as in Blender), everything inside a radius-1.5 sphere around the
origin:

* a finite square floor (z = 0, |x|, |y| <= FLOOR_HALF) with a two-tone checker;
* a purple pedestal box at the origin carrying the red "probe" sphere on top
  (``PROBE_CENTER``), placed high so that no other object hides it from any view;
* a blue and a yellow sphere, a green axis-aligned box and an orange box rotated
  about Z;
* Lambertian shading: ambient + one directional light, with hard shadows from
  shadow rays.

Images are RGBA 8-bit PNGs with *straight* (un-premultiplied) alpha. Each pixel is
supersampled on an SS x SS regular grid inside the pixel; alpha is the fraction of
sub-samples that hit geometry and the stored RGB is the mean colour of the hitting
sub-samples (premultiplied mean / alpha), so ``rgb * a + bg * (1 - a)`` reproduces the
supersampled render over any background ``bg`` (up to 8-bit rounding). Pixels that hit
nothing are (0, 0, 0, 0).

Cameras (OpenGL/Blender convention: +X right, +Y up, looking along -Z; the JSON
``transform_matrix`` is camera-to-world) sit on a Fibonacci spiral over the upper
hemisphere at radius ``CAMERA_RADIUS``, looking at the origin with world Z up; every
k-th spiral point goes to the test split, so test views interleave with train views in
azimuth and elevation. There is no randomness at all, so the output is deterministic.

Pixel convention: pixel (row i, col j) has its centre at (u, v) = (j + 0.5, i + 0.5);
f = 0.5 * W / tan(0.5 * camera_angle_x), cx = W / 2, cy = H / 2, and the OpenGL camera
ray through (u, v) is ((u - cx) / f, -(v - cy) / f, -1).

Usage::

    python scenes/make_demo.py --out scenes/demo --size 128 --train 60 --test 20
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------- constants

CAMERA_ANGLE_X: float = 0.6911112070083618  # same horizontal FOV as the NeRF "lego" scene
CAMERA_RADIUS: float = 4.0
ELEVATION_RANGE_DEG: tuple[float, float] = (10.0, 70.0)
SUPERSAMPLE: int = 3  # SS x SS sub-samples per pixel
SEED: int | None = None  # the generator uses no randomness

FLOOR_HALF: float = 0.95
FLOOR_CHECKS: int = 8  # checker squares along each side
FLOOR_COLORS: tuple[tuple[float, float, float], tuple[float, float, float]] = (
    (0.88, 0.86, 0.80),
    (0.22, 0.27, 0.33),
)

LIGHT_DIR: np.ndarray = np.array([0.45, 0.30, 0.84]) / np.linalg.norm([0.45, 0.30, 0.84])
AMBIENT: float = 0.30
DIFFUSE: float = 0.75
EPS: float = 1e-6


@dataclass(frozen=True)
class Sphere:
    """A sphere with a constant albedo."""

    name: str
    center: tuple[float, float, float]
    radius: float
    color: tuple[float, float, float]


@dataclass(frozen=True)
class Box:
    """A box rotated by ``yaw`` radians about world Z around its centre."""

    name: str
    center: tuple[float, float, float]
    half: tuple[float, float, float]
    color: tuple[float, float, float]
    yaw: float = 0.0


PROBE_CENTER: tuple[float, float, float] = (0.0, 0.0, 0.78)
PROBE_RADIUS: float = 0.28
PROBE_COLOR: tuple[float, float, float] = (0.90, 0.12, 0.10)

SPHERES: tuple[Sphere, ...] = (
    Sphere("red_probe", PROBE_CENTER, PROBE_RADIUS, PROBE_COLOR),
    Sphere("blue", (0.52, 0.50, 0.25), 0.25, (0.12, 0.30, 0.90)),
    Sphere("yellow", (-0.58, 0.38, 0.18), 0.18, (0.95, 0.82, 0.10)),
)
BOXES: tuple[Box, ...] = (
    Box("purple_pedestal", (0.0, 0.0, 0.25), (0.17, 0.17, 0.25), (0.55, 0.25, 0.78)),
    Box("green", (-0.50, -0.48, 0.20), (0.24, 0.18, 0.20), (0.15, 0.72, 0.25)),
    Box("orange", (0.52, -0.45, 0.15), (0.22, 0.12, 0.15), (0.98, 0.50, 0.08), yaw=math.radians(35.0)),
)

# ----------------------------------------------------------------------------- cameras


def look_at_c2w(position: np.ndarray, target: np.ndarray = np.zeros(3)) -> np.ndarray:
    """Camera-to-world 4x4 (OpenGL axes) at ``position`` looking at ``target``, world Z up."""
    forward = target - position
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, 0.0, 1.0]))
    right = right / np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0] = right
    c2w[:3, 1] = up
    c2w[:3, 2] = -forward
    c2w[:3, 3] = position
    return c2w


def camera_poses(n_train: int, n_test: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fibonacci-spiral poses on the upper hemisphere, split into interleaved train/test."""
    total = n_train + n_test
    lo, hi = (math.sin(math.radians(a)) for a in ELEVATION_RANGE_DEG)
    golden = math.pi * (3.0 - math.sqrt(5.0))
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for k in range(total):
        elevation = math.asin(lo + (hi - lo) * (k + 0.5) / total)
        azimuth = (k * golden) % (2.0 * math.pi)
        pos = CAMERA_RADIUS * np.array(
            [math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)]
        )
        is_test = (k + 1) * n_test // total > k * n_test // total
        (test if is_test else train).append(look_at_c2w(pos))
    return train, test


def pixel_rays(c2w: np.ndarray, size: int, angle_x: float, ss: int) -> tuple[np.ndarray, np.ndarray]:
    """World-space ray origins and unit directions, shape [size, size, ss*ss, 3]."""
    f = 0.5 * size / math.tan(0.5 * angle_x)
    c = 0.5 * size
    sub = (np.arange(ss) + 0.5) / ss  # sub-sample offsets inside the pixel
    jj = np.arange(size)[None, :, None, None] + sub[None, None, None, :]  # u = j + offset
    ii = np.arange(size)[:, None, None, None] + sub[None, None, :, None]  # v = i + offset
    u = np.broadcast_to(jj, (size, size, ss, ss)).reshape(size, size, ss * ss)
    v = np.broadcast_to(ii, (size, size, ss, ss)).reshape(size, size, ss * ss)
    d_cam = np.stack([(u - c) / f, -(v - c) / f, -np.ones_like(u)], axis=-1)
    d = d_cam @ c2w[:3, :3].T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    o = np.broadcast_to(c2w[:3, 3], d.shape)
    return o, d


# ----------------------------------------------------------------------------- intersection


def _hit_sphere(o: np.ndarray, d: np.ndarray, s: Sphere) -> tuple[np.ndarray, np.ndarray]:
    """Nearest positive hit distance (inf on miss) and outward normal at it."""
    oc = o - np.asarray(s.center)
    b = np.einsum("ij,ij->i", oc, d)
    cc = np.einsum("ij,ij->i", oc, oc) - s.radius**2
    disc = b * b - cc
    sq = np.sqrt(np.maximum(disc, 0.0))
    t0, t1 = -b - sq, -b + sq
    t = np.where(t0 > EPS, t0, np.where(t1 > EPS, t1, np.inf))
    t = np.where(disc >= 0.0, t, np.inf)
    p = o + d * np.where(np.isfinite(t), t, 0.0)[:, None]
    n = (p - np.asarray(s.center)) / s.radius
    return t, n


def _hit_box(o: np.ndarray, d: np.ndarray, b: Box) -> tuple[np.ndarray, np.ndarray]:
    """Slab test in the box frame; nearest positive hit distance and outward normal."""
    cy, sy = math.cos(b.yaw), math.sin(b.yaw)
    rot = np.array([[cy, -sy, 0.0], [sy, cy, 0.0], [0.0, 0.0, 1.0]])  # box -> world
    ol = (o - np.asarray(b.center)) @ rot
    dl = d @ rot
    dl = np.where(np.abs(dl) < 1e-12, 1e-12, dl)
    half = np.asarray(b.half)
    ta = (-half - ol) / dl
    tb = (half - ol) / dl
    tnear = np.minimum(ta, tb)
    tfar = np.maximum(ta, tb)
    t_in = tnear.max(axis=1)
    t_out = tfar.min(axis=1)
    axis_in = tnear.argmax(axis=1)
    axis_out = tfar.argmin(axis=1)
    hit = t_out >= np.maximum(t_in, EPS)
    entering = t_in > EPS
    t = np.where(hit, np.where(entering, t_in, t_out), np.inf)
    axis = np.where(entering, axis_in, axis_out)
    rows = np.arange(len(o))
    n_local = np.zeros_like(ol)
    sign = -np.sign(dl[rows, axis])
    n_local[rows, axis] = np.where(entering, sign, -sign)
    return t, n_local @ rot.T


def _hit_floor(o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hit distance on the finite square floor (seen from above) and its checker albedo."""
    dz = np.where(d[:, 2] < -1e-12, d[:, 2], -1e-12)
    t = -o[:, 2] / dz
    p = o + d * t[:, None]
    inside = (d[:, 2] < -1e-12) & (t > EPS) & (np.abs(p[:, 0]) <= FLOOR_HALF) & (np.abs(p[:, 1]) <= FLOOR_HALF)
    t = np.where(inside, t, np.inf)
    cell = 2.0 * FLOOR_HALF / FLOOR_CHECKS
    parity = (np.floor((p[:, 0] + FLOOR_HALF) / cell) + np.floor((p[:, 1] + FLOOR_HALF) / cell)) % 2
    albedo = np.where((parity == 0)[:, None], np.asarray(FLOOR_COLORS[0]), np.asarray(FLOOR_COLORS[1]))
    return t, albedo


def _occluded(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """True where a ray from ``o`` along ``d`` hits any object (the floor never shadows)."""
    blocked = np.zeros(len(o), dtype=bool)
    for s in SPHERES:
        blocked |= np.isfinite(_hit_sphere(o, d, s)[0])
    for b in BOXES:
        blocked |= np.isfinite(_hit_box(o, d, b)[0])
    return blocked


def trace(o: np.ndarray, d: np.ndarray, shadows: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Shade flat arrays of rays [N,3]; returns (rgb [N,3] in [0,1], hit mask [N])."""
    n_rays = len(o)
    t_best, albedo = _hit_floor(o, d)
    normal = np.tile(np.array([0.0, 0.0, 1.0]), (n_rays, 1))
    for prim in (*SPHERES, *BOXES):
        t, n = _hit_sphere(o, d, prim) if isinstance(prim, Sphere) else _hit_box(o, d, prim)
        closer = t < t_best
        t_best = np.where(closer, t, t_best)
        normal = np.where(closer[:, None], n, normal)
        albedo = np.where(closer[:, None], np.asarray(prim.color), albedo)
    hit = np.isfinite(t_best)
    rgb = np.zeros((n_rays, 3))
    if not hit.any():
        return rgb, hit
    p = o[hit] + d[hit] * t_best[hit, None]
    n = normal[hit]
    lambert = np.clip(n @ LIGHT_DIR, 0.0, None)
    if shadows:
        lit = lambert > 0.0
        shadow_o = p[lit] + 1e-4 * n[lit]
        blocked = _occluded(shadow_o, np.broadcast_to(LIGHT_DIR, shadow_o.shape))
        idx = np.flatnonzero(lit)[blocked]
        lambert[idx] = 0.0
    rgb[hit] = np.clip(albedo[hit] * (AMBIENT + DIFFUSE * lambert)[:, None], 0.0, 1.0)
    return rgb, hit


# ----------------------------------------------------------------------------- images


def render_view(
    c2w: np.ndarray, size: int, angle_x: float = CAMERA_ANGLE_X, ss: int = SUPERSAMPLE
) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled render: premultiplied mean colour [H,W,3] and coverage alpha [H,W]."""
    o, d = pixel_rays(c2w, size, angle_x, ss)
    rgb, hit = trace(o.reshape(-1, 3), d.reshape(-1, 3))
    rgb = rgb.reshape(size, size, ss * ss, 3)
    hit = hit.reshape(size, size, ss * ss)
    premult = rgb.mean(axis=2)  # misses contribute colour 0
    alpha = hit.mean(axis=2)
    return premult, alpha


def encode_rgba(premult: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """8-bit straight-alpha RGBA: RGB = premultiplied / alpha (0 where alpha is 0)."""
    straight = np.where(alpha[..., None] > 0, premult / np.maximum(alpha, 1e-12)[..., None], 0.0)
    rgba = np.concatenate([np.clip(straight, 0.0, 1.0), alpha[..., None]], axis=-1)
    return np.round(rgba * 255.0).astype(np.uint8)


def _frames_json(split: str, poses: Sequence[np.ndarray]) -> list[dict]:
    return [
        {
            "file_path": f"./{split}/r_{k}",
            "rotation": 0.0,
            "transform_matrix": [[float(x) + 0.0 for x in row] for row in c2w],  # no -0.0
        }
        for k, c2w in enumerate(poses)
    ]


def _write_json(path: Path, frames: list[dict]) -> None:
    path.write_text(json.dumps({"camera_angle_x": CAMERA_ANGLE_X, "frames": frames}, indent=2) + "\n")


def generate(out: Path, size: int = 128, n_train: int = 60, n_test: int = 20) -> None:
    """Render all views and write the Blender-layout folder ``out``."""
    out = Path(out)
    train, test = camera_poses(n_train, n_test)
    for split, poses in (("train", train), ("test", test)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for k, c2w in enumerate(poses):
            premult, alpha = render_view(c2w, size)
            Image.fromarray(encode_rgba(premult, alpha), mode="RGBA").save(
                out / split / f"r_{k}.png", optimize=True
            )
        _write_json(out / f"transforms_{split}.json", _frames_json(split, poses))
    # Validation split: a few of the test frames (same images, no extra files).
    test_frames = _frames_json("test", test)
    _write_json(out / "transforms_val.json", test_frames[:: max(1, len(test_frames) // 5)][:5])


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo")
    parser.add_argument("--size", type=int, default=128, help="image width = height in pixels")
    parser.add_argument("--train", type=int, default=60, help="number of training views")
    parser.add_argument("--test", type=int, default=20, help="number of test views")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    generate(args.out, args.size, args.train, args.test)
    print(f"wrote {args.train}+{args.test} views of {args.size}x{args.size} to {args.out} "
          f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()

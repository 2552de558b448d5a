#!/usr/bin/env python3
"""Viewer throughput on this machine: frames delivered to one browser, and training with a client.

Everything runs on 127.0.0.1 with the headless protocol client of ``fieldkit.viewer.testing``
standing in for a browser tab (it decodes every frame it receives, as a browser would).

1. Frames per second delivered to one client whose canvas is WxH (default 512x512) while its
   camera orbits continuously (a new camera every 10 ms):
   * ``full``: every frame at the full WxH (the viewer's minimum moving size forced to WxH);
   * ``adaptive``: the viewer's own policy (resolution sized for ``target_fps``), with the
     median delivered size;
   * the direct ``method.render`` time at WxH, for reference (the ceiling).
2. Training steps/s continuing the run from its checkpoint (same steps each time): without a
   viewer, with a viewer and one resting client (refreshed as the model changes), and with one
   client orbiting continuously. Conditions alternate over ``--repeats`` rounds; medians.

    python benchmarks/viewer_bench.py outputs/lego_200/gs/<time> [--size 512] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch


def orbit_view(center: np.ndarray, radius: float, height: float, angle: float, size: int, fov: float):
    from fieldkit.cameras import look_at_w2c
    from fieldkit.cameras import intrinsics_matrix, Cameras
    from fieldkit.viewer.camera import view_from_cameras

    eye = center + np.array([radius * math.cos(angle), radius * math.sin(angle), height])
    w2c = look_at_w2c(torch.tensor(eye), torch.tensor(center), torch.tensor([0.0, 0.0, 1.0]))
    f = 0.5 * size / math.tan(0.5 * fov)
    return view_from_cameras(Cameras(w2c[None], intrinsics_matrix(f, f, size / 2, size / 2)[None], size, size))


class Orbiter:
    """A client thread that moves its camera every ``interval`` s and counts decoded frames."""

    def __init__(self, port: int, geometry, size: int, interval: float | None = 0.01):
        from fieldkit.viewer.testing import ViserTestClient

        center, radius, height, fov = geometry
        self.client = ViserTestClient(port)
        self.args = (center, radius, height, size, fov)
        self.interval = interval
        self.stop = threading.Event()
        self.frames: list[tuple[float, int, int, str]] = []
        self.client.send_camera(orbit_view(center, radius, height, 0.0, size, fov))
        self._mover = threading.Thread(target=self._move, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._mover.start()
        self._reader.start()

    def _move(self) -> None:
        if self.interval is None:
            return
        center, radius, height, size, fov = self.args
        k = 0
        while not self.stop.wait(self.interval):
            k += 1
            try:
                self.client.send_camera(orbit_view(center, radius, height, 0.01 * k, size, fov))
            except Exception:
                return

    def _read(self) -> None:
        while not self.stop.is_set():
            image = self.client.wait_for_image(0.2)
            if image is not None:
                self.frames.append((image.received_at, image.image.shape[1], image.image.shape[0], image.format))

    def close(self) -> None:
        self.stop.set()
        self._mover.join(2)
        self._reader.join(2)
        self.client.close()


def measure_fps(viewer, seconds: float, geometry, size: int, forced: bool) -> dict:
    cfg = viewer.config
    saved = (cfg.min_side, cfg.max_side)
    if forced:
        cfg.min_side = cfg.max_side = size
    else:
        cfg.max_side = max(cfg.max_side, size)
    orbiter = Orbiter(viewer.port, geometry, size)
    try:
        time.sleep(1.0)  # warm up (first frames, resolution estimate)
        start = time.monotonic()
        n0 = len(orbiter.frames)
        time.sleep(seconds)
        frames = orbiter.frames[n0:]
        elapsed = time.monotonic() - start
    finally:
        orbiter.close()
        cfg.min_side, cfg.max_side = saved
    sizes = [w * h for _, w, h, _ in frames]
    median_side = int(round(math.sqrt(statistics.median(sizes)))) if sizes else 0
    full = sum(1 for _, w, h, _ in frames if (w, h) == (size, size))
    return {"fps": len(frames) / elapsed, "full_res_fps": full / elapsed, "frames": len(frames), "median_side": median_side}


def train_rate(run: Path, steps: int, mode: str, geometry, size: int) -> float:
    """Steps/s over ``steps`` steps continuing the run, with ``mode`` in none|rest|moving."""
    from fieldkit.runs import load_run
    from fieldkit.trainer import Trainer, TrainerConfig
    from fieldkit.viewer.server import Viewer, ViewerConfig

    method, _, record, step = load_run(run)
    workdir = Path(tempfile.mkdtemp(prefix="fieldkit-viewer-bench-"))
    trainer = Trainer(method, workdir, TrainerConfig(max_steps=step + steps, eval_every=0, save_every=0, log_every=10**9))
    trainer.start_step = step
    stamps: list[float] = []

    class Clock:
        def on_step(self, s, stats):
            stamps.append(time.perf_counter())

    viewer = orbiter = None
    if mode != "none":
        viewer = Viewer(method, trainer=trainer, config=ViewerConfig(port=0, max_side=size))
        trainer.hooks.append(viewer)
        orbiter = Orbiter(viewer.port, geometry, size, interval=0.01 if mode == "moving" else None)
        deadline = time.monotonic() + 30
        while not orbiter.frames and time.monotonic() < deadline:
            time.sleep(0.05)
    trainer.hooks.append(Clock())
    try:
        trainer.train()
    finally:
        if orbiter is not None:
            orbiter.close()
        if viewer is not None:
            viewer.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    warm = 5  # skip the first steps (allocation, first frames)
    return (len(stamps) - warm - 1) / (stamps[-1] - stamps[warm])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from fieldkit.runs import load_run
    from fieldkit.viewer.server import Viewer, ViewerConfig

    method, scene, record, step = load_run(args.run)
    _, cameras = scene.subset("train")
    centres = cameras.centers.double().numpy()
    center = np.zeros(3)
    radius = float(np.median(np.linalg.norm(centres[:, :2], axis=1)))
    height = float(np.median(centres[:, 2]))
    fov = 2 * math.atan(0.5 * cameras.height / float(cameras.K[0, 1, 1]))
    geometry = (center, radius, height, fov)

    view = orbit_view(center, radius, height, 0.3, args.size, fov)
    times = []
    with torch.no_grad():
        for _ in range(5):
            t = time.perf_counter()
            method.render(view.cameras())
            times.append(time.perf_counter() - t)
    direct = statistics.median(times)

    viewer = Viewer(method, config=ViewerConfig(port=0, max_side=args.size))
    try:
        full = measure_fps(viewer, args.seconds, geometry, args.size, forced=True)
        adaptive = measure_fps(viewer, args.seconds, geometry, args.size, forced=False)
    finally:
        viewer.stop()

    rates: dict[str, list[float]] = {"none": [], "rest": [], "moving": []}
    for _ in range(args.repeats):
        for mode in rates:
            rates[mode].append(train_rate(args.run, args.steps, mode, geometry, args.size))
    medians = {k: statistics.median(v) for k, v in rates.items()}

    gaussians = method.stats().get("gaussians")
    load = os.getloadavg()
    print(f"run {args.run} (method {record.method}, step {step}, {int(gaussians) if gaussians else '?'} Gaussians, backend {record.backend})")
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.1f}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch threads {torch.get_num_threads()}")
    print()
    print(f"{'frames to one client, canvas ' + str(args.size) + 'x' + str(args.size):<52}{'value':>12}")
    print(f"{'direct method.render at full size (ms, median of 5)':<52}{direct * 1000:>12.1f}")
    print(f"{'  -> ceiling (renders/s)':<52}{1 / direct:>12.2f}")
    print(f"{'full-size frames delivered while orbiting (fps)':<52}{full['full_res_fps']:>12.2f}")
    print(f"{'adaptive frames delivered while orbiting (fps)':<52}{adaptive['fps']:>12.2f}")
    print(f"{'  median adaptive frame side (px)':<52}{adaptive['median_side']:>12d}")
    print()
    print(f"{'training, ' + str(args.steps) + ' steps from the checkpoint':<52}{'steps/s':>12}{'runs':>20}")
    labels = {"none": "no viewer", "rest": "viewer + 1 client at rest", "moving": "viewer + 1 client orbiting"}
    for mode, label in labels.items():
        runs = ", ".join(f"{r:.2f}" for r in rates[mode])
        print(f"{label:<52}{medians[mode]:>12.2f}{runs:>20}")
    if args.json:
        args.json.write_text(json.dumps({
            "run": str(args.run), "size": args.size, "gaussians": gaussians, "load_average": load,
            "direct_render_s": direct, "full_fps": full, "adaptive_fps": adaptive, "train_steps_per_s": rates,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The live viewer: a viser server that renders each browser's camera with the run's own renderer.

Seam 5 of the design: the viewer meets a training run through one small interface, the
:class:`fieldkit.trainer.Trainer`'s ``lock`` (held during each step; renders take it between
steps), ``pause()``/``resume_training()``, and the hook call ``on_step(step, stats)``. It meets a
method only through ``Method.render(cameras)`` plus optional extras it discovers by name:

* ``splats()`` -> :class:`fieldkit.models.gaussians.Splats` (Gaussians): enables the in-browser
  splat view;
* ``viewer_mesh()`` -> ``(vertices [V,3], faces [F,3])`` or None: a mesh to show (OReX shows its
  current mesh at its latest level);
* ``viewer_polylines()`` -> list of ``[K,3]`` arrays: polylines to draw (OReX: input contours);
* ``scene.subset("train")`` -> (images, cameras): training camera frusta with their images.

Per browser there is one render thread (:class:`ClientSession`) with nerfstudio's small state
machine: a camera move renders at once at a resolution sized to keep about ``target_fps``
frames per second (JPEG); once the camera has rested for ``rest_delay`` seconds the view is
rendered at full resolution (PNG). While training runs, a resting view is refreshed as the
model changes, at a rate that keeps rendering to about ``1 - train_util`` of the time.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fieldkit.viewer.adapters import has_mesh, mesh_of, polylines_of
from fieldkit.viewer.camera import ViewCamera, fit_size, moving_size, view_from_cameras
from fieldkit.viewer.display import RENDER_MODES, SPLAT_MODE, compositing_depth, display_image, splats_for_browser

log = logging.getLogger("fieldkit.viewer")


@dataclass
class ViewerConfig:
    host: str = "127.0.0.1"
    """Interface to bind; 127.0.0.1 keeps the viewer private to this machine."""
    port: int = 8080
    """TCP port; 0 picks a free one."""
    max_side: int = 1024
    """Longest side of a full-resolution (resting) frame, in pixels."""
    min_side: int = 48
    """Smallest longest side of an interactive (moving) frame."""
    target_fps: float = 10.0
    """Interactive frame rate the moving resolution is sized for."""
    rest_delay: float = 0.2
    """Seconds without camera motion before the full-resolution frame."""
    jpeg_quality: int = 70
    train_util: float = 0.9
    """While training, refresh a resting view so that rendering takes about 1 - train_util of the time."""
    min_refresh: float = 0.25
    """Shortest interval between refreshes of a resting view while training (seconds)."""
    max_frusta: int = 128
    geometry_interval: float = 5.0
    """Seconds between updates of in-browser geometry (splats, meshes) while training."""
    mesh_resolution: int = 64
    """Grid resolution for methods that extract their mesh on demand (OReX)."""


@dataclass
class Frame:
    image: np.ndarray  # uint8 [H,W,3]
    depth: np.ndarray | None  # float32 [H,W] for the browser's depth compositing
    render_seconds: float
    wait_seconds: float  # waiting for the model lock (a training step)


class TrainingStats:
    """Numbers shown in the stats panel; written by the training thread, read by the GUI ticker."""

    def __init__(self, history: int = 4000) -> None:
        self.lock = threading.Lock()
        self.step = 0
        self.loss: float | None = None
        self.psnr: float | None = None
        self.extra: dict[str, float] = {}
        self.curve_steps: collections.deque[int] = collections.deque(maxlen=history)
        self.curve_loss: collections.deque[float] = collections.deque(maxlen=history)
        self._times: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)
        self.state = "training"

    def record(self, step: int, stats: dict[str, float]) -> None:
        now = time.perf_counter()
        with self.lock:
            self.step = step
            if "loss" in stats:
                self.loss = float(stats["loss"])
                self.curve_steps.append(step)
                self.curve_loss.append(self.loss)
            if "psnr" in stats:
                self.psnr = float(stats["psnr"])
            self._times.append((now, step))

    def steps_per_second(self, window: float = 3.0) -> float | None:
        with self.lock:
            times = list(self._times)
        if len(times) < 2:
            return None
        now = time.perf_counter()
        recent = [(t, s) for t, s in times if now - t <= window] or times[-2:]
        if len(recent) < 2:
            recent = times[-2:]
        (t0, s0), (t1, s1) = recent[0], recent[-1]
        if t1 <= t0:
            return None
        if now - t1 > 2.0:  # paused or finished
            return 0.0
        return (s1 - s0) / (t1 - t0)

    def curve(self, max_points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            steps = np.asarray(self.curve_steps, dtype=np.float64)
            loss = np.asarray(self.curve_loss, dtype=np.float64)
        if len(steps) > max_points:  # decimate by block means so the curve stays cheap to send
            edges = np.linspace(0, len(steps), max_points + 1).astype(int)
            steps = np.array([steps[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
            loss = np.array([loss[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
        return steps, loss


class ClientSession:
    """One browser: its latest camera and a thread that renders it (moving -> low res, resting -> full)."""

    def __init__(self, viewer: "Viewer", client) -> None:
        self.viewer = viewer
        self.client = client
        self.client_id = client.client_id
        self._cond = threading.Condition()
        self._view: ViewCamera | None = None
        self._pending_move = False
        self._need_full = False
        self._moved_at = 0.0
        self._next_refresh = 0.0
        self._rendered_version = -1
        self._cleared_background = False
        self._stopped = False
        self.frames_sent = 0
        self.last_frame: tuple[str, int, int] | None = None  # (kind, width, height)
        self._errors = 0
        self._thread = threading.Thread(target=self._run, name=f"fieldkit-viewer-client-{self.client_id}", daemon=True)
        self._thread.start()

    # -- events (called from viser's threads) ------------------------------------------------

    def on_camera(self, first: bool = False) -> None:
        try:
            view = ViewCamera.from_client(self.client.camera)
        except Exception as error:  # malformed camera message: ignore it, keep the last good one
            log.debug("client %s: unreadable camera (%s)", self.client_id, error)
            return
        problem = view.problem()
        if problem is not None:
            log.debug("client %s: ignoring camera (%s)", self.client_id, problem)
            return
        now = time.monotonic()
        with self._cond:
            self._view = view
            self._need_full = True
            if first:  # nothing shown yet: go straight to a full frame
                self._moved_at = now - self.viewer.config.rest_delay
            else:
                self._pending_move = True
                self._moved_at = now
            self._cond.notify_all()

    def invalidate(self) -> None:
        """Render settings changed: show a fresh full frame."""
        with self._cond:
            self._need_full = True
            self._cleared_background = False
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def view(self) -> ViewCamera | None:
        return self._view

    # -- the render thread -------------------------------------------------------------------

    def _next_job(self) -> tuple[str, ViewCamera] | None:
        """Wait for something to render: ('move' | 'full', camera), or None when stopped."""
        cfg = self.viewer.config
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                view = self._view
                if view is not None:
                    if self.viewer.render_mode == SPLAT_MODE or not self.viewer.renders_images:
                        if not self._cleared_background:
                            self._cleared_background = True
                            return "clear", view
                    elif self._pending_move:
                        self._pending_move = False
                        return "move", view
                    elif self._need_full and now - self._moved_at >= cfg.rest_delay:
                        self._need_full = False
                        return "full", view
                    elif (
                        not self._need_full
                        and self.viewer.model_version != self._rendered_version
                        and now >= self._next_refresh
                    ):
                        return "full", view
                timeout = 0.05
                if self._need_full:
                    timeout = max(0.005, min(timeout, self._moved_at + cfg.rest_delay - now))
                elif self.viewer.model_version != self._rendered_version:
                    timeout = max(0.005, min(timeout, self._next_refresh - now))
                self._cond.wait(timeout)
        return None

    def _run(self) -> None:
        cfg = self.viewer.config
        while True:
            job = self._next_job()
            if job is None:
                return
            kind, view = job
            try:
                if kind == "clear":
                    self.client.scene.set_background_image(None)
                    continue
                version = self.viewer.model_version
                if kind == "move":
                    width, height = moving_size(
                        view.width, view.height, self.viewer.pixels_per_second(), cfg.target_fps, cfg.min_side, cfg.max_side
                    )
                else:
                    width, height = fit_size(view.width, view.height, cfg.max_side)
                started = time.perf_counter()
                frame = self.viewer.render_view(view, width, height, with_depth=True)
                if self._stopped:
                    return  # disconnected while rendering: drop the frame
                if kind == "move":
                    self.client.scene.set_background_image(frame.image, format="jpeg", jpeg_quality=cfg.jpeg_quality, depth=frame.depth)
                else:
                    self.client.scene.set_background_image(frame.image, format="png", depth=frame.depth)
                seconds = time.perf_counter() - started - frame.wait_seconds  # render + colouring + encoding
                if kind == "move":
                    self.viewer.record_frame_time(width * height, seconds)
                self.frames_sent += 1
                self.last_frame = (kind, width, height)
                self._rendered_version = version
                util = min(max(cfg.train_util, 0.0), 0.99)
                self._next_refresh = time.monotonic() + max(cfg.min_refresh, seconds * util / (1.0 - util))
            except NotImplementedError:
                continue  # the method renders no images: the next job clears the background
            except Exception as error:  # a bad frame must never take the viewer down
                self._errors += 1
                if self._errors <= 3:
                    log.warning("viewer: rendering for client %s failed: %s: %s", self.client_id, type(error).__name__, error)
                time.sleep(0.05)


class Viewer:
    """A viser server showing ``method``; pass ``trainer`` to watch (and pause) a training run."""

    def __init__(
        self,
        method,
        *,
        trainer=None,
        config: ViewerConfig | None = None,
        run_dir: Path | None = None,
        step: int = 0,
        lock=None,
        title: str = "fieldkit",
    ) -> None:
        import viser

        from fieldkit.trainer import TurnLock

        self.method = method
        self.trainer = trainer
        self.config = config or ViewerConfig()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.lock = trainer.lock if trainer is not None else (lock or TurnLock())
        self.stats = TrainingStats()
        self.stats.step = step
        self.stats.state = "training" if trainer is not None else "finished run"
        self.model_version = 0
        self.render_mode = "rgb"
        self._speed = collections.deque(maxlen=16)  # (pixels, seconds) of recent interactive frames
        self._speed_lock = threading.Lock()
        self._sessions: dict[int, ClientSession] = {}
        self._sessions_lock = threading.Lock()
        self._stopped = threading.Event()
        self._geometry_version = -1
        self._splat_handle = None
        self._mesh_handle = None
        self._notes_shown: set[str] = set()
        self._geometry_cost = 0.0
        self.renders_images = True

        self.server = viser.ViserServer(host=self.config.host, port=self.config.port, label=title, verbose=False)
        self.port = self.server.get_port()
        self.host = self.config.host
        self._setup_scene()
        self._setup_gui()
        self._update_geometry(force=True)
        if self.run_dir is not None and trainer is None:
            self._load_history()
        self.server.on_client_connect(self._on_connect)
        self.server.on_client_disconnect(self._on_disconnect)
        self._ticker = threading.Thread(target=self._tick, name="fieldkit-viewer-ticker", daemon=True)
        self._ticker.start()

    # -- the interface the trainer calls -------------------------------------------------------

    def on_step(self, step: int, stats: dict[str, float]) -> None:
        """Trainer hook, called after each step: cheap (records numbers, wakes render threads)."""
        self.stats.record(step, stats)
        self.model_version += 1
        for session in self.sessions():
            session.wake()

    def on_train_end(self, step: int) -> None:
        self.stats.state = "finished"
        self.model_version += 1

    # -- rendering -------------------------------------------------------------------------------

    def render_view(self, view: ViewCamera, width: int, height: int, mode: str | None = None, with_depth: bool = False) -> "Frame":
        """``view`` rendered at ``width`` x ``height`` in ``mode``; holds the model lock only while rendering."""
        mode = mode or self.render_mode
        if mode == SPLAT_MODE:
            mode = "rgb"
        cameras = view.cameras(width, height)
        asked = time.perf_counter()
        with self.lock:
            started = time.perf_counter()
            try:
                with torch.no_grad():
                    outputs = self.method.render(cameras)
            except NotImplementedError as error:
                if self.renders_images:
                    self.renders_images = False
                    log.warning("viewer: %s renders no images (%s); showing its geometry only", type(self.method).__name__, error)
                raise
            seconds = time.perf_counter() - started
        image, note = display_image(outputs, mode)
        if note and note not in self._notes_shown:
            self._notes_shown.add(note)
            log.warning("viewer: %s", note)
        depth = compositing_depth(outputs) if with_depth else None
        return Frame(image, depth, seconds, started - asked)

    def record_frame_time(self, pixels: int, seconds: float) -> None:
        """One frame's production time (render, colouring, encoding; not lock waits) for the resolution policy."""
        with self._speed_lock:
            self._speed.append((pixels, max(seconds, 1e-6)))

    def pixels_per_second(self) -> float:
        """Recent render throughput (pixels/s) that sizes the interactive resolution."""
        with self._speed_lock:
            samples = list(self._speed)
        if not samples:
            return 64 * 64 * self.config.target_fps  # start small, grow from measurements
        pixels = sum(p for p, _ in samples)
        seconds = sum(s for _, s in samples)
        return pixels / max(seconds, 1e-6)

    def save_view(self, view: ViewCamera, path: Path | None = None, mode: str | None = None) -> Path:
        """Render ``view`` at its canvas size (longest side at most 4096) and write a PNG."""
        from PIL import Image

        from fieldkit.io_atomic import atomic_path

        width, height = fit_size(view.width, view.height, 4096)
        image = self.render_view(view, width, height, mode).image
        if path is None:
            folder = (self.run_dir / "renders" / "viewer") if self.run_dir is not None else Path("viewer_captures")
            path = folder / f"view-step{self.stats.step:06d}-{time.strftime('%Y%m%d-%H%M%S')}.png"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        return path

    # -- clients -----------------------------------------------------------------------------------

    def sessions(self) -> list[ClientSession]:
        with self._sessions_lock:
            return list(self._sessions.values())

    def _on_connect(self, client) -> None:
        session = ClientSession(self, client)
        with self._sessions_lock:
            self._sessions[client.client_id] = session
        client.camera.on_update(lambda _camera, s=session: s.on_camera())
        session.on_camera(first=True)

    def _on_disconnect(self, client) -> None:
        with self._sessions_lock:
            session = self._sessions.pop(client.client_id, None)
        if session is not None:
            session.stop()

    # -- scene ---------------------------------------------------------------------------------------

    def _train_views(self):
        scene = getattr(self.method, "scene", None)
        if scene is None or not hasattr(scene, "subset"):
            return None
        try:
            return scene.subset("train")
        except Exception:
            return None

    def _setup_scene(self) -> None:
        server = self.server
        views = self._train_views()
        scene = getattr(self.method, "scene", None)
        center = np.zeros(3)
        bounds = getattr(scene, "bounds", None)
        if bounds is not None:
            try:
                low, high = (np.asarray(b, dtype=np.float64).reshape(3) for b in bounds)
                center = 0.5 * (low + high)
            except Exception:
                pass
        self._frusta = []
        polylines = self._with_lock(lambda: polylines_of(self.method), "contours") or []
        if views is None:
            # no cameras (shapes from cross-sections): frame the contours, world z up
            points = np.concatenate(polylines) if polylines else None
            radius = 1.0
            if points is not None and len(points):
                low, high = points.min(0), points.max(0)
                center = 0.5 * (low + high)
                radius = max(float(np.linalg.norm(high - low)) / 2, 1e-6)
            server.scene.set_up_direction("+z")
            direction = np.array([1.0, -1.0, 0.7]) / np.linalg.norm([1.0, -1.0, 0.7])
            server.initial_camera.position = tuple(float(v) for v in center + 3.0 * radius * direction)
            server.initial_camera.look_at = tuple(float(v) for v in center)
        else:
            images, cameras = views
            c2w = cameras.cam_to_world.double().cpu().numpy()
            up = -c2w[:, :3, 1].mean(axis=0)  # OpenCV camera y points down
            up = up / max(np.linalg.norm(up), 1e-9)
            server.scene.set_up_direction(tuple(float(v) for v in up))
            first = view_from_cameras(cameras, 0)
            centres = c2w[:, :3, 3]
            if bounds is None:
                center = self._closest_point_to_axes(c2w)
            # the first training camera, moved a little towards the scene so its own frustum is behind
            start = center + 0.85 * (np.asarray(first.position) - center)
            server.initial_camera.position = tuple(float(v) for v in start)
            server.initial_camera.look_at = tuple(float(v) for v in center)
            server.initial_camera.up = tuple(float(v) for v in up)
            server.initial_camera.fov = first.fov
            extent = float(np.median(np.linalg.norm(centres - centres.mean(0), axis=1))) or 1.0
            self._add_frusta(images, cameras, scale=0.04 * extent)
        segments = [np.stack([p[:-1], p[1:]], axis=1) for p in polylines if len(p) > 1]
        if segments:
            server.scene.add_line_segments(
                "/contours", np.concatenate(segments), colors=(255, 120, 0), thickness=3.0, thickness_units="screen"
            )

    @staticmethod
    def _closest_point_to_axes(c2w: np.ndarray) -> np.ndarray:
        """Least-squares point nearest to every camera's optical axis (what the cameras look at)."""
        A = np.zeros((3, 3))
        b = np.zeros(3)
        for T in c2w:
            d = T[:3, 2] / max(np.linalg.norm(T[:3, 2]), 1e-9)
            P = np.eye(3) - np.outer(d, d)
            A += P
            b += P @ T[:3, 3]
        try:
            return np.linalg.solve(A, b)
        except np.linalg.LinAlgError:
            return c2w[:, :3, 3].mean(axis=0)

    def _add_frusta(self, images: torch.Tensor, cameras, scale: float) -> None:
        count = len(cameras)
        picks = np.unique(np.linspace(0, count - 1, min(count, self.config.max_frusta)).round().astype(int))
        for i in picks:
            view = view_from_cameras(cameras, int(i))
            thumb = images[int(i)]
            step = max(1, int(math.ceil(max(thumb.shape[0], thumb.shape[1]) / 96)))
            thumb = (thumb[::step, ::step, :3].float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
            handle = self.server.scene.add_camera_frustum(
                f"/train_cameras/{int(i):05d}",
                fov=view.fov,
                aspect=view.aspect,
                scale=scale,
                image=thumb,
                format="jpeg",
                jpeg_quality=80,
                wxyz=view.wxyz,
                position=view.position,
                color=(60, 60, 200),
                thickness=0.05 * scale,
            )
            handle.on_click(lambda event, v=view: self._fly_to(event.client, v))
            self._frusta.append(handle)

    @staticmethod
    def _fly_to(client, view: ViewCamera) -> None:
        with client.atomic():
            client.camera.wxyz = view.wxyz
            client.camera.position = view.position
            client.camera.fov = view.fov

    def _call_optional(self, name: str):
        fn = getattr(self.method, name, None)
        if fn is None:
            return None
        return self._with_lock(fn, name)

    def _with_lock(self, fn, what: str):
        """``fn()`` under the model lock; None (and one log line) if it fails."""
        try:
            with self.lock:
                return fn()
        except Exception as error:
            if what not in self._notes_shown:
                self._notes_shown.add(what)
                log.warning("viewer: getting the %s failed: %s: %s", what, type(error).__name__, error)
            return None

    def _update_geometry(self, force: bool = False) -> None:
        """Refresh in-browser geometry (splats in splat mode, the method's mesh) when the model changed."""
        version = self.model_version
        if not force and version == self._geometry_version:
            return
        self._geometry_version = version
        if hasattr(self.method, "splats"):
            if self.render_mode == SPLAT_MODE:
                splats = self._call_optional("splats")
                if splats is not None:
                    self._splat_handle = self.server.scene.add_gaussian_splats("/splats", **splats_for_browser(splats))
            elif self._splat_handle is not None:
                self._splat_handle.remove()
                self._splat_handle = None
        if has_mesh(self.method):
            started = time.perf_counter()
            mesh = self._with_lock(lambda: mesh_of(self.method, self.config.mesh_resolution), "mesh")
            # extraction holds the training lock: keep it to about 10 % of the time
            self._geometry_cost = time.perf_counter() - started
            if mesh is not None:
                vertices, faces = mesh
                self._mesh_handle = self.server.scene.add_mesh_simple(
                    "/mesh", vertices, faces, color=(90, 200, 255), side="double", opacity=0.85
                )

    # -- GUI -------------------------------------------------------------------------------------------

    def _setup_gui(self) -> None:
        gui = self.server.gui
        with gui.add_folder("Training"):
            self._stats_md = gui.add_markdown("")
            self._pause = gui.add_button("Pause training", icon=None, disabled=self.trainer is None)
            self._pause.on_click(lambda _event: self.toggle_pause())
            from viser import uplot

            steps, loss = self.stats.curve()
            self._curve = gui.add_uplot(
                data=(steps, loss),
                series=(uplot.Series(label="step"), uplot.Series(label="loss", stroke="#d62728", width=1.5)),
                title="training loss",
                scales={"x": {"time": False, "auto": True}, "y": {"distr": 3, "auto": True}},
                aspect=1.6,
            )
        with gui.add_folder("View"):
            modes = list(RENDER_MODES) + ([SPLAT_MODE] if hasattr(self.method, "splats") else [])
            self._mode = gui.add_dropdown("Render mode", options=modes, initial_value="rgb")
            self._mode.on_update(lambda _event: self._set_mode(self._mode.value))
            self._max_side = gui.add_slider("Max resolution", min=128, max=2048, step=32, initial_value=min(2048, max(128, self.config.max_side)))
            self._max_side.on_update(lambda _event: self._set_max_side(self._max_side.value))
            self._fps = gui.add_slider("Target FPS (moving)", min=1, max=30, step=1, initial_value=int(round(self.config.target_fps)))
            self._fps.on_update(lambda _event: self._set_fps(self._fps.value))
            self._show_cams = gui.add_checkbox("Training cameras", initial_value=True, disabled=not self._frusta)
            self._show_cams.on_update(lambda _event: self._set_frusta_visible(self._show_cams.value))
            self._save = gui.add_button("Save view as PNG")
            self._save.on_click(self._on_save_click)
            self._saved_md = gui.add_markdown("")
        self._update_stats_panel()

    def toggle_pause(self) -> None:
        if self.trainer is None:
            return
        if self.trainer.paused:
            self.trainer.resume_training()
            self._pause.label = "Pause training"
            self.stats.state = "training"
        else:
            self.trainer.pause()
            self._pause.label = "Resume training"
            self.stats.state = "paused"
        self._update_stats_panel()

    def _set_mode(self, value: Any) -> None:
        options = list(RENDER_MODES) + ([SPLAT_MODE] if hasattr(self.method, "splats") else [])
        if value not in options:  # malformed update from a client
            return
        self.render_mode = value
        self._update_geometry(force=True)
        for session in self.sessions():
            session.invalidate()

    def _set_max_side(self, value: Any) -> None:
        try:
            value = int(value)
        except (TypeError, ValueError):
            return
        self.config.max_side = min(max(value, 16), 4096)
        for session in self.sessions():
            session.invalidate()

    def _set_fps(self, value: Any) -> None:
        try:
            value = float(value)
        except (TypeError, ValueError):
            return
        if math.isfinite(value):
            self.config.target_fps = min(max(value, 0.5), 60.0)

    def _set_frusta_visible(self, value: Any) -> None:
        for handle in self._frusta:
            handle.visible = bool(value)

    def _on_save_click(self, event) -> None:
        client = event.client
        session = self._sessions.get(event.client_id) if client is not None else None
        if session is None or session.view is None:
            return
        try:
            path = self.save_view(session.view)
        except Exception as error:
            self._saved_md.content = f"Saving failed: {error}"
            return
        self._saved_md.content = f"Saved `{path}`"
        try:
            client.send_file_download(path.name, path.read_bytes())
        except Exception as error:  # the file is on disk either way
            log.debug("viewer: download to client failed: %s", error)

    def _stats_text(self) -> str:
        s = self.stats
        rate = s.steps_per_second()
        extra = {}
        try:
            extra = self.method.stats()
        except Exception:
            pass
        rows = [("state", s.state), ("step", f"{s.step:,}")]
        if s.loss is not None:
            rows.append(("loss", f"{s.loss:.4f}"))
        if s.psnr is not None:
            rows.append(("PSNR (train view)", f"{s.psnr:.2f} dB"))
        for key, value in extra.items():
            label = "Gaussians" if key == "gaussians" else key
            rows.append((label, f"{int(value):,}" if float(value).is_integer() else f"{value:.4g}"))
        if rate is not None and self.trainer is not None:
            rows.append(("steps/s", f"{rate:.2f}"))
        rows.append(("clients", str(len(self.sessions()))))
        return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])

    def _update_stats_panel(self) -> None:
        self._stats_md.content = self._stats_text()

    def _load_history(self) -> None:
        """For a finished run: the loss curve and last numbers from metrics.jsonl."""
        from fieldkit.trainer import read_metrics

        for record in read_metrics(self.run_dir / "metrics.jsonl"):
            if "loss" in record and "step" in record:
                step = self.stats.step
                self.stats.record(int(record["step"]), record)
                self.stats.step = max(step, int(record["step"]))

    def _tick(self) -> None:
        last_curve = 0.0
        last_geometry = 0.0
        shown_version = -1
        while not self._stopped.wait(0.25):
            try:
                self._update_stats_panel()
                now = time.monotonic()
                if now - last_curve >= 1.0 and self.model_version != shown_version:
                    last_curve = now
                    shown_version = self.model_version
                    steps, loss = self.stats.curve()
                    if len(steps) >= 2:
                        self._curve.data = (steps, loss)
                if now - last_geometry >= max(self.config.geometry_interval, 10 * self._geometry_cost):
                    last_geometry = now
                    self._update_geometry()
            except Exception as error:
                log.debug("viewer ticker: %s", error)

    # -- lifetime --------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stop the server and wait (briefly) for the render threads to finish their frame."""
        self._stopped.set()
        sessions = self.sessions()
        for session in sessions:
            session.stop()
        self.server.stop()
        for session in sessions:
            session.join(5.0)
        if self._ticker is not threading.current_thread():
            self._ticker.join(5.0)

    def wait(self) -> None:
        """Block until Ctrl-C (or :meth:`stop`)."""
        try:
            while not self._stopped.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()


def announce(viewer: Viewer) -> None:
    print(f"fieldkit viewer: {viewer.url}", flush=True)
    if viewer.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"  note: bound to {viewer.host}, so other machines on the network can open it", flush=True)


def start_training_viewer(trainer, run_dir: Path | None = None, host: str = "127.0.0.1", port: int = 8080) -> Viewer:
    """Start a viewer on a :class:`fieldkit.trainer.Trainer` and register it as its hook."""
    viewer = Viewer(trainer.method, trainer=trainer, config=ViewerConfig(host=host, port=port), run_dir=run_dir, step=trainer.start_step)
    trainer.hooks.append(viewer)
    announce(viewer)
    return viewer


def serve_run(run_dir: Path, host: str = "127.0.0.1", port: int = 8080, backend: str | None = None) -> Viewer:
    """Load a finished run and serve it (returns at once; call ``wait()`` to block)."""
    from fieldkit.runs import load_run

    method, scene, record, step = load_run(run_dir, backend)
    viewer = Viewer(method, config=ViewerConfig(host=host, port=port), run_dir=run_dir, step=step, title=f"fieldkit: {Path(run_dir).name}")
    announce(viewer)
    return viewer

"""The live viewer: camera conventions, the trainer interface (hooks, lock, pause), and a viser
server driven over its real websocket protocol by a headless client (fieldkit.viewer.testing).

All network traffic goes to 127.0.0.1, on ports the OS picks, with bounded waits.
"""

from __future__ import annotations

import math
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_path
from fieldkit.cameras import Cameras, intrinsics_matrix, look_at_w2c
from fieldkit.methods.base import Method
from fieldkit.viewer.camera import ViewCamera, fit_size, moving_size, view_from_cameras

pytest.importorskip("viser")

from fieldkit.viewer.testing import ViserTestClient, gui_uuid  # noqa: E402


# -- a cheap method whose images depend on the camera pose and intrinsics -------------------------


class SkyMethod(Method):
    """Colours every pixel by its world-space ray direction: any pose or intrinsics error shows."""

    name = "sky"

    def __init__(self, step_seconds: float = 0.0, render_seconds: float = 0.0):
        self.step_seconds = step_seconds
        self.render_seconds = render_seconds
        self.steps = 0
        self.in_step = False
        self.overlaps = 0
        self.renders = 0

    def train_step(self, step):
        self.in_step = True
        time.sleep(self.step_seconds)
        self.steps += 1
        self.in_step = False
        return {"loss": 1.0 / (step + 1), "psnr": 10.0 + 0.01 * step}

    @torch.no_grad()
    def render(self, cameras):
        if self.in_step:
            self.overlaps += 1
        self.renders += 1
        time.sleep(self.render_seconds)
        H, W = cameras.height, cameras.width
        v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5, indexing="ij")
        K = cameras.K[0].double()
        d_cam = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1)
        R = cameras.cam_to_world[0, :3, :3].double()
        d = d_cam @ R.T
        d = d / d.norm(dim=-1, keepdim=True)
        rgb = (0.5 + 0.5 * d).float()[None]
        depth = (1.0 + u / W).float()[None, ..., None]
        return {"rgb": rgb, "alpha": torch.ones_like(depth), "depth": depth}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def export(self, fmt, path):
        raise ValueError("nothing to export")


class ContourMethod(SkyMethod):
    """OReX-like: a mesh at its latest level plus the input contours."""

    name = "contours"

    def viewer_mesh(self):
        v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
        f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], dtype=np.int32)
        return v, f

    def viewer_polylines(self):
        square = np.array([[0, 0, 0.5], [1, 0, 0.5], [1, 1, 0.5], [0, 1, 0.5], [0, 0, 0.5]], dtype=np.float32)
        return [square]


class SplatMethod(SkyMethod):
    name = "splatlike"

    def splats(self):
        from fieldkit.models.gaussians import Splats

        n = 10
        return Splats(torch.linspace(-1, 1, n)[:, None].repeat(1, 3), torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
                      torch.full((n, 3), -3.0), torch.zeros(n), torch.full((n, 1, 3), 0.5))


def _view(width=96, height=72, eye=(3.0, -2.0, 1.5)) -> ViewCamera:
    w2c = look_at_w2c(torch.tensor(eye), torch.zeros(3), torch.tensor([0.0, 0.0, 1.0]))
    K = intrinsics_matrix(70.0, 70.0, width / 2, height / 2)
    return view_from_cameras(Cameras(w2c[None], K[None], width, height))


def _u8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)


@pytest.fixture
def viewer_factory():
    from fieldkit.viewer.server import Viewer, ViewerConfig

    made = []

    def make(method, **kwargs):
        config = ViewerConfig(port=0, **kwargs.pop("config", {}))
        viewer = Viewer(method, config=config, **kwargs)
        made.append(viewer)
        return viewer

    yield make
    for viewer in made:
        viewer.stop()


# -- camera conventions -----------------------------------------------------------------------------


def test_browser_camera_convention_projects_known_points():
    # viser: wxyz rotates camera -> world, OpenCV camera axes. A camera at (0,0,5) looking down
    # the world -z axis has camera x = world x, camera y = world -y: a 180 degree turn about x.
    view = ViewCamera(wxyz=(0.0, 1.0, 0.0, 0.0), position=(0.0, 0.0, 5.0), fov=2 * math.atan(0.5), width=100, height=80)
    cams = view.cameras()
    f = 0.5 * 80 / 0.5  # (H/2) / tan(fov/2)
    assert torch.allclose(cams.K[0], torch.tensor([[f, 0, 50.0], [0, f, 40.0], [0, 0, 1.0]], dtype=torch.float64))
    for world, pixel in [((0, 0, 0), (50, 40)), ((1, 0, 0), (50 + f / 5, 40)), ((0, 1, 0), (50, 40 - f / 5))]:
        p = cams.world_to_cam[0] @ torch.tensor([*world, 1.0], dtype=torch.float64)
        assert p[2] == pytest.approx(5.0)
        assert (float(cams.K[0, 0, 0] * p[0] / p[2] + 50), float(cams.K[0, 1, 1] * p[1] / p[2] + 40)) == pytest.approx(pixel)


def test_view_round_trips_through_fieldkit_cameras():
    w2c = look_at_w2c(torch.tensor([1.0, -3.0, 2.0]), torch.tensor([0.1, 0.2, 0.0]), torch.tensor([0.0, 0.0, 1.0]))
    cams = Cameras(w2c[None], intrinsics_matrix(150.0, 150.0, 80.0, 60.0)[None], 160, 120)
    back = view_from_cameras(cams).cameras()
    assert torch.allclose(back.world_to_cam, cams.world_to_cam, atol=1e-9)
    assert torch.allclose(back.K, cams.K, atol=1e-9)
    half = view_from_cameras(cams).cameras(80, 60)
    assert torch.allclose(half.K, cams.scaled(0.5).K, atol=1e-9)


def test_malformed_cameras_are_recognised():
    good = _view()
    assert good.problem() is None
    for bad in (
        ViewCamera(good.wxyz, good.position, float("nan"), 10, 10),
        ViewCamera((0.0, 0.0, 0.0, 0.0), good.position, 1.0, 10, 10),
        ViewCamera(good.wxyz, good.position, 1.0, 0, 10),
        ViewCamera(good.wxyz, (float("inf"), 0.0, 0.0), 1.0, 10, 10),
        ViewCamera(good.wxyz, good.position, 4.0, 10, 10),
    ):
        assert bad.problem() is not None


def test_resolution_adapts_to_render_speed():
    assert fit_size(1920, 1080, 1024) == (1024, 576)
    assert fit_size(300, 200, 1024) == (300, 200)
    # 100k pixels/s at 10 fps -> 10k pixels per frame -> 100x100 on a square canvas
    assert moving_size(800, 800, 1e5, 10, 32, 1024) == (100, 100)
    slow = moving_size(1600, 900, 1e4, 10, 48, 1024)
    fast = moving_size(1600, 900, 1e7, 10, 48, 1024)
    assert slow[0] == 48 and fast == (1024, 576)
    assert abs(slow[0] / slow[1] - 16 / 9) < 0.1


# -- the trainer interface --------------------------------------------------------------------------


def test_trainer_hooks_pause_and_step_lock(tmp_path):
    from fieldkit.trainer import Trainer, TrainerConfig

    method = SkyMethod(step_seconds=0.004)
    calls, ends = [], []

    class Hook:
        def on_step(self, step, stats):
            calls.append((step, stats["loss"]))

        def on_train_end(self, step):
            ends.append(step)

    trainer = Trainer(method, tmp_path, TrainerConfig(max_steps=150, eval_every=0, save_every=0, log_every=1000), hooks=[Hook()])
    checks = {}

    def drive():
        while method.steps < 20:
            time.sleep(0.002)
        trainer.pause()
        time.sleep(0.05)
        before = method.steps
        time.sleep(0.3)
        checks["paused_steps"] = method.steps - before
        trainer.resume_training()
        while method.steps < 60:
            time.sleep(0.002)
        waits = []
        for _ in range(10):  # the lock is granted between steps, within about one step
            started = time.perf_counter()
            with trainer.lock:
                waits.append(time.perf_counter() - started)
                in_step = method.in_step
                before = method.steps
                time.sleep(0.02)
                checks.setdefault("steps_while_locked", 0)
                checks["steps_while_locked"] += method.steps - before
                checks.setdefault("in_step", False)
                checks["in_step"] |= in_step
            time.sleep(0.005)
        checks["max_wait"] = max(waits)

    helper = threading.Thread(target=drive)
    helper.start()
    trainer.train()
    helper.join(10)
    assert checks["paused_steps"] == 0
    assert checks["steps_while_locked"] == 0 and not checks["in_step"]
    assert checks["max_wait"] < 0.25  # one 4 ms step plus scheduling noise on a shared machine
    assert [s for s, _ in calls] == list(range(1, 151))
    assert ends == [150]


# -- the viser server, driven over its websocket protocol ----------------------------------------


def test_client_gets_render_of_its_camera_then_adaptive_frames(viewer_factory):
    method = SkyMethod()
    viewer = viewer_factory(method)
    view = _view(96, 72)
    with ViserTestClient(viewer.port) as client:
        client.send_camera(view)
        full = client.wait_for_image(10, size=(96, 72), fmt="png")
        assert full is not None, "no full-resolution frame"
        direct = _u8(method.render(view.cameras())["rgb"][0])
        assert np.abs(full.image.astype(int) - direct.astype(int)).max() <= 1
        # Moving: a JPEG frame at the adaptive resolution first, then full resolution once at rest.
        moved = _view(96, 72, eye=(2.5, -2.5, 1.4))
        client.send_camera(moved)
        first = client.wait_for_image(10)
        assert first is not None and first.format == "jpeg"
        assert first.image.shape[1] <= 96 and abs(first.image.shape[1] / first.image.shape[0] - 96 / 72) < 0.1
        rest = client.wait_for_image(10, size=(96, 72), fmt="png")
        assert rest is not None
        assert np.abs(rest.image.astype(int) - _u8(method.render(moved.cameras())["rgb"][0]).astype(int)).max() <= 1


def test_gui_controls_pause_mode_and_save(viewer_factory, tmp_path):
    from fieldkit.trainer import Trainer, TrainerConfig

    method = SkyMethod()
    trainer = Trainer(method, tmp_path / "run", TrainerConfig(max_steps=10))
    viewer = viewer_factory(method, trainer=trainer, run_dir=tmp_path / "run")
    for step in range(1, 6):
        viewer.on_step(step, {"loss": 0.5 / step, "psnr": 20.0 + step})
    view = _view(64, 48)
    with ViserTestClient(viewer.port) as client:
        client.send_camera(view)
        assert client.wait_for_image(10, size=(64, 48), fmt="png") is not None
        client.click_button(gui_uuid(viewer._pause))
        deadline = time.monotonic() + 5
        # The click handler runs on viser's thread: wait until it has finished (pause, label, stats).
        while not (trainer.paused and viewer._pause.label == "Resume training" and "paused" in viewer._stats_text()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert trainer.paused and viewer._pause.label == "Resume training"
        text = viewer._stats_text()
        assert "| step | 5 |" in text and "| loss | 0.1000 |" in text and "25.00 dB" in text and "paused" in text
        client.click_button(gui_uuid(viewer._pause))
        deadline = time.monotonic() + 5
        while trainer.paused and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not trainer.paused

        client.send_gui_value(gui_uuid(viewer._mode), "not-a-mode")  # malformed: ignored
        client.send_gui_value(gui_uuid(viewer._mode), "depth")
        depth = client.wait_for_image(10, size=(64, 48), fmt="png")
        assert viewer.render_mode == "depth" and depth is not None
        # depth grows left to right in SkyMethod: the turbo map goes from blue to red
        assert depth.image[24, 2, 2] > depth.image[24, 2, 0] and depth.image[24, -3, 0] > depth.image[24, -3, 2]

        client.click_button(gui_uuid(viewer._save))
        saved = tmp_path / "run" / "renders" / "viewer"
        deadline = time.monotonic() + 10
        while not list(saved.glob("*.png")) and time.monotonic() < deadline:
            time.sleep(0.05)
        files = list(saved.glob("*.png"))
        assert len(files) == 1
        from PIL import Image

        assert Image.open(files[0]).size == (64, 48)


def test_several_clients_and_misbehaving_ones(viewer_factory):
    method = SkyMethod(render_seconds=0.15)
    viewer = viewer_factory(method)
    a, b = ViserTestClient(viewer.port), ViserTestClient(viewer.port)
    try:
        a.send_camera(_view(40, 30))
        b.send_camera(_view(50, 40, eye=(0.0, 3.0, 2.0)))
        assert a.wait_for_image(10, size=(40, 30)) is not None
        assert b.wait_for_image(10, size=(50, 40)) is not None

        # garbage bytes, a text frame, a message of an unknown type: that connection ends, nothing else
        with ViserTestClient(viewer.port) as bad:
            bad.send_raw(b"\x00\x01not msgpack")
            bad.send_raw("hello")
        import msgspec

        with ViserTestClient(viewer.port) as bad:
            bad.send_raw(msgspec.msgpack.encode({"type": "NoSuchMessage", "x": 1}))
        # a camera nobody can render (NaN fov, zero-size canvas): ignored
        with ViserTestClient(viewer.port) as odd:
            odd.send_camera(ViewCamera((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0), float("nan"), 10, 10))
            odd.send_camera(ViewCamera((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 1.0, 0, 0))
            odd.poll(0.3)
        # disconnect in the middle of a render
        gone = ViserTestClient(viewer.port)
        gone.send_camera(_view(64, 64))
        time.sleep(0.05)
        gone.close()
        time.sleep(0.4)

        # the server still serves the well-behaved clients
        a.send_camera(_view(40, 30, eye=(2.0, 2.0, 2.0)))
        assert a.wait_for_image(10, size=(40, 30), fmt="png") is not None
        b.send_camera(_view(50, 40, eye=(2.0, -2.0, 2.0)))
        assert b.wait_for_image(10, size=(50, 40), fmt="png") is not None
        deadline = time.monotonic() + 5
        while len(viewer.sessions()) != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(viewer.sessions()) == 2
    finally:
        a.close()
        b.close()


def test_slow_client_never_stalls_training_for_more_than_a_frame(viewer_factory, tmp_path):
    """A client that keeps moving and never reads its socket: training still steps between renders."""
    from fieldkit.trainer import Trainer, TrainerConfig

    method = SkyMethod(step_seconds=0.003, render_seconds=0.05)
    trainer = Trainer(method, tmp_path, TrainerConfig(max_steps=100_000, eval_every=0, save_every=0, log_every=100_000))
    viewer = viewer_factory(method, trainer=trainer)
    trainer.hooks.append(viewer)
    stamps = []

    class Clock:
        def on_step(self, step, stats):
            stamps.append(time.perf_counter())
            if len(stamps) >= 30 and method.renders >= 15:
                trainer._interrupted = True

    trainer.hooks.append(Clock())
    stop = threading.Event()

    def spam():
        client = ViserTestClient(viewer.port)
        k = 0
        while not stop.is_set():  # moves every 10 ms and never reads
            angle = 0.05 * k
            client.send_camera(_view(200, 150, eye=(3 * math.cos(angle), 3 * math.sin(angle), 1.5)))
            k += 1
            time.sleep(0.01)
        client.close()

    spammer = threading.Thread(target=spam)
    spammer.start()
    try:
        deadline = time.monotonic() + 10
        while method.renders == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        trainer.train()
    finally:
        stop.set()
        spammer.join(5)
    gaps = np.diff(stamps)
    assert method.renders >= 15 and method.overlaps == 0
    # a frame costs 50 ms here: no gap between steps is much longer than one frame plus one step
    assert gaps.max() < 0.05 + 0.003 + 0.2, f"longest stall {gaps.max():.3f} s"


def test_mesh_and_contours_are_shown(viewer_factory):
    viewer = viewer_factory(ContourMethod())
    with ViserTestClient(viewer.port) as client:
        client.send_camera(_view())
        assert client.wait_for_image(10) is not None
        types = {m.get("type") for m in client.messages}
    assert {"MeshMessage", "LineSegmentsMessage"} <= types


def test_splat_mode_sends_gaussians_to_the_browser(viewer_factory):
    viewer = viewer_factory(SplatMethod())
    with ViserTestClient(viewer.port) as client:
        client.send_camera(_view())
        assert client.wait_for_image(10) is not None
        seen = len(client.messages)
        client.send_gui_value(gui_uuid(viewer._mode), "splats (in browser)")
        assert client.wait_for(lambda m: m.get("type") == "GaussianSplatsMessage", 10) is not None
        client.poll(0.5)
        after = client.messages[seen:]
        assert any(m.get("type") == "BackgroundImageMessage" and m.get("rgb_data") is None for m in after)


# -- the must-show: `fieldkit view` on a real run --------------------------------------------------


@pytest.fixture(scope="module")
def lego_run(tmp_path_factory):
    """A short real gs run on lego_200 (100x100 after downscale 2)."""
    from fieldkit.cli import main

    lego = shared_path("lego_200")
    run = tmp_path_factory.mktemp("lego") / "run"
    code = main([
        "train", str(lego), "--max-steps", "3", "--eval-every", "0", "--save-every", "0",
        "--data.downscale", "2", "--gs.init-random-points", "3000", "--output", str(run),
    ])
    assert code == 0
    return run


def _read_lines(stream, out: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        out.put(line)


def test_fieldkit_view_serves_renders_matching_direct_render(lego_run):
    from fieldkit.metrics import psnr
    from fieldkit.runs import load_run

    proc = subprocess.Popen(
        [sys.executable, "-m", "fieldkit.cli", "view", str(lego_run), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        port, seen = None, []
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append(line)
            match = re.search(r"fieldkit viewer: http://127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
        assert port, "fieldkit view printed no URL:\n" + "".join(seen)

        method, scene, _, _ = load_run(lego_run)
        _, cameras = scene.subset("test")
        views = [view_from_cameras(cameras, i) for i in (0, 7)]
        a, b = ViserTestClient(port), ViserTestClient(port)  # two browsers at once
        try:
            a.send_camera(views[0])
            b.send_camera(views[1])
            got_a = a.wait_for_image(120, size=(cameras.width, cameras.height), fmt="png")
            got_b = b.wait_for_image(120, size=(cameras.width, cameras.height), fmt="png")
        finally:
            a.close()
            b.close()
        for got, i in ((got_a, 0), (got_b, 7)):
            assert got is not None and got.image.shape == (cameras.height, cameras.width, 3)
            direct = method.render(cameras[i])["rgb"][0]
            value = float(psnr(torch.from_numpy(got.image.copy()).float()[None] / 255, direct[None]))
            assert value >= 40.0, f"view {i}: {value:.1f} dB"
        assert proc.poll() is None, "server died"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- methods that render no images, and duck-typed geometry (OReX) ------------------------------


class CrossSectionMethod(SkyMethod):
    """Like OReX: render() raises, mesh() returns (mesh, info), contours live in .source.planes."""

    name = "sections"

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        verts = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=float)
        plane = SimpleNamespace(vertices=verts, contours=[SimpleNamespace(indices=np.array([0, 1, 2, 3]))])
        self.source = SimpleNamespace(planes=[plane])
        self._mesh_cache = "stale"
        self.mesh_calls = []

    def render(self, cameras):
        raise NotImplementedError("shapes, not images")

    def mesh(self, resolution=None, refine=None):
        self.mesh_calls.append((resolution, refine, self._mesh_cache))
        from types import SimpleNamespace

        return SimpleNamespace(vertices=np.eye(3), faces=np.array([[0, 1, 2]])), {"spacing": 0.1}


def test_duck_typed_mesh_and_contours():
    from fieldkit.viewer.adapters import mesh_of, polylines_of

    method = CrossSectionMethod()
    vertices, faces = mesh_of(method, 48)
    assert vertices.shape == (3, 3) and faces.tolist() == [[0, 1, 2]]
    assert method.mesh_calls == [(48, False, None)]  # a stale cache is cleared so the mesh follows training
    (line,) = polylines_of(method)
    assert line.shape == (5, 3) and np.array_equal(line[0], line[-1])  # closed contour
    assert mesh_of(SkyMethod()) is None and polylines_of(SkyMethod()) == []


def test_method_without_images_shows_geometry_only(viewer_factory):
    viewer = viewer_factory(CrossSectionMethod())
    with ViserTestClient(viewer.port) as client:
        client.send_camera(_view())
        deadline = time.monotonic() + 10
        while viewer.renders_images and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not viewer.renders_images
        cleared = client.wait_for(lambda m: m.get("type") == "BackgroundImageMessage" and m.get("rgb_data") is None, 10)
        assert cleared is not None
        types = {m.get("type") for m in client.messages}
        assert {"MeshMessage", "LineSegmentsMessage"} <= types
        client.send_camera(_view(eye=(1.0, 2.0, 3.0)))  # keeps serving, never crashes
        client.poll(0.3)
        assert len(viewer.sessions()) == 1


def test_train_with_viewer_flag_binds_localhost_and_follows_training(tmp_path, monkeypatch, capsys):
    from fieldkit.cli import main
    from fieldkit.viewer import server

    seen = {}

    def no_wait(self):  # `fieldkit train --viewer` keeps serving after training until Ctrl-C
        seen["viewer"] = self
        self.stop()

    monkeypatch.setattr(server.Viewer, "wait", no_wait)
    demo = Path(__file__).resolve().parents[1] / "scenes" / "demo"
    code = main([
        "train", str(demo), "--max-steps", "3", "--eval-every", "0", "--save-every", "0",
        "--gs.init-random-points", "300", "--viewer", "--viewer-port", "0", "--output", str(tmp_path / "run"),
    ])
    assert code == 0
    out = capsys.readouterr().out
    match = re.search(r"fieldkit viewer: http://127\.0\.0\.1:(\d+)", out)
    assert match and int(match.group(1)) > 0
    viewer = seen["viewer"]
    assert viewer.host == "127.0.0.1" and viewer.stats.step == 3 and viewer.stats.state == "finished"
    assert [round(v, 6) for v in viewer.stats.curve()[0]] == [1.0, 2.0, 3.0]

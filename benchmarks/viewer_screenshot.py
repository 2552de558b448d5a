#!/usr/bin/env python3
"""Screenshot of the live viewer in a real browser: headless Chromium on a run served by fieldkit.

Serves ``RUN`` with :func:`fieldkit.viewer.serve_run` on 127.0.0.1 (free port), opens it in
Debian's ``chromium`` (``--headless --no-sandbox``, WebGL through SwiftShader), waits until the
browser has connected, sent its camera and been sent a full-resolution render, then captures the
page through the DevTools protocol (also on 127.0.0.1) and writes a PNG.

    python benchmarks/viewer_screenshot.py outputs/lego_200/gs/<time> -o benchmarks/viewer_screenshot.png
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no chromium found: apt-get install -y chromium")


def launch_chromium(url: str, width: int, height: int, profile: Path) -> tuple[subprocess.Popen, int]:
    args = [
        chromium_binary(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        url,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found: dict[str, int] = {}

    def scan() -> None:
        for line in iter(proc.stderr.readline, ""):
            match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if match:
                found["port"] = int(match.group(1))

    threading.Thread(target=scan, daemon=True).start()
    deadline = time.monotonic() + 60
    while "port" not in found and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    if "port" not in found:
        proc.kill()
        sys.exit("chromium did not start its DevTools endpoint")
    return proc, found["port"]


def capture(devtools_port: int, path: Path) -> None:
    from websockets.sync.client import connect

    with urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list", timeout=10) as response:
        targets = json.loads(response.read())
    page = next(t for t in targets if t.get("type") == "page")
    with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
        ws.send(json.dumps({"id": 1, "method": "Page.captureScreenshot", "params": {"format": "png"}}))
        while True:
            reply = json.loads(ws.recv(timeout=30))
            if reply.get("id") == 1:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(reply["result"]["data"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path(__file__).with_name("viewer_screenshot.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait after the first full frame")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    import logging

    from fieldkit.viewer import serve_run

    # Chromium opens speculative connections it never uses; websockets logs each as an error.
    logging.getLogger("websockets.server").setLevel(logging.CRITICAL)

    viewer = serve_run(args.run, port=0)
    profile = Path(tempfile.mkdtemp(prefix="fieldkit-chromium-"))
    browser = None
    try:
        browser, devtools_port = launch_chromium(viewer.url, args.width, args.height, profile)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            frames = [s.last_frame for s in viewer.sessions() if s.last_frame]
            if any(kind == "full" for kind, _, _ in frames):
                break
            time.sleep(0.2)
        else:
            print("the browser never received a full-resolution frame", file=sys.stderr)
            return 1
        kind, w, h = next(f for f in (s.last_frame for s in viewer.sessions()) if f)
        print(f"browser connected; last frame {kind} {w}x{h}; settling {args.settle:.0f} s")
        time.sleep(args.settle)
        capture(devtools_port, args.output)
        print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KB)")
    finally:
        if browser is not None:
            browser.terminate()
            try:
                browser.wait(10)
            except subprocess.TimeoutExpired:
                browser.kill()
        viewer.stop()
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``fieldkit view <run>``: serve a finished run in the browser (no viser import until it runs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import tyro


@dataclass
class ViewCommand:
    """Browse a finished run in the browser (viser); Ctrl-C stops the server."""

    run: tyro.conf.Positional[Path]
    host: str = "127.0.0.1"
    """Interface to bind; the default keeps the viewer private to this machine (0.0.0.0 exposes it)."""
    port: int = 8080
    """TCP port; 0 picks a free one (the URL is printed)."""
    backend: Optional[Literal["auto", "torch", "cpu", "cuda", "gsplat"]] = None
    """Rasterizer backend for Gaussian runs (default: the run's own)."""


def run_view(cmd: ViewCommand) -> None:
    from fieldkit.viewer.server import serve_run

    viewer = serve_run(cmd.run, host=cmd.host, port=cmd.port, backend=cmd.backend)
    print("Ctrl-C to stop.", flush=True)
    viewer.wait()

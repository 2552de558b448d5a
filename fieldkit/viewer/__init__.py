"""Live browser viewer on viser (the design's top-level ``viewer/``, shipped as ``fieldkit.viewer``).

``fieldkit train ... --viewer`` watches a run train; ``fieldkit view <run>`` browses a finished
one. viser is imported only when a viewer is created, so importing this package is cheap.
"""

from __future__ import annotations

__all__ = ["Viewer", "ViewerConfig", "ViewCamera", "serve_run", "start_training_viewer"]


def __getattr__(name: str):
    if name in ("Viewer", "ViewerConfig", "serve_run", "start_training_viewer"):
        from fieldkit.viewer import server

        return getattr(server, name)
    if name == "ViewCamera":
        from fieldkit.viewer.camera import ViewCamera

        return ViewCamera
    raise AttributeError(f"module 'fieldkit.viewer' has no attribute {name!r}")

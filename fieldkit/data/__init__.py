"""Scene readers: every format becomes one :class:`Scene` with OpenCV world-to-camera cameras."""

from .blender import load_blender
from .colmap import load_colmap
from .detect import detect_format, load_scene
from .errors import SceneFormatError
from .llff import load_llff
from .nerfstudio import load_nerfstudio
from .scene import Scene

__all__ = [
    "Scene",
    "SceneFormatError",
    "detect_format",
    "load_scene",
    "load_blender",
    "load_colmap",
    "load_llff",
    "load_nerfstudio",
]

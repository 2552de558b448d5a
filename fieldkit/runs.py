"""Run folders: create them, record how they were made, and rebuild a method from one."""

from __future__ import annotations

import dataclasses
import json
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fieldkit.io_atomic import atomic_path
from fieldkit.methods import load_method_classes

CONFIG_NAME = "config.json"


@dataclass
class DataOptions:
    """How to read the scene."""

    downscale: int = 1
    """Divide image width and height by this integer factor."""
    background: tuple[float, float, float] | None = None
    """RGB in [0,1] that transparent pixels are composited on (default: the format's, white for Blender)."""


@dataclass
class RunRecord:
    """Everything needed to rebuild a run: written to ``<run>/config.json``."""

    method: str
    data: str
    data_options: dict[str, Any]
    method_config: dict[str, Any]
    max_steps: int
    seed: int
    backend: str
    trainer: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    fieldkit_version: str = ""


def default_run_dir(data: Path, method: str, root: Path = Path("outputs")) -> Path:
    """``outputs/<scene>/<method>/<timestamp>/``."""
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    return root / Path(data).resolve().name / method / stamp


def write_record(run_dir: Path, record: RunRecord) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(record), indent=2) + "\n")
    return path


def read_record(run_dir: Path) -> RunRecord:
    path = Path(run_dir) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder: {CONFIG_NAME} is missing (pass the folder `fieldkit train` printed)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    known = {f.name for f in dataclasses.fields(RunRecord)}
    return RunRecord(**{k: v for k, v in raw.items() if k in known})


def dataclass_from_dict(cls: type, values: dict[str, Any]):
    """Rebuild a (nested) config dataclass from ``dataclasses.asdict`` output; unknown keys are ignored."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, kind = values[f.name], hints[f.name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = dataclass_from_dict(kind, value)
        elif isinstance(value, list) and _is_tuple_type(kind):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _is_tuple_type(kind: Any) -> bool:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_is_tuple_type(arg) for arg in typing.get_args(kind))
    return kind is tuple or typing.get_origin(kind) is tuple


def load_scene_for(record: RunRecord):
    """Re-read the run's training data with the options it was trained with."""
    options = dataclass_from_dict(DataOptions, record.data_options)
    background = torch.tensor(options.background, dtype=torch.float32) if options.background is not None else None
    data = Path(record.data)
    if not data.exists():
        raise FileNotFoundError(f"the run's data {data} no longer exists; restore it to evaluate or render this run")
    _, method_cls = load_method_classes(record.method)
    return method_cls.load_data(data, downscale=options.downscale, background=background)


def build_method(record: RunRecord, scene, backend: str | None = None):
    config_cls, method_cls = load_method_classes(record.method)
    config = dataclass_from_dict(config_cls, record.method_config)
    return method_cls(config, scene, max_steps=record.max_steps, backend=backend or record.backend, seed=record.seed)


def load_run(run_dir: Path, backend: str | None = None, checkpoint: Path | None = None):
    """(method with its latest weights, scene, record, step) for a run folder."""
    from fieldkit.trainer import latest_checkpoint, load_checkpoint

    run_dir = Path(run_dir)
    record = read_record(run_dir)
    scene = load_scene_for(record)
    method = build_method(record, scene, backend)
    path = checkpoint or latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoints/step-*.pt yet")
    ckpt = load_checkpoint(path)
    method.load_state_dict(ckpt["state"])
    return method, scene, record, int(ckpt["step"])

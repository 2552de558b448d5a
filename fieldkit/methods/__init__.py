"""Method registry: names -> (config class, method class), imported lazily."""

from __future__ import annotations

import importlib

# name -> (module, config class, method class, one-line description)
REGISTRY: dict[str, tuple[str, str, str, str]] = {
    "gs": ("fieldkit.methods.gs", "GSConfig", "GaussianSplatting", "3D Gaussian splatting (Kerbl et al. 2023), the default for posed images"),
    "nerf": ("fieldkit.methods.nerf", "NerfConfig", "NeRF", "hash-grid radiance field (Instant-NGP class), with CAM and S3IM options"),
    "gs-compact": ("fieldkit.methods.gs_compact", "CompactConfig", "CompactGaussians", "Compact-3DGS: volume mask, hash-grid colour field, residual VQ; exports the .fkc compressed format"),
    "gs-hier": ("fieldkit.methods.gs_hier", "HierConfig", "HierarchicalGaussians", "3DGS plus a level-of-detail tree (hierarchical 3DGS, Kerbl et al. 2024): renders a per-view cut by projected size; exports the .fklod tree"),
    "orex": ("fieldkit.methods.orex", "OReXConfig", "OReX", "watertight shapes from planar cross-sections (.csl) with a neural occupancy field (Sawdayee et al. 2023)"),
}


def method_names() -> list[str]:
    return list(REGISTRY)


def describe_methods() -> str:
    return "; ".join(f"{name}: {entry[3]}" for name, entry in REGISTRY.items())


def default_method_for(path) -> str:
    """The method a data folder implies: a .csl file (or a folder holding one) -> orex, else gs."""
    from pathlib import Path

    path = Path(path)
    if "orex" in REGISTRY and (path.suffix.lower() == ".csl" or (path.is_dir() and any(path.glob("*.csl")))):
        return "orex"
    return "gs"


def load_method_classes(name: str):
    """(config class, method class) for a registered method name."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(REGISTRY)}")
    module_name, config_cls, method_cls, _ = REGISTRY[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_cls), getattr(module, method_cls)

"""tiny-cuda-nn's ``HashGrid`` encoding as an optional accelerator (CUDA only).

``tinycudann`` is not on PyPI and needs nvcc and a GPU to build; when it is importable the hash
grid can run through it with **our** parameter table (same flat layout as tcnn's), so the three
implementations stay interchangeable and checkpoints do not depend on which one trained them.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from fieldkit.fields.hashgrid import HashGridConfig

_HINT = ("tinycudann is not installed (optional; pip install "
         "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch on a CUDA machine)")


def is_available() -> bool:
    if importlib.util.find_spec("tinycudann") is None or not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:  # a broken build (wrong arch, missing libs) counts as absent
        return False
    return True


def encoding_config(config: HashGridConfig) -> dict:
    """The tcnn JSON config of a :class:`HashGridConfig` (linear interpolation)."""
    return {
        "otype": "HashGrid",
        "n_levels": config.n_levels,
        "n_features_per_level": config.n_features_per_level,
        "log2_hashmap_size": config.log2_hashmap_size,
        "base_resolution": config.base_resolution,
        "per_level_scale": config.per_level_scale,
        "interpolation": "Linear",
    }


class TcnnHashGrid:
    """Calls tcnn's encoding kernel with an external parameter table [rows, F] (float32)."""

    def __init__(self, config: HashGridConfig, dims: int = 3):
        if not is_available():
            raise RuntimeError(_HINT)
        import tinycudann as tcnn

        self.module = tcnn.Encoding(dims, encoding_config(config), dtype=torch.float32)
        self.n_params = self.module.params.numel()

    def __call__(self, x: Tensor, table: Tensor) -> Tensor:
        from tinycudann.modules import _module_function

        flat = table.reshape(-1)
        if flat.numel() != self.n_params:
            raise ValueError(f"tcnn expects {self.n_params} parameters, the table has {flat.numel()}")
        self.module = self.module.to(x.device)
        out = _module_function.apply(self.module.native_tcnn_module, x.contiguous().float(), flat.float(), self.module.loss_scale)
        return out.reshape(x.shape[0], -1).to(table.dtype)

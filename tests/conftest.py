"""Shared fixtures: where the real data lives, and clean skips when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fieldkit  # noqa: F401  (sets OMP_WAIT_POLICY before any test imports torch)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FIELDKIT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skips the calling test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set FIELDKIT_SHARED_DATA or place ../shared/data beside the repo)")
    return path


@pytest.fixture
def shared_data() -> Path:
    return shared_path()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch.set_num_threads(1) for a whole module (small models: threads only add overhead on 2 cores)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""Just-in-time builds of fieldkit's native extensions: one place for source lookup, caching and errors.

Every extension (rasterizer CPU/CUDA, hash grid CPU/CUDA, LM cache) is compiled with
:func:`torch.utils.cpp_extension.load` the first time it is needed (once per process, thread-safe)
into ``$FIELDKIT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fieldkit`` or ``~/.cache/fieldkit``), in a
folder keyed by a hash of its sources, torch, Python, the machine, the compiler and the flags, so
edits and upgrades rebuild and nothing else does. Kernel sources are looked up in
``$FIELDKIT_KERNELS_DIR``, then ``fieldkit/kernels`` (package data of an install), then
``<repo>/kernels`` (source checkout). ``FIELDKIT_NO_NATIVE=1`` disables every native build.
A failed build is remembered (not retried per call) and reported with the path of its log.

Processes building the same folder take turns through an ``flock`` on ``build.flock`` (released
by the kernel when its holder dies), so a build interrupted by Ctrl-C or ``kill`` cannot leave
later runs waiting forever on torch's own ``lock`` file: the next builder removes it and says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

import torch

try:
    import fcntl
except ImportError:  # not POSIX: torch's own lock file only
    fcntl = None

log = logging.getLogger("fieldkit")


@contextlib.contextmanager
def build_turn(build_dir: Path, name: str):
    """Hold the exclusive build turn for ``build_dir``; clears a lock file left by a dead build."""
    if fcntl is None:
        yield
        return
    with open(build_dir / "build.flock", "a") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building %s in %s; waiting for it", name, build_dir)
            fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"  # torch.utils.cpp_extension's baton; nobody else is building now
            if stale.exists():
                log.warning("removed %s, left by an interrupted build of %s", stale, name)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def cache_root() -> Path:
    """Folder for build caches."""
    if os.environ.get("FIELDKIT_CACHE_DIR"):
        return Path(os.environ["FIELDKIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fieldkit"


def compiler_path() -> str | None:
    """The host C++ compiler ($CXX, default c++) on PATH, or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


class NativeExtension:
    """A lazily built torch extension from ``kernels/`` sources.

    ``requirements`` returns why the build cannot be attempted here (no GPU, no nvcc, ...) or None;
    ``key_parts`` adds strings (e.g. the GPU's compute capability) to the cache key.
    """

    def __init__(self, name: str, sources: Sequence[str], headers: Sequence[str] = (), *,
                 cflags: Sequence[str] = ("-O3",), ldflags: Sequence[str] = (), cuda_cflags: Sequence[str] | None = None,
                 include_dirs: Sequence[str] = ("include",), what: str = "kernel sources",
                 requirements: Callable[[], str | None] | None = None, key_parts: Callable[[], list[str]] | None = None):
        self.name, self.sources, self.headers = name, tuple(sources), tuple(headers)
        self.cflags, self.ldflags = list(cflags), list(ldflags)
        self.cuda_cflags = list(cuda_cflags) if cuda_cflags is not None else None
        self.include_dirs, self.what = tuple(include_dirs), what
        self.requirements, self.key_parts = requirements, key_parts
        self.build_seconds: float | None = None  # wall time of load() in this process (compile or cache hit)
        self._lock = threading.Lock()
        self._module: ModuleType | None = None
        self._failure: str | None = None

    def kernels_dir(self) -> Path | None:
        """Folder holding all of this extension's sources, or None."""
        candidates = [Path(os.environ["FIELDKIT_KERNELS_DIR"])] if os.environ.get("FIELDKIT_KERNELS_DIR") else []
        package_root = Path(__file__).resolve().parent  # .../fieldkit
        candidates += [package_root / "kernels", package_root.parent / "kernels"]
        for folder in candidates:
            if all((folder / rel).is_file() for rel in self.sources + self.headers):
                return folder
        return None

    def unavailable_reason(self) -> str | None:
        """Why the build cannot even be attempted here, or None."""
        if os.environ.get("FIELDKIT_NO_NATIVE", "") not in ("", "0"):
            return "disabled by FIELDKIT_NO_NATIVE"
        if self.requirements is not None and (reason := self.requirements()) is not None:
            return reason
        if self.kernels_dir() is None:
            return (f"{self.what} not found (looked in $FIELDKIT_KERNELS_DIR, fieldkit/kernels and <repo>/kernels); "
                    "install from a source checkout or set FIELDKIT_KERNELS_DIR")
        if compiler_path() is None:
            return f"no C++ compiler found ({os.environ.get('CXX', 'c++')} is not on PATH)"
        return None

    def build_key(self, folder: Path) -> str:
        digest = hashlib.sha256()
        for rel in sorted(self.sources + self.headers):
            digest.update(rel.encode())
            digest.update((folder / rel).read_bytes())
        parts = [torch.__version__, sys.version, platform.machine(), str(compiler_path()), *self.cflags, *self.ldflags,
                 *(self.cuda_cflags or []), *(self.key_parts() if self.key_parts else [])]
        digest.update("|".join(parts).encode())
        return digest.hexdigest()[:16]

    def build_dir(self) -> Path:
        """The cache folder this extension builds into (keyed by sources, versions and flags)."""
        return cache_root() / "torch_extensions" / f"{self.name}-{self.build_key(self.kernels_dir())}"

    def _load(self) -> ModuleType:
        reason = self.unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        folder = self.kernels_dir()
        build_dir = self.build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load

        start = time.perf_counter()
        try:
            with build_turn(build_dir, self.name):
                module = load(
                    name=self.name,
                    sources=[str(folder / rel) for rel in self.sources],
                    extra_include_paths=[str(folder / sub) for sub in self.include_dirs],
                    # copies: torch appends its own flags to the lists it is given (the cache key reads ours)
                    extra_cflags=list(self.cflags),
                    extra_ldflags=list(self.ldflags) or None,
                    extra_cuda_cflags=list(self.cuda_cflags) if self.cuda_cflags is not None else None,
                    build_directory=str(build_dir),
                    verbose=False,
                )
        except Exception as error:  # compiler errors surface as RuntimeError/CalledProcessError
            log_path = build_dir / "build_error.log"
            log_path.write_text(f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
            raise RuntimeError(f"building the {self.name} extension failed; log: {log_path}") from error
        self.build_seconds = time.perf_counter() - start
        return module

    def module(self) -> ModuleType:
        """The compiled module (built on first call); RuntimeError with the reason if unavailable."""
        if self._module is not None:
            return self._module
        with self._lock:
            if self._module is None and self._failure is None:
                try:
                    self._module = self._load()
                except Exception as error:  # remember the failure: do not retry a broken build per call
                    self._failure = str(error)
            if self._module is None:
                raise RuntimeError(self._failure)
            return self._module

    def is_available(self) -> tuple[bool, str]:
        """(True, '') when the extension builds/loads, else (False, reason)."""
        try:
            self.module()
        except RuntimeError as error:
            return False, str(error)
        return True, ""

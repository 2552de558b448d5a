"""The method-agnostic training loop: steps, progress, metrics, checkpoints, resume, plots."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fieldkit.io_atomic import atomic_path
from fieldkit.methods.base import Method

CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainerConfig:
    max_steps: int = 7000
    eval_every: int = 1000
    """Steps between evaluations on (up to ``eval_views``) held-out views; 0 disables."""
    eval_views: int = 5
    save_every: int = 2000
    log_every: int = 10
    seed: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step-{step:09d}.pt"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINT_DIR).glob("step-*.pt"))
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, method: Method) -> Path:
    """Write ``checkpoints/step-N.pt`` atomically (temp file, then rename)."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"step": step, "method": method.name, "state": method.state_dict(), "rng": _rng_state()}, tmp)
    return path


def _rng_state() -> dict[str, Any]:
    """torch's global RNG state (CPU, and CUDA when in use): methods may draw from it (e.g. 3DGS splits)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class TurnLock:
    """A first-come, first-served lock: a viewer waiting to render gets it right after the current step.

    (``threading.Lock`` is not fair: a loop that releases and re-acquires it can starve waiters.)
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0
        self._serving = 0

    def acquire(self) -> None:
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            while ticket != self._serving:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def __enter__(self) -> "TurnLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Trainer:
    """Runs ``method.train_step`` for the configured steps and keeps the run folder up to date.

    Viewer interface: ``lock`` is held during each step (render under it to see a consistent
    model), ``pause()``/``resume_training()`` hold the loop between steps, and each of ``hooks`` gets
    ``on_step(step, stats)`` after every step and, if it has one, ``on_train_end(step)``.
    """

    def __init__(self, method: Method, run_dir: Path, config: TrainerConfig, eval_images=None, eval_cameras=None, hooks=None):
        self.method = method
        self.run_dir = Path(run_dir)
        self.config = config
        self.eval_images = eval_images
        self.eval_cameras = eval_cameras
        self.start_step = 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._interrupted = False
        self.hooks = list(hooks or [])
        self.lock = TurnLock()
        self._running = threading.Event()
        self._running.set()

    def pause(self) -> None:
        self._running.clear()

    def resume_training(self) -> None:
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def resume(self) -> int:
        """Load the newest checkpoint in the run folder, if any; returns the step to continue from."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return 0
        ckpt = load_checkpoint(path)
        if ckpt.get("method") != self.method.name:
            raise ValueError(f"{path} was written by method {ckpt.get('method')!r}, not {self.method.name!r}")
        self.method.load_state_dict(ckpt["state"])
        _set_rng_state(ckpt.get("rng", {}))
        self.start_step = int(ckpt["step"])
        # Drop records logged after the checkpoint (a crash between saves), so steps stay increasing.
        records = read_metrics(self.metrics_path)
        if any(r.get("step", 0) > self.start_step for r in records):
            with atomic_path(self.metrics_path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= self.start_step))
        return self.start_step

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        from fieldkit.metrics import psnr

        if self.eval_images is None or len(self.eval_cameras) == 0:
            return {}
        count = min(self.config.eval_views, len(self.eval_cameras))
        picks = torch.linspace(0, len(self.eval_cameras) - 1, count).round().long().tolist()
        values = []
        for i in picks:
            rgb = self.method.render(self.eval_cameras[i])["rgb"]
            values.append(float(psnr(rgb, self.eval_images[i : i + 1].to(rgb.device)).mean()))
        result = {"step": step, "eval_psnr": float(np.mean(values))}
        self._log(result)
        return result

    def train(self) -> Path:
        """Train to ``max_steps``; Ctrl-C saves a checkpoint and says how to resume."""
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous_handler = signal.getsignal(signal.SIGINT)

        def on_interrupt(signum, frame):  # finish the current step, then stop cleanly
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True

        signal.signal(signal.SIGINT, on_interrupt)
        step = self.start_step
        last_eval: dict[str, float] = {}
        started = time.perf_counter()
        bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True, desc="train")
        try:
            while step < cfg.max_steps and not self._interrupted:
                while not self._running.wait(0.05) and not self._interrupted:
                    pass  # paused (by a viewer); Ctrl-C still stops cleanly
                if self._interrupted:
                    break
                with self.lock:
                    stats = self.method.train_step(step)
                step += 1
                for hook in self.hooks:
                    hook.on_step(step, stats)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    extra = self.method.stats()
                    elapsed = time.perf_counter() - started
                    record = {"step": step, **stats, **extra, "elapsed_s": round(elapsed, 3)}
                    self._log(record)
                    postfix = {"loss": f"{stats['loss']:.4f}"}
                    if "psnr" in stats:  # image methods; shape methods (orex) report their batch accuracy
                        postfix["psnr"] = f"{stats['psnr']:.2f}"
                    elif "accuracy" in stats:
                        postfix["accuracy"] = f"{stats['accuracy']:.4f}"
                    postfix.update({k: int(v) for k, v in extra.items()})
                    if last_eval:
                        postfix["eval_psnr"] = f"{last_eval['eval_psnr']:.2f}"
                    bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if cfg.eval_every and step % cfg.eval_every == 0:
                    last_eval = self.evaluate(step) or last_eval
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                    save_checkpoint(self.run_dir, step, self.method)
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous_handler)
        path = save_checkpoint(self.run_dir, step, self.method)
        for hook in self.hooks:
            if hasattr(hook, "on_train_end"):
                hook.on_train_end(step)
        plot_training_curves(self.metrics_path, self.run_dir / "training_curves.png")
        if self._interrupted:
            print(f"Interrupted at step {step}; checkpoint saved to {path}")
            print(f"Resume with: fieldkit train --resume --output {self.run_dir} ...(same data and options)")
        return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """Loss, PSNR and primitive count against step, as one PNG."""
    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if "eval_psnr" in r]
    counts = [r for r in train if "gaussians" in r]
    panels = 3 if counts else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], lw=0.8)
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[1].plot(steps, [r.get("psnr", np.nan) for r in train], lw=0.6, alpha=0.6, label="train view")
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["eval_psnr"] for r in evals], "o-", label="held-out views")
    axes[1].set(title="PSNR (dB)", xlabel="step")
    axes[1].legend()
    if counts:
        axes[2].plot([r["step"] for r in counts], [r["gaussians"] for r in counts])
        axes[2].set(title="Gaussians", xlabel="step")
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_path

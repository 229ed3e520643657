"""What every long run shares: output directory, metrics file, atomic checkpoints, RNG state."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus the RNG state) so that a crash at any moment leaves either the old
    checkpoint or the new one, never a torn file: write to a temporary file, fsync, rename."""
    run_dir = Path(run_dir)
    state = dict(state, rng=rng_state())
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, run_dir / CHECKPOINT)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Load the checkpoint of ``run_dir`` and restore the RNG state it saved."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise SystemExit(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return state


def append_metrics(run_dir: Path, record: dict[str, Any], keep_epochs_below: int | None = None) -> None:
    """Append one JSON object to metrics.jsonl (after dropping lines of epochs a resumed run redoes)."""
    path = Path(run_dir) / METRICS
    if keep_epochs_below is not None and path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] < keep_epochs_below]
        path.write_text("".join(line + "\n" for line in kept))
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        raise SystemExit(f"no {METRICS} in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    (Path(run_dir) / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

"""The gloo threads this process still runs: none once its process group is freed. A group held
to the interpreter's exit has its threads stopped there, which can abort a run that succeeded
(see hnca_kernels/distributed.py)."""

from __future__ import annotations

from pathlib import Path


def gloo_threads() -> list[str] | None:
    """The names of this process's gloo threads, or None where /proc/self/task does not list them."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = ((t / "comm").read_text().strip() for t in tasks.iterdir())
    return [name for name in names if "gloo" in name]

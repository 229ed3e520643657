"""The gloo threads this process still runs: none once its process group is freed. A group held
to the interpreter's exit has its threads stopped there, which can abort a run that succeeded
(see hnca_kernels/distributed.py)."""

from __future__ import annotations

import time
from pathlib import Path

SETTLE_S = 10.0


def _listed() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except (FileNotFoundError, ProcessLookupError):   # the thread ended while it was listed
            pass
    return [name for name in names if "gloo" in name]


def gloo_threads(settle_s: float = SETTLE_S) -> list[str] | None:
    """The names of this process's gloo threads, or None where /proc/self/task does not list them.

    A thread that freeing the group has joined can stay listed a moment after the join returns
    (the kernel wakes the joiner before it unlists the task, a window a loaded machine widens), so
    the list is read again for up to ``settle_s`` seconds before the threads count as left."""
    if not Path("/proc/self/task").is_dir():
        return None
    deadline = time.monotonic() + settle_s
    while (left := _listed()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left

"""The run directory of ``hnca vae`` and ``hnca bandit``: one process at a time, files that a kill
at any moment leaves whole, and one policy for what a directory may hold when a run starts.

A run directory holds ``config.json`` (the run's settings), ``metrics.jsonl`` (one strict-JSON
object per finished epoch, epochs 1, 2, ... in order), ``checkpoint.pt`` (the state after the last
finished epoch) and ``.lock`` (``flock``-ed by the process that runs it, which writes its PID there).

Every file is replaced atomically: written to a temporary file beside it, fsync-ed, renamed over
it. After each epoch the metrics are written first, then the checkpoint, so at any moment the
metrics hold epochs 1..C or 1..C+1, C being the checkpoint's epoch (0 without one). When a run
starts, the directory must be in one of those states:

* fresh (no ``--resume``): nothing saved, i.e. no checkpoint and no metrics beyond epoch 1 (the
  trace of a run stopped before its first checkpoint, replaced with a message), else an error;
* ``--resume``: config.json with the same settings; the metrics of epochs 1..C all present (else an
  error saying which are missing); a line of epoch C+1 (its checkpoint was never written) is dropped
  with a message and the epoch trained again; C = 0 starts at epoch 1 with a message.
Temporary files of killed runs are removed. Any other state is a one-line error: nothing is
overwritten and nothing is silently restarted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
LOCK = ".lock"
_TEMP_PREFIXES = (".checkpoint-", ".metrics-", ".config-")


class CommandError(Exception):
    """An expected failure of a command: ``hnca`` prints the message as one line on stderr and exits
    with ``status`` (1: the files, data or training failed; 2: the command line cannot be used)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


class UsageError(CommandError):
    """A bad option value (argparse-style, status 2)."""

    def __init__(self, message: str):
        super().__init__(message, status=2)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (multi-line messages joined with '; ')."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def ranges(numbers: Iterable[int]) -> str:
    """'1-3, 5, 7-8' for [1, 2, 3, 5, 7, 8]."""
    spans: list[list[int]] = []
    for n in sorted(set(numbers)):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


# ----------------------------------------------------------------------------- strict JSON

def finite_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with every non-finite float replaced by None and their keys listed under
    ``"nonfinite"``, so that the line is strict JSON (no bare NaN/Infinity tokens)."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    return {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(text: str) -> Any:
    """json.loads that rejects the NaN/Infinity tokens Python's json writes by default."""
    return json.loads(text, parse_constant=_reject_constant)


def dumps_strict(value: Any, **kwargs) -> str:
    return json.dumps(value, allow_nan=False, **kwargs)


# ----------------------------------------------------------------------------- atomic files

def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Replace ``path`` by what ``write(binary_file)`` writes: temporary file, fsync, rename, so a
    crash at any moment leaves the old file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have given
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # Ctrl-C inside the writer can surface as the writer's own cleanup error (torch.save's zip
        # writer then fails to close): the interrupt is what happened, and the old file is intact
        cause = error
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__context__
        if cause is not None and cause is not error:
            raise cause from None
        raise
    _fsync_dir(path.parent)


def _write_error(path: Path, exc: OSError) -> CommandError:
    return CommandError(f"cannot write {path}: {one_line(exc)}")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (strict), or a one-line CommandError."""
    try:
        value = loads_strict(Path(path).read_text())
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {one_line(exc)}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CommandError(f"{path} is not valid JSON ({one_line(exc)})") from None
    if not isinstance(value, dict):
        raise CommandError(f"{path} is not a JSON object")
    return value


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The records of a metrics.jsonl file and whether its last line was torn (no newline and not
    JSON: an append that a kill cut short, left out). Any other bad line is a CommandError."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {one_line(exc)}") from None
    except ValueError as exc:
        raise CommandError(f"{path} is not UTF-8 text ({one_line(exc)})") from None
    lines = text.split("\n")
    records, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = loads_strict(line)
        except ValueError as exc:
            if number == len(lines):  # the last line, without its newline
                torn = True
                break
            raise CommandError(f"{path} line {number} is not valid JSON ({one_line(exc)})") from None
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise CommandError(f"{path} line {number} is not an object with a positive integer 'epoch'")
        records.append(record)
    return records, torn


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``RunDir.finish_epoch`` (tensors on the CPU), or a CommandError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torn zip, pickle error, permissions: all mean "cannot read"
        raise CommandError(f"cannot read the checkpoint {path} ({one_line(exc)})") from None
    epoch = state.get("epoch") if isinstance(state, dict) else None
    if not isinstance(epoch, int) or epoch < 1 or "model" not in state:
        raise CommandError(f"{path} is not a checkpoint of an hnca run")
    return state


# ----------------------------------------------------------------------------- the run directory

def experiment_of(config: dict[str, Any]) -> str | None:
    """'vae' or 'bandit' (older VAE configs said it under "command")."""
    return config.get("experiment", config.get("command"))


class RunDir:
    """An open run directory, locked for this process until ``close`` (use ``with``).

    ``epoch``: epochs done (the checkpoint's); ``checkpoint``: its state, or None to start at epoch 1;
    ``metrics``: the records of epochs 1..epoch. Open it with ``RunDir.start``.
    """

    def __init__(self, path: Path, experiment: str):
        self.path, self.experiment = Path(path), experiment
        self.checkpoint: dict[str, Any] | None = None
        self.metrics: list[dict[str, Any]] = []
        self.epoch = 0
        self._lock_fd: int | None = None
        self._created = False
        self._wrote = False

    # -- opening and the policy ---------------------------------------------------------
    @classmethod
    def start(cls, path: Path, experiment: str, config: dict[str, Any], run_keys: Iterable[str],
              resume: bool, defaults: dict[str, Any] | None = None,
              note: Callable[[str], None] = print) -> "RunDir":
        """Lock ``path`` (created if needed) and check its state against the policy above.

        ``run_keys``: settings a resumed run must share with ``config`` (``defaults`` gives the value
        of a key that an older config.json lacks). ``note`` receives the one-line messages about
        what was cleaned up or dropped.
        """
        run = cls(path, experiment)
        if resume and not run.path.is_dir():
            raise CommandError(f"--resume: nothing to resume in {run.path} (no such directory)")
        run._open()
        try:
            run._check(config, tuple(run_keys), resume, defaults or {}, note)
        except BaseException:
            run.close(failed=True)
            raise
        return run

    def _open(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise CommandError(f"--out {self.path} is not a directory")
        try:
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"cannot create the run directory {self.path}: {one_line(exc)}") from None
        lock = self.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self.close(failed=True)
            raise CommandError(f"cannot write to {self.path}: {one_line(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CommandError(f"{self.path} is in use by PID {holder}" if holder.isdigit()
                               else f"{self.path} is in use by another process") from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def _check(self, config, run_keys, resume, defaults, note) -> None:
        stale = [p for p in self.path.iterdir() if p.name.startswith(_TEMP_PREFIXES) and p.name.endswith(".tmp")]
        for p in stale:
            try:
                p.unlink()
            except OSError as exc:
                raise CommandError(f"cannot remove {p}: {one_line(exc)}") from None
        if stale:
            note(f"{self.path}: removed {len(stale)} temporary file(s) of a killed run")
        config_path, metrics_path, ckpt_path = (self.path / n for n in (CONFIG, METRICS, CHECKPOINT))
        records, torn = read_metrics(metrics_path) if metrics_path.exists() else ([], False)
        # No checkpoint and at most the metrics of epoch 1: a run stopped before its first
        # checkpoint, nothing to keep; a fresh start and --resume both start at epoch 1.
        nothing_saved = not ckpt_path.exists() and [r["epoch"] for r in records] in ([], [1])

        if not resume:
            if not nothing_saved:
                done = f" ({records[-1]['epoch']} epoch(s))" if records else ""
                raise CommandError(f"{self.path} already holds a run{done}; pass --resume to continue it "
                                   "or choose another --out")
            if records or torn:
                self._replace(METRICS, lambda f: None)
            if config_path.exists() or records or torn:
                note(f"{self.path}: the run there stopped before its first checkpoint; starting afresh")
            return

        if not config_path.exists():
            if ckpt_path.exists() or records or torn:
                raise CommandError(f"--resume: {config_path} is missing, so the run's settings are unknown")
            raise CommandError(f"--resume: nothing to resume in {self.path} (no {CONFIG})")
        saved = read_json(config_path)
        if experiment_of(saved) not in (None, self.experiment):
            raise CommandError(f"--resume: {self.path} holds a {experiment_of(saved)} run, not a {self.experiment} run")
        diff = [f"{k} {saved.get(k, defaults.get(k))!r} -> {config.get(k)!r}" for k in run_keys
                if saved.get(k, defaults.get(k)) != config.get(k)]
        if diff:
            raise CommandError(f"--resume with different settings than the run in {self.path} ({'; '.join(diff)}); "
                               "use the run's settings or another --out")

        if ckpt_path.exists():
            self.checkpoint = load_checkpoint(ckpt_path)
            self.epoch = self.checkpoint["epoch"]
        done = self.epoch
        epochs = [r["epoch"] for r in records]
        where = f"--resume: {metrics_path}"
        if len(set(epochs)) != len(epochs):
            twice = sorted({e for e in epochs if epochs.count(e) > 1})
            raise CommandError(f"{where} holds epoch(s) {ranges(twice)} more than once (two runs wrote to it?); "
                               "cannot resume")
        missing = sorted(set(range(1, done + 1)) - set(epochs))
        if missing:
            raise CommandError(f"{where} lacks epoch(s) {ranges(missing)} of the {done} in {CHECKPOINT}: "
                               "the history is incomplete; cannot resume")
        if epochs and max(epochs) > done + 1:
            held = f"{CHECKPOINT} holds epoch {done}" if done else f"{CHECKPOINT} is missing"
            raise CommandError(f"{where} records epochs up to {max(epochs)} but {held}; cannot resume")
        if epochs != sorted(epochs):
            raise CommandError(f"{where} holds its epochs out of order; cannot resume")
        self.metrics = records[:done]
        dropped = [f"epoch {e}" for e in epochs[done:]] + (["a torn last line"] if torn else [])
        if dropped:
            self._write_metrics()
            note(f"{self.path}: dropped the metrics of {' and '.join(dropped)}, written after the last checkpoint "
                 f"(epoch {done}); that epoch is trained again")
        if self.checkpoint is None:
            note(f"{self.path}: no checkpoint yet (the run stopped before its first epoch ended); starting at epoch 1")

    def close(self, failed: bool = False) -> None:
        """Release the lock; after a failure in a directory this process created and wrote nothing
        to, remove it again (so a mistyped --out leaves nothing behind)."""
        if failed and self._created and not self._wrote:
            with contextlib.suppress(OSError):
                (self.path / LOCK).unlink()
                self.path.rmdir()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    # -- writing ------------------------------------------------------------------------
    def _replace(self, name: str, write: Callable[[Any], None]) -> None:
        path = self.path / name
        self._wrote = True
        try:
            atomic_write(path, write)
        except OSError as exc:
            raise _write_error(path, exc) from None

    def write_config(self, config: dict[str, Any]) -> None:
        text = dumps_strict(config, indent=2, sort_keys=True) + "\n"
        self._replace(CONFIG, lambda f: f.write(text.encode()))

    def _write_metrics(self) -> None:
        text = "".join(dumps_strict(r) + "\n" for r in self.metrics)
        self._replace(METRICS, lambda f: f.write(text.encode()))

    def finish_epoch(self, record: dict[str, Any], state: dict[str, Any]) -> None:
        """Record epoch ``record['epoch']`` (the next one): its metrics line (non-finite values as
        null, listed under "nonfinite"), then the checkpoint ``state`` (``epoch`` added)."""
        epoch = record["epoch"]
        if epoch != self.epoch + 1:
            raise ValueError(f"epoch {epoch} after epoch {self.epoch}")
        self.metrics.append(finite_record(record))
        try:
            self._write_metrics()
        except BaseException:
            self.metrics.pop()
            raise
        self._replace(CHECKPOINT, lambda f: torch.save(dict(state, epoch=epoch), f))
        self.epoch = epoch

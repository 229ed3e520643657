"""The run-directory layer (experiments/rundir.py): the lock, atomic metrics, the policy for what a
directory may hold when a run starts, strict JSON. No MNIST needed: records and states are made up."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hnca_kernels.experiments import rundir
from hnca_kernels.experiments.rundir import CHECKPOINT, CONFIG, METRICS, CommandError, RunDir

from paths import ROOT  # noqa: E402
CONFIG_A = {"experiment": "vae", "lr": 1e-4, "seed": 0, "epochs": 5}
KEYS = ("lr", "seed")


def _start(path, resume=False, config=CONFIG_A, notes=None):
    return RunDir.start(path, "vae", config, KEYS, resume, note=(notes.append if notes is not None else lambda m: None))


def _train(run, upto, value=0.0):
    """Pretend to train epochs run.epoch+1..upto: record i holds loss i + value, state holds i."""
    for epoch in range(run.epoch + 1, upto + 1):
        run.finish_epoch({"epoch": epoch, "loss": epoch + value}, {"model": torch.full((3,), float(epoch))})


def _lines(path):
    return [json.loads(line) for line in (Path(path) / METRICS).read_text().splitlines()]


def _make_run(path, epochs):
    with _start(path) as run:
        run.write_config(CONFIG_A)
        _train(run, epochs)


# ----------------------------------------------------------------------------- lock

@pytest.mark.slow
def test_second_process_on_a_locked_directory_fails_fast(tmp_path):
    """A real second process: `hnca vae` on a directory this process holds fails at once."""
    with _start(tmp_path / "run"):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        began = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "hnca_kernels", "vae", "--out", str(tmp_path / "run"),
                               "--epochs", "1", "--data-dir", str(tmp_path / "no-data")],
                              capture_output=True, text=True, env=env, timeout=120)
        elapsed = time.monotonic() - began
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"hnca vae: {tmp_path / 'run'} is in use by PID {os.getpid()}"
    assert "Traceback" not in proc.stderr
    assert elapsed < 60  # it never reached the data (which does not exist here)


@pytest.mark.slow
def test_lock_is_held_for_the_runs_life_and_released(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hnca_kernels.experiments.rundir import RunDir; "
         f"r = RunDir.start({str(tmp_path / 'run')!r}, 'vae', {{}}, (), False); print('locked', flush=True); "
         "sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CommandError, match=rf"run is in use by PID {holder.pid}$"):
            _start(tmp_path / "run")
    finally:
        holder.communicate("\n", timeout=60)
    with _start(tmp_path / "run") as run:  # released when the holder exits
        assert (run.path / rundir.LOCK).read_text() == f"{os.getpid()}\n"


# ----------------------------------------------------------------------------- atomic metrics

class Killed(BaseException):
    """What a kill -9 leaves: no Python cleanup of the run's state after this point."""


@pytest.mark.parametrize("kill_at", ["metrics fsync", "metrics rename", "checkpoint rename"])
def test_a_kill_inside_the_epoch_write_loses_no_epoch(tmp_path, monkeypatch, kill_at):
    _make_run(tmp_path / "straight", 4)
    _make_run(tmp_path / "run", 2)
    target, step = kill_at.split()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        if step == "fsync" and os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(f".{Path(target).stem}"):
            raise Killed
        return real_fsync(fd)

    def replace(src, dst):
        if step == "rename" and Path(dst).name.startswith(target):
            raise Killed
        return real_replace(src, dst)

    before = (tmp_path / "run" / METRICS).read_bytes()
    monkeypatch.setattr(rundir.os, "fsync", fsync)
    monkeypatch.setattr(rundir.os, "replace", replace)
    with pytest.raises(Killed):
        with _start(tmp_path / "run", resume=True) as run:
            _train(run, 4)
    monkeypatch.undo()
    if target == "metrics":  # the old file is whole, byte for byte
        assert (tmp_path / "run" / METRICS).read_bytes() == before
    else:  # the metrics of epoch 3 are written, its checkpoint is not: resume drops and redoes it
        assert [m["epoch"] for m in _lines(tmp_path / "run")] == [1, 2, 3]
    notes = []
    with _start(tmp_path / "run", resume=True, notes=notes) as run:
        assert run.epoch == 2 and [m["epoch"] for m in run.metrics] == [1, 2]
        _train(run, 4)
    assert _lines(tmp_path / "run") == _lines(tmp_path / "straight")
    assert torch.load(tmp_path / "run" / CHECKPOINT)["epoch"] == 4
    if target == "checkpoint":
        assert any("dropped the metrics of epoch 3" in n for n in notes)
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_stale_temporary_files_are_removed(tmp_path):
    _make_run(tmp_path / "run", 1)
    for name in (".checkpoint-x1.tmp", ".metrics-x2.tmp", ".config-x3.tmp"):
        (tmp_path / "run" / name).write_bytes(b"partial")
    (tmp_path / "run" / "notes.tmp").write_text("not ours")
    notes = []
    with _start(tmp_path / "run", resume=True, notes=notes):
        pass
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [rundir.LOCK, CHECKPOINT, CONFIG, METRICS,
                                                                    "notes.tmp"]
    assert notes == [f"{tmp_path / 'run'}: removed 3 temporary file(s) of a killed run"]


# ----------------------------------------------------------------------------- the start policy

def _state(tmp_path, config=True, metrics=None, checkpoint=None, raw_metrics=None):
    run = tmp_path / "run"
    run.mkdir()
    if config:
        (run / CONFIG).write_text(json.dumps(CONFIG_A))
    if metrics is not None:
        (run / METRICS).write_text("".join(json.dumps({"epoch": e, "loss": float(e)}) + "\n" for e in metrics))
    if raw_metrics is not None:
        (run / METRICS).write_text(raw_metrics)
    if checkpoint is not None:
        torch.save({"epoch": checkpoint, "model": {}}, run / CHECKPOINT)
    return run


# (state, resume) -> the error's message, or (epochs done, metrics kept, notes)
POLICY = [
    ("empty dir, fresh", {"config": False}, False, (0, [], [])),
    ("config only, fresh", {}, False, (0, [], ["stopped before its first checkpoint; starting afresh"])),
    ("epoch 1 without checkpoint, fresh", {"metrics": [1]}, False,
     (0, [], ["stopped before its first checkpoint; starting afresh"])),
    ("config only, resume", {}, True, (0, [], ["no checkpoint yet"])),
    ("epoch 1 without checkpoint, resume", {"metrics": [1]}, True,
     (0, [], ["dropped the metrics of epoch 1", "no checkpoint yet"])),
    ("consistent, resume", {"metrics": [1, 2, 3], "checkpoint": 3}, True, (3, [1, 2, 3], [])),
    ("one epoch past the checkpoint, resume", {"metrics": [1, 2, 3], "checkpoint": 2}, True,
     (2, [1, 2], ["dropped the metrics of epoch 3, written after the last checkpoint (epoch 2)"])),
    ("torn last line, resume", {"raw_metrics": '{"epoch": 1}\n{"epoch": 2}\n{"epo', "checkpoint": 2}, True,
     (2, [1, 2], ["dropped the metrics of a torn last line"])),
    ("nothing, resume", {"config": False}, True, "nothing to resume in {run} (no config.json)"),
    ("history, fresh", {"metrics": [1, 2], "checkpoint": 2}, False,
     "{run} already holds a run (2 epoch(s)); pass --resume to continue it or choose another --out"),
    ("checkpoint only, fresh", {"checkpoint": 2}, False, "{run} already holds a run; pass --resume"),
    ("epochs 1-2 without checkpoint, fresh", {"metrics": [1, 2]}, False, "{run} already holds a run (2 epoch(s))"),
    ("history without config, resume", {"config": False, "metrics": [1], "checkpoint": 1}, True,
     "{run}/config.json is missing, so the run's settings are unknown"),
    ("metrics deleted, resume", {"checkpoint": 3}, True,
     "{run}/metrics.jsonl lacks epoch(s) 1-3 of the 3 in checkpoint.pt: the history is incomplete; cannot resume"),
    ("metrics partial, resume", {"metrics": [1, 3], "checkpoint": 3}, True, "lacks epoch(s) 2 of the 3"),
    ("checkpoint deleted, resume", {"metrics": [1, 2, 3]}, True,
     "{run}/metrics.jsonl records epochs up to 3 but checkpoint.pt is missing; cannot resume"),
    ("checkpoint older, resume", {"metrics": [1, 2, 3, 4], "checkpoint": 2}, True,
     "records epochs up to 4 but checkpoint.pt holds epoch 2"),
    ("interleaved runs, resume", {"metrics": [1, 1, 2, 2], "checkpoint": 2}, True,
     "holds epoch(s) 1-2 more than once (two runs wrote to it?)"),
    ("out of order, resume", {"metrics": [2, 1], "checkpoint": 2}, True, "holds its epochs out of order"),
    ("bad line, resume", {"raw_metrics": '{"epoch": 1}\nnot json\n{"epoch": 2}\n', "checkpoint": 2}, True,
     "{run}/metrics.jsonl line 2 is not valid JSON"),
    ("NaN token, resume", {"raw_metrics": '{"epoch": 1, "loss": NaN}\n', "checkpoint": 1}, True,
     "line 1 is not valid JSON (NaN is not valid JSON)"),
    ("no epoch, resume", {"raw_metrics": '{"loss": 1}\n', "checkpoint": 1}, True,
     "line 1 is not an object with a positive integer 'epoch'"),
]


@pytest.mark.parametrize("kwargs,resume,expected", [c[1:] for c in POLICY], ids=[c[0] for c in POLICY])
def test_start_policy(tmp_path, kwargs, resume, expected):
    run_path = _state(tmp_path, **kwargs)
    notes = []
    if isinstance(expected, str):
        before = {p.name: p.read_bytes() for p in run_path.iterdir()}
        with pytest.raises(CommandError) as info:
            _start(run_path, resume, notes=notes)
        assert expected.format(run=run_path) in str(info.value)
        assert info.value.status == 1 and "\n" not in str(info.value)
        after = {p.name: p.read_bytes() for p in run_path.iterdir() if p.name != rundir.LOCK}
        assert after == before  # an error changes nothing
        return
    epochs, kept, expected_notes = expected
    with _start(run_path, resume, notes=notes) as run:
        assert run.epoch == epochs
        assert [m["epoch"] for m in run.metrics] == kept
        assert (run.checkpoint is None) == (epochs == 0)
    assert len(notes) == len(expected_notes)
    assert all(want in note for want, note in zip(expected_notes, notes))
    if (run_path / METRICS).exists():  # what was dropped is gone from the file too
        assert [m["epoch"] for m in _lines(run_path)] == kept


def test_resume_checks_settings_and_kind(tmp_path):
    _make_run(tmp_path / "run", 1)
    with pytest.raises(CommandError, match=r"different settings than the run in .* \(lr 0.0001 -> 0.001\)"):
        _start(tmp_path / "run", True, config=dict(CONFIG_A, lr=1e-3))
    with pytest.raises(CommandError, match="holds a vae run, not a bandit run"):
        RunDir.start(tmp_path / "run", "bandit", CONFIG_A, KEYS, True)
    # a key an older config lacks takes its default
    with RunDir.start(tmp_path / "run", "vae", dict(CONFIG_A, dataset="mnist"), (*KEYS, "dataset"), True,
                      defaults={"dataset": "mnist"}, note=lambda m: None) as run:
        assert run.epoch == 1
    with pytest.raises(CommandError, match=r"\(dataset 'mnist' -> 'kmnist'\)"):
        RunDir.start(tmp_path / "run", "vae", dict(CONFIG_A, dataset="kmnist"), (*KEYS, "dataset"), True,
                     defaults={"dataset": "mnist"})


def test_unreadable_checkpoint_and_config(tmp_path):
    _make_run(tmp_path / "run", 2)
    ckpt = tmp_path / "run" / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    with pytest.raises(CommandError, match=r"^cannot read the checkpoint .*checkpoint.pt \(.*\)$"):
        _start(tmp_path / "run", True)
    torch.save([1, 2], ckpt)
    with pytest.raises(CommandError, match="is not a checkpoint of an hnca run"):
        _start(tmp_path / "run", True)
    (tmp_path / "run" / CONFIG).write_text("[1, 2]")
    with pytest.raises(CommandError, match="config.json is not a JSON object"):
        _start(tmp_path / "run", True)


def test_failed_start_in_a_new_directory_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with _start(tmp_path / "a" / "run"):
            raise RuntimeError("data missing")
    assert not (tmp_path / "a" / "run").exists()
    with _start(tmp_path / "b") as run:  # once something is written, it stays
        run.write_config(CONFIG_A)
    assert (tmp_path / "b" / CONFIG).exists()


# ----------------------------------------------------------------------------- strict JSON

def test_nonfinite_values_become_null_with_a_flag(tmp_path):
    with _start(tmp_path / "run") as run:
        run.finish_epoch({"epoch": 1, "a": math.nan, "b": 1.5, "c": -math.inf, "d": None}, {"model": {}})
    line = (tmp_path / "run" / METRICS).read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert rundir.loads_strict(line) == {"epoch": 1, "a": None, "b": 1.5, "c": None, "d": None, "nonfinite": ["a", "c"]}


def test_ranges():
    assert rundir.ranges([8, 1, 2, 3, 5, 7]) == "1-3, 5, 7-8"
    assert rundir.ranges([4]) == "4" and rundir.ranges([]) == ""


def test_an_interrupt_inside_a_write_is_an_interrupt_and_leaves_the_old_file(tmp_path):
    """Ctrl-C inside torch.save surfaces as the zip writer's own error on closing; atomic_write
    raises the KeyboardInterrupt (the CLI's exit 130) and leaves the old file."""
    path = tmp_path / "state.pt"
    path.write_bytes(b"old")

    def interrupted(f):
        try:
            f.write(b"partial")
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("unexpected pos")  # noqa: B012 (what the writer's cleanup does)

    with pytest.raises(KeyboardInterrupt):
        rundir.atomic_write(path, interrupted)
    with pytest.raises(RuntimeError, match="disk"):  # other errors stay themselves
        rundir.atomic_write(path, lambda f: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]

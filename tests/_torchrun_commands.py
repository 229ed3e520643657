"""Several ``hnca`` commands in one torchrun launch, some with test-only patches (tests/test_torchrun.py).

    torchrun --standalone --nproc-per-node 2 tests/_torchrun_commands.py SPEC.json

SPEC.json lists {"argv": [...], "patch": [names], "rank": r, "call": c}; every rank runs every command
in order through ``hnca_kernels.cli.main`` in one process group (a process group cannot be created
twice under one torchrun launch, so this script creates it and the commands join it), and writes
``SPEC.rank<r>.json``: per command the exit status and the stderr lines. Starting a launch costs
seconds on a loaded machine; one launch serves many commands.

Patches (also used in-process by the one-process runs they are compared with):
- ``fixed-uniforms``: ``torch.rand_like`` returns fixed uniforms (unit j of a row: frac((j + 1) x
  golden ratio)), so every sample is a function of its logits, whichever rank draws it (the layers
  then draw by their torch expressions, which call it, not by the cpp backend's sampling ops);
- ``nan-loss``: on rank ``rank``, the loss of the VAE's estimate at call ``call`` becomes NaN while
  the gradients stay finite (only that rank can see it);
- ``device-loop``: the GPU's training loop (``common.DeviceEpoch``, steps that never wait for the
  device) on the CPU, where its steps run eagerly: the same code as on GPUs but the graphs.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import torch

_PHI = 0.6180339887498949


def fixed_rand_like(t: torch.Tensor, *, dtype=None, **kwargs) -> torch.Tensor:
    n = t.shape[-1] if t.dim() else 1
    u = (torch.arange(1, n + 1, dtype=torch.float64) * _PHI) % 1.0
    return u.to(dtype=dtype or t.dtype, device=t.device).expand(t.shape).clone()


@contextlib.contextmanager
def patched(names, rank: int = 0, target_rank: int = 0, call: int = 0):
    """The patches ``names`` (a name, a list of names or None) applied inside the block."""
    names = [names] if isinstance(names, str) else list(names or ())
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(_patched(name, rank, target_rank, call))
        yield


@contextlib.contextmanager
def _patched(name: str, rank: int, target_rank: int, call: int):
    if name == "device-loop":
        from hnca_kernels.experiments import common

        real = common.device_loop
        common.device_loop = lambda args, device: args.on_nonfinite == "stop"
        try:
            yield
        finally:
            common.device_loop = real
        return
    if name == "fixed-uniforms":
        from hnca_kernels import backends

        real, real_draws = torch.rand_like, backends.draws_in_cpp
        torch.rand_like, backends.draws_in_cpp = fixed_rand_like, lambda logits: False
        try:
            yield
        finally:
            torch.rand_like, backends.draws_in_cpp = real, real_draws
        return
    if name == "nan-loss":
        from hnca_kernels.models.vae import BernoulliVAE

        real, count = BernoulliVAE.estimate, [0]

        def estimate(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            count[0] += 1
            if rank == target_rank and count[0] == call:
                out.loss = out.loss + float("nan")  # the value only: d(loss + c) = d loss
            return out

        BernoulliVAE.estimate = estimate
        try:
            yield
        finally:
            BernoulliVAE.estimate = real
        return
    raise ValueError(f"unknown patch {name!r}")


def main(spec_path: str) -> int:
    import torch.distributed as dist

    from hnca_kernels.cli import main as hnca

    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = []
    try:
        for i, command in enumerate(spec):
            # to the launch's own stderr, so that a rank that dies names the command it was in
            print(f"rank {rank}: command {i + 1} of {len(spec)}", file=sys.__stderr__, flush=True)
            err = io.StringIO()
            with patched(command.get("patch"), rank, command.get("rank", 0), command.get("call", 0)), \
                    contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                status = hnca(command["argv"])
            results.append({"status": status, "stderr": [line for line in err.getvalue().splitlines()
                                                         if line.startswith("hnca ")]})
    finally:
        Path(f"{spec_path}.rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from _gloo import gloo_threads

    status = main(sys.argv[1])
    # the commands' DDP and models are freed with them, and the group with them
    left = gloo_threads()
    if left:
        print(f"_torchrun_commands: the process group outlived the commands ({len(left)} gloo threads)", file=sys.stderr)
        status = status or 3
    sys.exit(status)

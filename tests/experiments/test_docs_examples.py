"""The documentation's examples run as printed: every Python block of the README and of the guides
that teach with code, in order (a file's blocks share one namespace), on MNIST from HNCA_DATA_DIR;
the distributed example under torchrun on 2 gloo processes."""

import os
import re
import subprocess
import sys

import pytest

from paths import HAVE_MNIST, ROOT, SHARED

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_MNIST, reason=f"MNIST not found in {SHARED}")]

RUN_IN_PROCESS = ["README.md", "docs/vaes.md", "docs/backends.md"]


def blocks(path):
    return re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(), re.S)


@pytest.mark.parametrize("path", RUN_IN_PROCESS)
def test_examples_run(path, monkeypatch):
    monkeypatch.setenv("HNCA_DATA_DIR", str(SHARED))
    namespace = {"__name__": f"example:{path}"}
    found = blocks(path)
    assert found, f"{path} has no Python example"
    for k, code in enumerate(found):
        exec(compile(code, f"{path}[{k}]", "exec"), namespace)


def test_the_distributed_example_runs_on_two_cpu_processes(tmp_path):
    (script,) = blocks("docs/distributed.md")
    # the group is released before the interpreter exits (see the page's "Exit")
    probe = (f"\nimport sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom _gloo import gloo_threads\n"
             "left = gloo_threads()\nassert not left, f'gloo threads left after main(): {left}'\n")
    (tmp_path / "train_ddp.py").write_text(script + probe)
    env = {**os.environ, "HNCA_DATA_DIR": str(SHARED), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(tmp_path / "train_ddp.py")], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "epoch 1: reward of the last batch" in run.stdout

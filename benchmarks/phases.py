"""What the benchmark grid times: one training step of each method, split into its phases.

    forward    the sampled forward with autograd on, as in training (HNCA / REINFORCE: the net
               called inside ``hnca_kernels.record()``; backprop: the net and its loss)
    backward   from the forward's outputs to filled ``.grad`` (HNCA / REINFORCE:
               ``rec.surrogate_loss(...)`` then ``loss.backward()``; backprop: ``loss.backward()``)
    optimizer  Adam's step
    step       the three in a row with ``zero_grad``, as a training loop runs them

and HNCA's backward in its parts: ``message_pass`` (``rec.log_ratios``, every message of the
record), ``surrogate`` (``rec.surrogate_loss``: the messages, the credits and the scores) and
``autograd`` (``loss.backward()`` of that surrogate). The VAE's estimators split the same way
(``vae_*`` below). Each timed phase takes the state the phases before it left; the benchmarks
build that state untimed in ``benchmark.pedantic``'s setup, and tests/experiments/test_bench_phases.py checks
that the phases in a row fill the same ``.grad`` as a plain training step.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from hnca_kernels import BernoulliLinear, CategoricalLinear, MovingAverageBaseline, StochasticSequential
from hnca_kernels import record, use_backend

# name: (batch, widths); the hidden units are +-1, the output a softmax over the last width
SHAPES = {
    "paper": (50, [784, 200, 200, 200, 10]),
    "scale": (256, [784, 1024, 1024, 1024, 10]),
    "gpu": (4096, [4096, 4096, 4096, 4096, 10]),
}
BACKENDS = ("reference", "cpp", "triton", "cuda")


def machine() -> str:
    """The GPU's name where there is one, else the CPU's model and its number of cores."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


class OneLineParser(argparse.ArgumentParser):
    """argparse for the benchmark scripts, but a usage error is one line on stderr (exit 2)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} -h)", file=sys.stderr)
        raise SystemExit(2)


def load_trained(model: nn.Module, path) -> nn.Module:
    """``model`` with the weights of an ``hnca`` run's checkpoint, or a CommandError naming the
    problem (an unreadable file, not a checkpoint, or one of another model)."""
    from hnca_kernels.experiments.rundir import CommandError, load_checkpoint

    state = load_checkpoint(path)["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise CommandError(f"{path} is not a checkpoint of this benchmark's {type(model).__name__}") from None
    return model


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hnca_net(widths, device="cpu", dtype=None):
    hidden = [BernoulliLinear(a, b, centered=True, device=device, dtype=dtype)
              for a, b in zip(widths[:-2], widths[1:-1])]
    return StochasticSequential(*hidden, CategoricalLinear(widths[-2], widths[-1], device=device, dtype=dtype))


def backprop_net(widths, device="cpu", dtype=None):
    """The same-shaped deterministic network: sigmoid MLP (trained with cross-entropy)."""
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b, device=device, dtype=dtype), nn.Sigmoid()]
    return nn.Sequential(*layers[:-1])


def batch(B, widths, device="cpu", dtype=torch.float32, seed=0):
    """A fixed batch: binary images x [B, in] (30% on) and labels [B]."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, widths[0], generator=g) < 0.3).to(dtype).to(device)
    label = torch.randint(0, widths[-1], (B,), generator=g).to(device)
    return x, label


class Stochastic:
    """HNCA (``estimator="hnca"``, messages on ``backend``) or REINFORCE on the stochastic net.

    ``backend`` is the messages' (None: the automatic choice, as a user gets it); the forward runs
    under ``use_backend(backend)`` too, so on the CPU the cpp backend's ops draw the samples
    (``reference``: the torch expression; the same samples either way).
    """

    def __init__(self, net, estimator="hnca", backend=None, lr=1e-4):
        self.net, self.estimator, self.backend = net, estimator, backend
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)
        self.baseline = MovingAverageBaseline(0.99).to(next(net.parameters()).device)

    def forward(self, x, label):
        """Timed: the recorded forward. Returns its record and the action."""
        with use_backend(self.backend), record() as rec:
            action = self.net(x)
        return rec, action

    def prepare(self, x, label):
        """Untimed: a fresh forward, its reward and baseline, and cleared grads: backward's input."""
        rec, action = self.forward(x, label)
        reward = (action == label).to(x.dtype)   # the environment: a black box to the estimator
        baseline = self.baseline(reward)        # earlier batches only
        self.zero_grad()
        return rec, reward, baseline

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def surrogate(self, rec, reward, baseline):
        return rec.surrogate_loss(reward, estimator=self.estimator, baseline=baseline, backend=self.backend)

    def message_pass(self, rec):
        return rec.log_ratios(self.backend)

    def backward(self, rec, reward, baseline):
        self.surrogate(rec, reward, baseline).backward()

    def optimizer(self):
        self.opt.step()

    def step(self, x, label):
        self.backward(*self.prepare(x, label))
        self.optimizer()


class Backprop:
    """Backprop of the same-shaped deterministic network (cross-entropy, Adam)."""

    def __init__(self, net, lr=1e-4):
        self.net = net
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)

    def forward(self, x, label):
        """Timed: the forward up to the loss (the loss is backprop's end of the forward)."""
        return F.cross_entropy(self.net(x), label)

    def prepare(self, x, label):
        loss = self.forward(x, label)
        self.zero_grad()
        return (loss,)

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def backward(self, loss):
        loss.backward()

    def optimizer(self):
        self.opt.step()

    def step(self, x, label):
        self.backward(*self.prepare(x, label))
        self.optimizer()


def method(name, widths, device="cpu", dtype=None, seed=0):
    """A method by its benchmark name: ``hnca-<backend>``, ``reinforce`` or ``backprop``, on a
    fresh net of ``widths`` (weights from ``seed``)."""
    torch.manual_seed(seed)
    if name == "backprop":
        return Backprop(backprop_net(widths, device, dtype))
    if name == "reinforce":
        return Stochastic(hnca_net(widths, device, dtype), "reinforce")
    estimator, _, backend = name.partition("-")
    if estimator != "hnca" or backend not in BACKENDS:
        raise ValueError(f"unknown method {name!r}: hnca-<backend>, reinforce or backprop")
    return Stochastic(hnca_net(widths, device, dtype), "hnca", backend)


def phase_call(m, phase, x, label, device="cpu"):
    """(setup, fn) that time ``phase`` of method ``m`` (``Stochastic`` or ``Backprop``): ``setup``
    (None for ``forward`` and ``step``) builds fn's arguments untimed, a fresh forward with its
    reward, baseline and cleared grads; ``fn(*args)`` runs the phase and waits for the device."""

    def prepared(then=None):
        def setup():
            state = m.prepare(x, label)
            if then is not None:
                state = then(state)
            sync(device)
            return tuple(state)
        return setup

    def backward(state):
        m.backward(*state)
        return ()

    setup = prepared()
    if phase == "forward":
        setup, run = None, lambda: m.forward(x, label)
    elif phase == "backward":
        run = m.backward
    elif phase == "message_pass":
        run = lambda rec, reward, baseline: m.message_pass(rec)  # noqa: E731
    elif phase == "surrogate":
        run = m.surrogate
    elif phase == "autograd":
        setup, run = prepared(lambda state: (m.surrogate(*state),)), lambda loss: loss.backward()
    elif phase == "optimizer":
        setup, run = prepared(backward), m.optimizer
    elif phase == "step":  # forward, reward and baseline, zero_grad, backward, Adam
        setup, run = None, lambda: m.step(x, label)
    else:
        raise ValueError(f"unknown phase {phase!r}")

    def fn(*args):
        run(*args)
        sync(device)

    return setup, fn


# ------------------------------------------------------------------------ the discrete VAE
# forward: sampling the latents and the pass through encoder, decoder and prior with autograd;
# backward: the estimator's signals (for LOO and DisARM their partial forward passes), the
# surrogate and autograd; ``vae_estimate`` is the backward without autograd.

def vae_prepare(vae, x):
    """Untimed: a fresh forward and cleared grads."""
    p = vae.forward_pass(x)
    vae.zero_grad(set_to_none=True)
    return p


def vae_estimate(vae, x, estimator, p):
    return vae.estimate(x, estimator, forward=p).loss


def vae_backward(vae, x, estimator, p):
    vae_estimate(vae, x, estimator, p).backward()

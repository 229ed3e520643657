"""A whole training step captured in a CUDA graph and replayed: small shapes stop being host-bound.

At the paper's shapes an HNCA step is a few hundred small kernels; launched one by one from
Python the GPU waits on the host. A CUDA graph launches them all at once. What the step must do
to be captured (each checked by ``tests/test_graphs.py`` on the CPU, and on a GPU by the GPU run):

- fixed shapes and dtypes (a call with other shapes runs eagerly, e.g. an epoch's last batch);
- no host synchronisation: no ``.item()``, ``print(tensor)`` or Python branch on a tensor's value;
  value checks run on the device (``hnca_kernels.checks``), metrics stay device tensors;
- an optimizer created with ``capturable=True`` (Adam's step count lives on the device);
- randomness from torch's generators (``torch.rand`` and the Triton kernels' seeds are drawn on
  the device, so each replay draws new samples and ``torch.manual_seed`` still reproduces a run).

>>> opt = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=True)
>>> def step(x):
...     loss = model.estimate(x, "hnca").loss
...     opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
...     return loss.detach()
>>> step = hnca_kernels.CapturedStep(step)
>>> for x in batches: loss = step(x)          # eager for 3 warm-up calls, then graph replays
"""

from __future__ import annotations

import torch


class CapturedStep:
    """Call ``step(*inputs)`` eagerly ``warmup`` times, then capture it in a CUDA graph and replay.

    Every call is one step. Inputs are copied into the graph's static buffers; the returned
    tensors are the graph's static outputs, overwritten by the next call (clone what you keep).
    On CPU tensors, or with inputs of other shapes than at capture, the step runs eagerly.

    Args:
        step: a function of tensors returning a tensor or a tuple/list/dict of tensors.
        warmup: eager calls before the capture (CUDA graphs need the allocator and autotuning
            warmed up; they run on a side stream, as torch.cuda.graph requires).
        enabled: False runs every call eagerly (the same results, for comparison).
    """

    def __init__(self, step, warmup: int = 3, enabled: bool = True):
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be a positive int, got {warmup!r}")
        self.step, self.warmup, self.enabled = step, warmup, bool(enabled)
        self.graph = None
        self._calls = 0
        self._inputs = self._outputs = None
        self._signature = None

    @staticmethod
    def _signature_of(inputs):
        return tuple((t.shape, t.dtype, t.device) for t in inputs)

    def __call__(self, *inputs: torch.Tensor):
        if not self.enabled or not inputs or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs):
            return self.step(*inputs)
        signature = self._signature_of(inputs)
        if self.graph is not None:
            if signature != self._signature:
                return self.step(*inputs)
            for static, new in zip(self._inputs, inputs):
                static.copy_(new)
            self.graph.replay()
            return self._outputs
        if self._calls < self.warmup:
            self._calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        self._capture(inputs, signature)
        self.graph.replay()  # capturing records the step without running it
        return self._outputs

    def _capture(self, inputs, signature) -> None:
        self._inputs = [t.clone() for t in inputs]
        self._signature = signature
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._outputs = self.step(*self._inputs)
        self.graph = graph

from __future__ import annotations

import torch
import torch.nn as nn


class MovingAverageBaseline(nn.Module):
    """Exponential moving average of the mean learning signal of earlier batches.

    Calling it returns the baseline from the batches seen so far and then folds in the
    current one, so the value subtracted never depends on the current batch and every
    estimator stays unbiased. Its state is a buffer: it follows ``.to(device)`` and is saved
    in ``state_dict``.

    >>> baseline = MovingAverageBaseline(0.99)
    >>> loss = model.surrogate_loss(reward, baseline=baseline(reward))
    """

    def __init__(self, decay: float = 0.99, initial: float = 0.0):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("value", torch.tensor(float(initial), dtype=torch.float64))

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        current = self.value.clone()
        self.update(signal)
        return current

    @torch.no_grad()
    def update(self, signal: torch.Tensor) -> None:
        mean = signal.detach().to(self.value).mean()
        self.value.mul_(self.decay).add_((1.0 - self.decay) * mean)

    def extra_repr(self) -> str:
        return f"decay={self.decay}"

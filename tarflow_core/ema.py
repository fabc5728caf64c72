"""Exponential moving average of model weights, updated on the device without host syncs."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy of a model's state dict (float parameters averaged, buffers copied).

    The decay warms up over the first updates, so the random initial weights do not dominate the
    average: by default as min(decay, (1 + n) / (10 + n)) at update n (earlier versions' ramp, which
    reaches 0.999 only after ~9,000 updates); with `warmup` N, the averaging window 1 / (1 - d) grows
    linearly from 1 at update 0 to its full length W = 1 / (1 - decay) at update N, so the decay
    reaches its value when asked. `state_dict()` has the model's keys, so it loads into the model
    (and is saved as `ema.safetensors`).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: int | None = None):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmup is not None and warmup < 1:
            raise ValueError(f"EMA warm-up must be a positive number of updates, got {warmup}")
        self.decay = float(decay)
        self.warmup = warmup
        self.updates = 0
        self._names = [n for n, p in model.named_parameters() if p.dtype.is_floating_point]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().clone().float() for n in self._names}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self._shadows = [self.shadow[n] for n in self._names]
        self._bind(model)

    def _bind(self, model: nn.Module) -> None:
        """Cache the model's averaged parameters and (shadow, buffer) pairs for `update`."""
        params = dict(model.named_parameters())
        self._model = model
        self._params = [params[n] for n in self._names]
        self._buffer_pairs = [(self.buffers[n], b) for n, b in model.named_buffers()]

    def current_decay(self) -> float:
        """The decay of the next update (update `self.updates`, counted from 0)."""
        n = self.updates
        if self.warmup is None:
            return min(self.decay, (1 + n) / (10 + n))
        if n >= self.warmup:  # exactly the decay from update N on, whatever the rounding below
            return self.decay
        window = 1 + n * (1 / (1 - self.decay) - 1) / self.warmup
        return min(self.decay, 1 - 1 / window)

    @torch.no_grad()
    def update(self, model: nn.Module, gate: torch.Tensor | None = None) -> None:
        """shadow += (1 - d) * (param - shadow); `gate` (0-dim 0/1 tensor) makes it a no-op when 0."""
        if model is not self._model:
            self._bind(model)
        shadows = self._shadows
        current = [p.detach().float() for p in self._params]
        w = 1.0 - self.current_decay()
        diff = torch._foreach_sub(current, shadows)
        if gate is None:
            torch._foreach_mul_(diff, w)
        else:
            torch._foreach_mul_(diff, gate.to(torch.float32) * w)
        torch._foreach_add_(shadows, diff)
        for mine, b in self._buffer_pairs:
            mine.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, **self.buffers}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for n in self._names:
            self.shadow[n].copy_(state[n])
        for n in self.buffers:
            if n in state:
                self.buffers[n].copy_(state[n])
        self.updates = int(updates)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (same architecture)."""
        model.load_state_dict(self.state_dict(), strict=True)

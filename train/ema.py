"""Exponential moving average of the trained weights (float32 shadow copies).

    ema = EMA(params, decay=0.9999)
    ... optimizer_step(..., ema=ema) ...          # ema.update(params) after each step
    with ema.applied(params):                      # the EMA weights, for sampling or export
        save(...)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class EMA:
    """shadow <- decay_t * shadow + (1 - decay_t) * param after every optimizer step, with the
    usual warmup decay_t = min(decay, (1 + n) / (10 + n)) so early, far-from-converged weights fade
    quickly (n = number of updates so far)."""

    def __init__(self, params: list[nn.Parameter], decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().float().clone() for p in params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, params: list[nn.Parameter]) -> None:
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in params], weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, params: list[nn.Parameter]) -> None:
        for shadow, p in zip(self.shadow, params, strict=True):
            p.copy_(shadow)

    @contextlib.contextmanager
    def applied(self, params: list[nn.Parameter]) -> Iterator[None]:
        """Temporarily load the EMA weights into `params`; the trained weights come back after."""
        backup = [p.detach().clone() for p in params]
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, p in zip(backup, params):
                    p.copy_(saved)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(state['shadow'])} tensors, the model has "
                             f"{len(self.shadow)} trainable parameters")
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        for shadow, saved in zip(self.shadow, state["shadow"]):
            shadow.copy_(saved)

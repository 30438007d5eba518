"""Optimizer, learning-rate schedule and the one optimizer step a training loop calls.

The schedule is a pure function of the optimizer-step count (`lr_multiplier`), and each param
group keeps its own `base_lr`, so resuming needs no scheduler state: the lr of step s is always
`base_lr * lr_multiplier(s, ...)`.

    groups = [param_group("unet", unet.parameters(), lr=5e-6),
              param_group("text_encoder", text_encoder.parameters(), lr=2e-6)]
    optimizer = build_adamw(groups, weight_decay=1e-2)
    scaler = make_grad_scaler("fp16", device)
    for step in range(start, total):
        ...backward...
        grad_norm = optimizer_step(optimizer, scaler, params, max_grad_norm=1.0, ema=ema,
                                   lr_scale=lr_multiplier(step, warmup, total, "constant"))
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from train.ema import EMA

LR_SCHEDULES = ("constant", "cosine")


def param_group(name: str, params: Iterable[nn.Parameter], lr: float, **options) -> dict:
    """One AdamW param group: trainable params only, its own base lr (the schedule scales it)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(f"param group {name!r} has no trainable parameters")
    return {"name": name, "params": params, "lr": lr, "base_lr": lr, **options}


def build_adamw(groups: list[dict], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 1e-2) -> torch.optim.AdamW:
    """AdamW over `groups` (see `param_group`): the fused kernel where every parameter's device
    supports it, else the multi-tensor (foreach) one. Both give the same update maths."""
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cuda", "cpu"}
    try:
        return torch.optim.AdamW(groups, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
    except (RuntimeError, TypeError):
        # Older torch builds have no fused kernel for some devices or dtypes.
        return torch.optim.AdamW(groups, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str = "constant") -> float:
    """Learning-rate factor for optimizer step `step` (0-based): linear warmup from 1/warmup to 1
    over `warmup_steps`, then constant or a cosine decay to 0 at `total_steps`."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   params: list[nn.Parameter], max_grad_norm: float | None = None,
                   ema: EMA | None = None, lr_scale: float = 1.0) -> torch.Tensor:
    """Finish one optimizer step after the micro-batches' backward passes.

    Sets each group's lr to base_lr * lr_scale, unscales the gradients (fp16), clips their global
    norm to `max_grad_norm` (None or <= 0: measure only), steps (the scaler skips the step when an
    fp16 gradient overflowed), updates the scale, zeroes the gradients and updates the EMA.
    Returns the pre-clip global gradient norm as a 0-dim tensor (no device sync is forced here).
    """
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_scale
    scaler.unscale_(optimizer)
    max_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(params)
    return grad_norm

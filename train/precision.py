"""Mixed precision: autocast for the forward pass, a GradScaler for fp16, frozen parts cast down.

Trainable weights always stay float32 (AdamW updates of 5e-6 * lr vanish in half precision);
autocast runs their matmuls and convolutions in bf16/fp16. Frozen networks (VAE, a frozen text
encoder) hold no optimizer state and are simply stored in the low dtype.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from sample.runtime import auto_low_precision

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return DTYPES[precision]


def resolve_precision(precision: str, device: torch.device, cpu_bf16: bool | None = None,
                      announce: str = "") -> str:
    """"auto" -> "bf16" on a CUDA device that supports it or a CPU that computes bf16 natively (AMX /
    AVX-512 BF16), else "fp32"; other names are checked and returned as they are. `cpu_bf16`
    injects the CPU's answer (None: detect it, see sample.runtime.cpu_bf16_supported); `announce`
    (the script's name) prints what "auto" chose and why."""
    if precision == "auto":
        low, why = auto_low_precision(device, cpu_bf16)
        chosen = "bf16" if low else "fp32"
        if announce:
            print(f"{announce}: precision auto -> {chosen} ({why})")
        return chosen
    precision_dtype(precision)
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward-pass context: torch.autocast in bf16/fp16, a no-op for fp32."""
    dtype = precision_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler that is active only for fp16 (bf16 has float32's exponent range); disabled,
    its scale/unscale_/step/update calls pass straight through, so loops need no branches."""
    precision_dtype(precision)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def cast_frozen(module: nn.Module, precision: str) -> nn.Module:
    """Freeze `module` (requires_grad off, eval mode) and store it in the run's low dtype."""
    module.requires_grad_(False).eval()
    return module.to(dtype=precision_dtype(precision))


def frozen_copy(module: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A frozen (requires_grad off, eval) `module` in `dtype` on `device`. When a cast is needed
    the module is copied first, so the float32 original stays exact (it is what gets exported);
    otherwise it is frozen and moved in place."""
    if dtype != torch.float32:
        module = copy.deepcopy(module)
    return module.requires_grad_(False).eval().to(device=device, dtype=dtype)

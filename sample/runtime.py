"""Small helpers the sampling scripts share: device and dtype flags, image tensors to uint8."""
from __future__ import annotations

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 on a CUDA device that supports it, else fp32; otherwise DTYPES[name]."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16" (the flag value)."""
    return {v: k for k, v in DTYPES.items()}[dtype]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> uint8 (H, W, 3) numpy."""
    return (image.float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def batch_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] on any device -> uint8 (B, H, W, 3) on the same device, rounded exactly
    as `to_uint8` (so the conversion can run on the GPU before the copy to the host)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (B, 3, H, W) -> (B, H, W, 3)

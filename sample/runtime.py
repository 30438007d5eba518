"""Small helpers the sampling scripts share: device and dtype flags, image tensors to uint8."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from defectsynth.device import resolve_device as _resolve_device

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; otherwise the named device (defectsynth/device.py)."""
    return _resolve_device(name)


# CPU features that run bf16 matrix maths natively: AVX-512 BF16 (vdpbf16ps; Intel Cooper Lake and
# later, AMD Zen 4 and later) and AMX (Intel Sapphire Rapids and later). Without them oneDNN emulates
# bf16 in float32 and is slower than plain float32.
CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16")
CPU_BF16_ENV = "DEFECTSYNTH_CPU_BF16"  # "0" / "1" overrides the detection (tests, odd virtual machines)


def cpu_bf16_features() -> list[str]:
    """The bf16 features of this CPU (names as in CPU_BF16_FEATURES), from PyTorch's cpuinfo
    query, else from the flags of /proc/cpuinfo (Linux)."""
    try:
        capability = torch._C._cpu._get_cpu_capability()  # dict of feature -> bool (PyTorch >= 2.3)
        return [name for name in CPU_BF16_FEATURES if capability.get(name)]
    except (AttributeError, RuntimeError):
        pass
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
        return [name for name in CPU_BF16_FEATURES if name in flags]
    except OSError:
        return []


def cpu_bf16_supported() -> bool:
    """True when this CPU computes bf16 natively (AMX or AVX-512 BF16); $DEFECTSYNTH_CPU_BF16=0/1
    overrides the detection."""
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    return bool(cpu_bf16_features())


def auto_low_precision(device: torch.device, cpu_bf16: bool | None = None) -> tuple[bool, str]:
    """What "auto" precision picks on `device`: (bf16?, why). CUDA: bf16 where the GPU supports it;
    CPU: bf16 where the CPU computes it natively (`cpu_bf16` injects the answer, None detects it)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "CUDA device with bf16" if ok else "CUDA device without bf16"
    if device.type == "cpu":
        ok = cpu_bf16_supported() if cpu_bf16 is None else cpu_bf16
        return ok, "CPU with native bf16 (AMX / AVX-512 BF16)" if ok else "CPU without native bf16"
    return False, f"{device.type} device"


def resolve_dtype(name: str, device: torch.device, cpu_bf16: bool | None = None, announce: str = "") -> torch.dtype:
    """"auto" -> bf16 on a CUDA device or a CPU that computes bf16 natively, else fp32
    (`cpu_bf16`: see auto_low_precision); otherwise DTYPES[name]. `announce` (the script's name)
    prints what "auto" chose and why."""
    if name == "auto":
        low, why = auto_low_precision(device, cpu_bf16)
        if announce:
            print(f"{announce}: dtype auto -> {'bf16' if low else 'fp32'} ({why})")
        return torch.bfloat16 if low else torch.float32
    return DTYPES[name]


def compile_module(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """With `enabled`, torch.compile `module`'s forward in place (nn.Module.compile: the parameters
    and state_dict keys stay the module's own, so saving and EMA are unchanged); the first calls pay
    the compilation (measured on a 2-core CPU: ~60 s CPU for the tiny UNet, see docs/evaluation.md)."""
    if enabled:
        module.compile()
    return module


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

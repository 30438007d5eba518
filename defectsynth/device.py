"""`--device`: one resolver for every stage.

    "auto"   -> "cuda" (device `local_rank` under torchrun) when CUDA is available, else "cpu"
    "cuda"   -> "cuda:<local_rank>"
    anything torch.device accepts ("cpu", "cuda:1", "mps") -> itself

A name torch does not know, or a CUDA device on a machine without CUDA, is an expected mistake:
one line naming the flag, what was given and what to use.
"""
from __future__ import annotations

import torch

from defectsynth.errors import UserError

DEVICE_HELP = "auto (cuda if available, else cpu), cpu, cuda, cuda:N"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch.device a `--device` value means on this machine (see the module docstring)."""
    text = (name or "auto").strip()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"--device {name!r}: not a device torch knows ({err}); use {DEVICE_HELP}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name!r}: this machine has no CUDA device (or torch was built without "
                            f"CUDA); use --device auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device

"""What the values of a checkpoint must satisfy before they are loaded: floating tensors where our
modules hold floats (checked on meta tensors, before anything is read), and no NaN / inf (checked
one tensor at a time, in chunks, as cheaply as one sum). weights/load.py calls these while
planning a load; `inspect` and `convert` report or refuse through them.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from weights.files import CheckpointError, TensorFile
from weights.keymap import Rule


def dtype_problems(rules: list[Rule], file: TensorFile, ours: Mapping[str, torch.Tensor]) -> list[str]:
    """Integer or bool tensors where our module holds floats (a damaged or foreign file): refused
    on meta tensors, before anything is read, instead of failing later inside a forward pass."""
    problems = []
    for rule in rules:
        if not any(ours[k].is_floating_point() for k in rule.ours):
            continue
        for key in rule.theirs:
            if key in file and not file.dtype(key).is_floating_point:
                problems.append(f"file key {key} has dtype {str(file.dtype(key)).replace('torch.', '')}, "
                                f"expected a floating-point dtype")
    return problems


NONFINITE_CHUNK = 1 << 22  # elements per finiteness check: a 4 MB bool mask at most, never a full copy


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many NaN / inf values a floating tensor holds, checked in chunks of a flat view."""
    if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() == 0:
        return 0
    flat = tensor.reshape(-1)  # a view for the contiguous tensors files hold
    bad = 0
    for start in range(0, flat.numel(), NONFINITE_CHUNK):
        chunk = flat[start:start + NONFINITE_CHUNK]
        # Fast path (~10x cheaper than isfinite, no temporary): a sum is finite only if every value
        # is (NaN and inf propagate); a finite chunk whose sum overflows takes the exact count.
        total = chunk.sum() if chunk.dtype in (torch.float32, torch.float64) else chunk.sum(dtype=torch.float32)
        if bool(torch.isfinite(total)):
            continue
        bad += int(chunk.numel() - torch.isfinite(chunk).sum())
    return bad


def non_finite_error(path: str, key: str, bad: int, numel: int) -> CheckpointError:
    return CheckpointError(f"{path}: tensor {key!r} holds {bad} NaN/inf value(s) of {numel}: the weights are "
                           f"damaged (or saved from a diverged run); use another copy or an earlier checkpoint")


def scan_non_finite(plans: Mapping[str, Any]) -> list[str]:
    """'file key: N of M NaN/inf' for every floating tensor the plans would load (each read once,
    one at a time; the meta tensors of a manifest are skipped)."""
    found = []
    for plan in plans.values():
        file = plan.part.file
        for key in (k for rule in plan.rules for k in rule.theirs):
            if key not in file or not file.dtype(key).is_floating_point:
                continue
            tensor = file.get(key)
            bad = count_non_finite(tensor)
            if bad:
                found.append(f"{key}: {bad} of {tensor.numel()} values are NaN/inf")
    return found

"""Which of the 1000 training timesteps a sampler visits: the spacings of the reference code.

Every function returns a descending list of ints in [0, num_train_timesteps), the order a sampler
walks them. The three sampler files take such a list, so any spacing works with any sampler; the
defaults below are the ones each reference pairs with its sampler for SD.

| function                | spacing                                         | reference                    |
|-------------------------|-------------------------------------------------|------------------------------|
| ddim_timesteps(S)       | "leading", offset 1: k * (T // S) + 1           | LDM "uniform" DDIM; diffusers DDIMScheduler, leading, steps_offset=1 |
| ddpm_timesteps(S)       | "leading", offset 0: k * (T // S); S = T: 999..0 | diffusers DDPMScheduler defaults |
| dpm_solver_timesteps(S) | "linspace": round(linspace(0, T-1, S+1))[1:]    | diffusers DPMSolverMultistepScheduler default |

A DPMSolverMultistepScheduler built from an SD 1.x / 2.x scheduler config, which has no
timestep_spacing key (those configs predate it), gets its own default, "linspace" (which ignores
steps_offset); that is the one matched here.

LDM's own "uniform" DDIM spacing is range(0, T, T // S) + 1, which has more than S entries when S
does not divide T (S = 30 gives 31 steps); diffusers keeps exactly S (k < S). We follow diffusers;
for S dividing T (10, 20, 25, 50, 100, ...) the two are identical.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")


def leading_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 0) -> list[int]:
    """"Leading" spacing: k * (T // S) + steps_offset for k = S-1 .. 0 (descending)."""
    _check_num_steps(num_steps, num_train_timesteps)
    step_ratio = num_train_timesteps // num_steps
    timesteps = [k * step_ratio + steps_offset for k in reversed(range(num_steps))]
    if timesteps[0] >= num_train_timesteps:
        raise ValueError(f"leading spacing with num_steps={num_steps} and steps_offset={steps_offset} reaches "
                         f"timestep {timesteps[0]} >= num_train_timesteps={num_train_timesteps}; "
                         f"use fewer steps or steps_offset=0")
    return timesteps


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """SD's DDIM steps (LDM "uniform", diffusers "leading" + steps_offset=1): S=50 -> [981, 961, ..., 21, 1]."""
    return leading_timesteps(num_steps, num_train_timesteps, steps_offset)


def ddpm_timesteps(num_steps: int = 1000, num_train_timesteps: int = 1000, steps_offset: int = 0) -> list[int]:
    """Ancestral DDPM steps: S = T gives the full chain [999, ..., 0]; S < T respaces as DDPMScheduler does."""
    return leading_timesteps(num_steps, num_train_timesteps, steps_offset)


def dpm_solver_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DPM-Solver "linspace" spacing: round(k * (T-1) / S) for k = S .. 1 (step 0 is not visited).

    S=20 -> [999, 949, 899, ..., 100, 50]. The product k * ((T-1) / S) is taken in float64 and
    rounded half-to-even exactly as numpy.linspace(0, T-1, S+1).round() does, so ties such as
    S=26 land on the same integers as the reference.
    """
    _check_num_steps(num_steps, num_train_timesteps)
    grid = torch.arange(num_steps + 1, dtype=torch.float64) * ((num_train_timesteps - 1) / num_steps)
    grid[-1] = num_train_timesteps - 1  # linspace's endpoint is exact
    timesteps = grid.round().long().tolist()[::-1][:-1]
    check_timesteps(timesteps, num_train_timesteps)
    return timesteps


def check_timesteps(timesteps: Sequence[int] | torch.Tensor, num_train_timesteps: int) -> list[int]:
    """Validate a sampler's timesteps (strictly descending ints in [0, T)) and return them as a list."""
    ts = [int(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    if not ts:
        raise ValueError("timesteps is empty")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending (no repeats), got {ts}")
    if ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {ts[0]} .. {ts[-1]}")
    return ts

"""Noise levels off the training table: the sigma-space spacings of Euler (ancestral) and Karras.

Notation as in model/schedule.py, plus the variance-exploding noise level of k-diffusion
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"):

| symbol  | here    | meaning                                                          |
|---------|---------|------------------------------------------------------------------|
| sigma   | sigma   | sqrt((1 - alpha_bar) / alpha_bar): x_t / sqrt(alpha_bar) = x_0 + sigma eps |
| rho     | RHO     | Karras et al.'s spacing exponent (7, eq. 5)                      |

A sigma maps back to the variance-preserving side by alpha_bar = 1 / (1 + sigma^2). These levels
fall between the table's integer timesteps, so the samplers that use them call the denoiser as
`denoiser(x, t, alpha_bar=...)`: the network sees `t`, the eps/v conversion (sample/guidance.py)
uses the exact alpha_bar the sampler means.

| function                      | levels                                           | reference |
|-------------------------------|--------------------------------------------------|-----------|
| euler_levels(S)               | t = linspace(T-1, 0, S) (fractional), sigma interpolated linearly in t | diffusers EulerAncestralDiscreteScheduler, "linspace" |
| karras_levels(S)              | sigma from Karras eq. 5 between the table's sigma_max and sigma_min; t = log-sigma interpolation, rounded | diffusers DPMSolverMultistepScheduler(use_karras_sigmas=True) |

Both return float32-rounded values, as the reference keeps them, so a loop matches it step for step.
"""
from __future__ import annotations

import torch

from model.schedule import NoiseSchedule

RHO = 7.0  # Karras et al. 2022, eq. 5


def table_sigmas(schedule: NoiseSchedule) -> torch.Tensor:
    """(T,) float64: the sigma of every training timestep (ascending in t)."""
    ab = schedule.alphas_cumprod
    return ((1.0 - ab) / ab).sqrt()


def _f32(values: torch.Tensor) -> list[float]:
    return values.to(torch.float32).double().tolist()


def euler_levels(num_steps: int, schedule: NoiseSchedule) -> tuple[list[float], list[float]]:
    """(timesteps, sigmas) of Euler samplers: S fractional timesteps linspace(T-1, 0, S) and their
    linearly interpolated sigmas, then sigma = 0 (S + 1 entries)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    T = schedule.num_train_timesteps
    ts = torch.tensor(_f32(torch.linspace(0, T - 1, num_steps, dtype=torch.float64)), dtype=torch.float64).flip(0)
    table = table_sigmas(schedule)
    lo = ts.floor().long().clamp(max=T - 2)
    w = ts - lo.double()
    sigmas = table[lo] * (1 - w) + table[lo + 1] * w  # numpy.interp
    return ts.tolist(), _f32(sigmas) + [0.0]


def karras_levels(num_steps: int, schedule: NoiseSchedule) -> tuple[list[int], list[float]]:
    """(timesteps, sigmas) of the Karras spacing: S sigmas from Karras eq. 5 between the table's
    largest and smallest sigma, the timestep of each by log-sigma interpolation rounded to an
    integer (what the network sees), then sigma = 0 (S + 1 entries). Timesteps may repeat near 0
    at many steps, as the reference's do."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    table = table_sigmas(schedule)
    sigma_min, sigma_max = table[0].item(), table[-1].item()
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / RHO) + ramp * (sigma_min ** (1 / RHO) - sigma_max ** (1 / RHO))) ** RHO
    log_table = table.log()
    log_sigma = sigmas.clamp(min=1e-10).log()
    # the last table index whose log-sigma is <= log_sigma, then linear in log-sigma to the next
    low = ((log_sigma[None, :] - log_table[:, None]) >= 0).cumsum(0).argmax(0).clamp(max=len(table) - 2)
    w = ((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
    timesteps = ((1 - w) * low + w * (low + 1)).round().long().tolist()
    return timesteps, _f32(sigmas) + [0.0]


def alpha_bar_of(sigma: float) -> float:
    """alpha_bar = 1 / (1 + sigma^2) (sigma = 0 -> 1)."""
    return 1.0 / (1.0 + sigma * sigma)

"""Euler ancestral sampling ("Euler a"): Karras et al. 2022's Euler step on the probability-flow
ODE in sigma space, with the ancestral split of each step into a deterministic part down to
sigma_down and fresh noise of size sigma_up (k-diffusion's `sample_euler_ancestral`, diffusers'
EulerAncestralDiscreteScheduler).

Notation as in sample/sigmas.py. The sampler keeps s = x_t / sqrt(alpha_bar) = x_0 + sigma eps
(variance exploding); the network sees the variance-preserving x_t = s / sqrt(1 + sigma^2). One
step from sigma_i to sigma_{i+1} (eta = 1):

    x0_hat     = s - sigma_i eps_hat                       (eps prediction at sigma_i)
    sigma_up   = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)
    sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)
    s          = s + (s - x0_hat) / sigma_i * (sigma_down - sigma_i) + sigma_up z,   z ~ N(0, I)

The levels are `euler_levels(S)`: fractional timesteps linspace(T-1, 0, S) (the network gets
them as float t), their interpolated sigmas, then sigma = 0, where sigma_up = 0 and the step ends
at x0_hat. x_T ~ N(0, I) starts as s = sigma_0 x_T, as the reference does for this spacing.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from model.schedule import NoiseSchedule
from sample.noise import randn_per_sample
from sample.sigmas import alpha_bar_of, euler_levels

Denoiser = Callable[..., torch.Tensor]  # (x, t, alpha_bar=...) -> eps


def euler_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[float]:
    """The fractional timesteps of `euler_levels` (for the registry; the sampler recomputes the
    levels from their count)."""
    return euler_levels(num_steps, NoiseSchedule(num_train_timesteps))[0]


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule,
                           timesteps: Sequence[float] | torch.Tensor, *,
                           generators: Sequence[torch.Generator] | None = None, progress: bool = False) -> torch.Tensor:
    """Run Euler ancestral from x_T over len(timesteps) steps of `euler_levels`; return the latents.

    denoiser: (x (B, C, h, w), t (B,) float, alpha_bar=(B,) float64) -> eps.
    x: x_T ~ N(0, I), (B, C, h, w).
    timesteps: only their number counts (the levels are fixed by the schedule), e.g. euler_timesteps(20).
    generators: one torch.Generator per row for the noise of every step but the last.
    Returns x_0 latents (B, C, h, w), same dtype and device as x.
    """
    ts, sigmas = euler_levels(len(timesteps), schedule)
    s = x * sigmas[0]  # variance-exploding start: s = sigma_max x_T
    for i, t in enumerate(tqdm(ts, desc="Euler a", disable=not progress)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        ab = torch.full((x.shape[0],), alpha_bar_of(sigma), dtype=torch.float64)
        eps = denoiser(s / math.sqrt(sigma * sigma + 1.0), t_batch, alpha_bar=ab)  # the network sees x_t
        x0_hat = s - sigma * eps
        sigma_up = math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
        sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
        s = s + (s - x0_hat) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            s = s + sigma_up * randn_per_sample(x.shape, generators, device=x.device, dtype=x.dtype)
    return s

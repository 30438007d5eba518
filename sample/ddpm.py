"""Ancestral DDPM sampling (Ho, Jain & Abbeel 2020, Algorithm 2), full chain or respaced.

Notation as in model/schedule.py. One step from t to t_prev (the next timestep in the list, or
"none" after the last):

    x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)                    DDPM eq. 15
    x_prev = mu~(x0_hat, x_t) + sqrt(beta~) z,   z ~ N(0, I)               DDPM eqs. 6-7, "fixed small"

With every step kept (t_prev = t - 1) this is Algorithm 2 exactly. With a sub-sequence the same
posterior is taken between the kept steps, with the effective beta 1 - ab_t / ab_prev (as
diffusers' DDPMScheduler with num_inference_steps=S does). No noise is added after the last step
(Algorithm 2: z = 0 for t = 1), so the result is the posterior mean, i.e. x0_hat. The SD
reference never clips x0_hat in latent space, and neither do we.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from model.schedule import NoiseSchedule
from sample.noise import randn_per_sample
from sample.timesteps import check_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule,
                timesteps: Sequence[int] | torch.Tensor, *,
                generators: Sequence[torch.Generator] | None = None, progress: bool = False) -> torch.Tensor:
    """Run the ancestral sampler from x_T down the given timesteps and return the final latents.

    denoiser: (x (B, C, h, w), t (B,) long) -> eps.
    x: x_T ~ N(0, I), (B, C, h, w).
    timesteps: strictly descending, e.g. `ddpm_timesteps(1000)` (full chain) or `ddpm_timesteps(50)`.
    generators: one torch.Generator per row for the noise injected at every step but the last.
    Returns x_0 latents (B, C, h, w), same dtype and device as x.
    """
    ts = check_timesteps(timesteps, schedule.num_train_timesteps)
    for i, t in enumerate(tqdm(ts, desc="DDPM", disable=not progress)):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1  # -1: past the last step, alpha_bar_prev = 1
        eps = denoiser(x, t_batch)
        x0_hat = schedule.predict_x0(x, t_batch, eps)
        mean, variance = schedule.q_posterior_mean_variance(x0_hat, x, t, t_prev)
        if t_prev >= 0:
            x = mean + variance.sqrt() * randn_per_sample(x.shape, generators, device=x.device, dtype=x.dtype)
        else:
            x = mean
    return x

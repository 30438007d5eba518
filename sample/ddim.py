"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

Notation as in model/schedule.py; t_prev is the next (smaller) timestep in the list, and after
the last one alpha_bar_prev = alpha_bar_0 = alphas_cumprod[0] (LDM, and diffusers with
set_alpha_to_one=False), so the result sits at the noise level of step 0, as in the reference.

One step, DDIM eq. 12 with sigma_t from eq. 16:

    x0_hat  = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)                         "predicted x_0"
    sigma_t = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
    x_prev  = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma_t^2) eps + sigma_t z,   z ~ N(0, I)

eta = 0 is the deterministic DDIM; eta = 1 has DDPM's posterior variance on the skipped chain.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from model.schedule import NoiseSchedule
from sample.noise import randn_per_sample
from sample.timesteps import check_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule,
                timesteps: Sequence[int] | torch.Tensor, *, eta: float = 0.0,
                generators: Sequence[torch.Generator] | None = None, progress: bool = False) -> torch.Tensor:
    """Run DDIM from x_T down the given timesteps and return the final latents.

    denoiser: (x (B, C, h, w), t (B,) long) -> eps, e.g. a guidance wrapper from sample/guidance.py.
    x: x_T ~ N(0, I), (B, C, h, w); its dtype is the working dtype.
    timesteps: strictly descending, e.g. `ddim_timesteps(50)` = [981, 961, ..., 1].
    eta: 0 deterministic; > 0 injects noise from `generators` (one per row) at every step.
    Returns x_0 latents (B, C, h, w), same dtype and device as x.
    """
    ts = check_timesteps(timesteps, schedule.num_train_timesteps)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 = DDIM, 1 = DDPM variance), got {eta}")
    alphas_cumprod = schedule.alphas_cumprod  # float64, coefficients stay float64 until they meet x
    for i, t in enumerate(tqdm(ts, desc="DDIM", disable=not progress)):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = denoiser(x, t_batch)
        ab_t = alphas_cumprod[t].item()
        # After the last step the chain ends at alpha_bar_0, not at 1 (set_alpha_to_one=False).
        ab_prev = alphas_cumprod[ts[i + 1] if i + 1 < len(ts) else 0].item()
        x0_hat = schedule.predict_x0(x, t_batch, eps)
        sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev))  # eq. 16
        x = math.sqrt(ab_prev) * x0_hat + math.sqrt(1.0 - ab_prev - sigma ** 2) * eps  # eq. 12, "direction to x_t"
        if eta > 0:
            x = x + sigma * randn_per_sample(x.shape, generators, device=x.device, dtype=x.dtype)
    return x

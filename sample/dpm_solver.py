"""DPM-Solver++(2M): second-order multistep solver in data prediction (Lu et al. 2022,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2).

Notation as in model/schedule.py, plus, per timestep t (DPM-Solver sec. 2):

| symbol    | here          | meaning                                         |
|-----------|---------------|-------------------------------------------------|
| alpha_t   | alpha         | sqrt(alpha_bar_t)                               |
| sigma_t   | sigma         | sqrt(1 - alpha_bar_t)                           |
| lambda_t  | lam           | log(alpha_t / sigma_t), half the log-SNR        |
| h_i       | h             | lambda_{t_i} - lambda_{t_{i-1}} (> 0: time runs towards the data) |
| D_i       | x0_hat        | data prediction x_theta(x_{t_i}, t_i)           |

The ODE dx/dlambda in exponential-integrator form, with x0_hat linear in lambda over a step, gives
(Algorithm 2, with r = h_{i-1} / h_i):

    first order (DDIM):  x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_{i-1}
    2M:                  x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) (D_{i-1} + (D_{i-1} - D_{i-2}) / (2 r))

The sampler walks the given timesteps and then one step more, to sigma = 0 (alpha = 1): diffusers'
final_sigmas_type="zero", the default. That last step is first order (with sigma = 0 it reduces to
x = D, the last data prediction; a second-order step is undefined there since h = inf), which is
what diffusers' `lower_order_final` does; the first step is first order because no history exists
yet. Every step in between is 2M. The default SD spacing is `dpm_solver_timesteps` ("linspace").

"DPM++ 2M Karras" (`sample_dpm_solver_karras`) is the same solver over the Karras et al. 2022
noise levels (sample/sigmas.py: `karras_levels`): alpha, sigma and lambda come from those levels,
the network sees their rounded timesteps (diffusers' use_karras_sigmas=True).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from model.schedule import NoiseSchedule
from sample.sigmas import alpha_bar_of, karras_levels
from sample.timesteps import check_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_dpm_solver(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule,
                      timesteps: Sequence[int] | torch.Tensor, *,
                      generators: Sequence[torch.Generator] | None = None, progress: bool = False) -> torch.Tensor:
    """Run DPM-Solver++(2M) from x_T down the given timesteps (then to sigma = 0); return the latents.

    denoiser: (x (B, C, h, w), t (B,) long) -> eps.
    x: x_T ~ N(0, I), (B, C, h, w).
    timesteps: strictly descending, e.g. `dpm_solver_timesteps(20)` = [999, 949, ..., 50].
    generators: accepted for the common sampler signature; this solver is deterministic.
    Returns x_0 latents (B, C, h, w), same dtype and device as x.
    """
    ts = check_timesteps(timesteps, schedule.num_train_timesteps)
    alpha_bars = [schedule.alphas_cumprod[t].item() for t in ts]
    return _dpm_solver_2m(denoiser, x, ts, alpha_bars, off_table=False, progress=progress)


@torch.no_grad()
def sample_dpm_solver_karras(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule,
                             timesteps: Sequence[int] | torch.Tensor, *,
                             generators: Sequence[torch.Generator] | None = None,
                             progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) on the Karras spacing ("DPM++ 2M Karras"): the same solver over the noise
    levels of `karras_levels(len(timesteps))` (sample/sigmas.py), as diffusers'
    DPMSolverMultistepScheduler(use_karras_sigmas=True). Only the number of `timesteps` counts.

    denoiser: (x, t (B,) long, alpha_bar=(B,) float64) -> eps; the network sees the rounded t,
    the solver and the eps/v conversion use the Karras level alpha_bar = 1 / (1 + sigma^2).
    """
    ts, level_sigmas = karras_levels(len(timesteps), schedule)
    alpha_bars = [alpha_bar_of(sigma) for sigma in level_sigmas[:-1]]
    return _dpm_solver_2m(denoiser, x, ts, alpha_bars, off_table=True, progress=progress)


def karras_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The (rounded) timesteps the network sees on the Karras spacing (may repeat near 0)."""
    return karras_levels(num_steps, NoiseSchedule(num_train_timesteps))[0]


def _dpm_solver_2m(denoiser: Denoiser, x: torch.Tensor, ts: list[int], alpha_bars: list[float], *,
                   off_table: bool, progress: bool) -> torch.Tensor:
    """The 2M loop over levels alpha_bars[i] at network timesteps ts[i], then to sigma = 0.
    off_table: the levels are not the table's at ts, so the denoiser gets alpha_bar= too."""
    # (alpha, sigma, lambda) per visited step in float64, then the final clean point sigma = 0.
    alphas = [math.sqrt(ab) for ab in alpha_bars] + [1.0]
    sigmas = [math.sqrt(1.0 - ab) for ab in alpha_bars] + [0.0]
    lams = [math.log(a) - math.log(s) for a, s in zip(alphas[:-1], sigmas[:-1])] + [math.inf]

    x0_prev, h_prev = None, None  # D_{i-2} and h_{i-1}: the multistep history
    for i, t in enumerate(tqdm(ts, desc="DPM-Solver++(2M)", disable=not progress)):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if off_table:
            eps = denoiser(x, t_batch, alpha_bar=torch.full((x.shape[0],), alpha_bars[i], dtype=torch.float64))
        else:
            eps = denoiser(x, t_batch)
        x0_hat = (x - sigmas[i] * eps) / alphas[i]  # DDPM eq. 15 at this level
        if i == len(ts) - 1:
            x = x0_hat  # first-order step to sigma = 0: sigma ratio 0, alpha (1 - e^{-inf}) = 1
            break
        h = lams[i + 1] - lams[i]
        phi = -alphas[i + 1] * math.expm1(-h)  # -alpha_i (e^{-h} - 1), > 0
        if x0_prev is None:
            d = x0_hat  # first step: no history, first order
        else:
            r = h_prev / h
            d = x0_hat + (x0_hat - x0_prev) / (2.0 * r)  # linear extrapolation of D in lambda (midpoint form)
        x = (sigmas[i + 1] / sigmas[i]) * x + phi * d
        x0_prev, h_prev = x0_hat, h
    return x

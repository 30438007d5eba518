"""UniPC: the unified predictor-corrector multistep solver (Zhao et al. 2023, "UniPC: A Unified
Predictor-Corrector Framework for Fast Sampling of Diffusion Models"), in data prediction with the
B(h) = e^h - 1 variant ("bh2") at order 2, as diffusers' UniPCMultistepScheduler defaults.

Notation as in sample/dpm_solver.py (alpha, sigma, lambda = log(alpha / sigma), h, D = x0_hat).
Step i goes from level s = t_i to t = t_{i+1} (the last one to sigma = 0), with h = lambda_t - lambda_s,
hh = -h, phi_1 = e^{hh} - 1 and B = e^{hh} - 1 (bh2):

    UniP (predictor, Alg. 2), order 1 or 2:
        x_t = (sigma_t / sigma_s) x_s - alpha_t phi_1 D_s - alpha_t B rho_p D1,   rho_p = 1/2 (order 2)
        D1  = (D_{s-1} - D_s) / r,   r = (lambda_{s-1} - lambda_s) / h
    UniC (corrector, Alg. 3), applied at the start of every step after the first with the new D_t:
        x_t <- (sigma_t / sigma_s) x_s - alpha_t phi_1 D_s - alpha_t B (sum_k rho_c,k D1_k + rho_c,K (D_t - D_s))
        rho_c solves R rho_c = b,  R_{k,j} = r_j^k,  b_k = k! h phi_{k+1}(h) / B  (rho_c = 1/2 at order 1)

The order is 1 at the first step (no history) and at the last (diffusers' lower_order_final),
2 in between; the corrector uses the order of the predictor it corrects. The corrector's D_t is
the model output of the next step, so UniPC costs one network call per step like DPM-Solver++.
The spacing is diffusers' UniPC default, "linspace" (`dpm_solver_timesteps`), on the table.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from model.schedule import NoiseSchedule
from sample.timesteps import check_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _b_coefficients(hh: float, order: int) -> tuple[float, list[float]]:
    """(B(h), [b_1 .. b_order]) with b_k = k! phi_{k+1} / B in the recursion of the reference."""
    b_h = math.expm1(hh)  # bh2
    h_phi_k = math.expm1(hh) / hh - 1.0
    factorial, b = 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return b_h, b


def _update(x: torch.Tensor, d_s: torch.Tensor, lam: list[float], alpha: list[float], sigma: list[float],
            s: int, t: int, history: list[tuple[int, torch.Tensor]], d_t: torch.Tensor | None) -> torch.Tensor:
    """One UniP step from level s to level t (d_t None), or the UniC correction of it (d_t given).
    history: earlier (level, D) pairs used for the order-2 difference (empty at order 1)."""
    if sigma[t] == 0.0:  # the last step: h = inf, e^{-h} = 0, phi_1 = B = -1
        hh, b_h, b = -math.inf, -1.0, [0.5]
        phi_1 = -1.0
    else:
        hh = -(lam[t] - lam[s])
        phi_1 = math.expm1(hh)
        b_h, b = _b_coefficients(hh, len(history) + 1)
    x_t = (sigma[t] / sigma[s]) * x - alpha[t] * phi_1 * d_s
    h = -hh
    rks, d1s = [], []
    for level, d in history:
        rk = (lam[level] - lam[s]) / h
        rks.append(rk)
        d1s.append((d - d_s) / rk)
    if d_t is None:  # predictor: rho_p = 1/2 at order 2 (the reference's closed form)
        if not d1s:
            return x_t
        return x_t - alpha[t] * b_h * (0.5 * d1s[0])
    if not d1s:  # corrector at order 1
        return x_t - alpha[t] * b_h * (0.5 * (d_t - d_s))
    r = torch.tensor([[rk ** k for rk in [*rks, 1.0]] for k in range(len(rks) + 1)], dtype=torch.float64)
    rho = torch.linalg.solve(r, torch.tensor(b, dtype=torch.float64)).tolist()
    correction = sum(rho_k * d1 for rho_k, d1 in zip(rho[:-1], d1s)) + rho[-1] * (d_t - d_s)
    return x_t - alpha[t] * b_h * correction


@torch.no_grad()
def sample_unipc(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule,
                 timesteps: Sequence[int] | torch.Tensor, *,
                 generators: Sequence[torch.Generator] | None = None, progress: bool = False) -> torch.Tensor:
    """Run UniPC (bh2, order 2) from x_T down the given timesteps (then to sigma = 0).

    denoiser: (x (B, C, h, w), t (B,) long) -> eps.
    x: x_T ~ N(0, I), (B, C, h, w).
    timesteps: strictly descending, e.g. `dpm_solver_timesteps(20)`.
    generators: accepted for the common sampler signature; this solver is deterministic.
    Returns x_0 latents (B, C, h, w), same dtype and device as x.
    """
    ts = check_timesteps(timesteps, schedule.num_train_timesteps)
    alpha_bars = [schedule.alphas_cumprod[t].item() for t in ts]
    alpha = [math.sqrt(ab) for ab in alpha_bars] + [1.0]
    sigma = [math.sqrt(1.0 - ab) for ab in alpha_bars] + [0.0]
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha[:-1], sigma[:-1])] + [math.inf]
    outputs: list[tuple[int, torch.Tensor]] = []  # (level, D) of the last two steps
    x_prev, order_prev = None, 0
    for i, t in enumerate(tqdm(ts, desc="UniPC", disable=not progress)):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        d = (x - sigma[i] * denoiser(x, t_batch)) / alpha[i]  # x0_hat at level i
        if x_prev is not None:  # UniC: correct the last predictor step with the new D
            s_level, d_s = outputs[-1]
            x = _update(x_prev, d_s, lam, alpha, sigma, s_level, i, outputs[-order_prev:-1] if order_prev > 1 else [], d)
        outputs = (outputs + [(i, d)])[-2:]
        order = min(2, len(ts) - i, len(outputs))  # 1 at the first and the last step
        x_prev, order_prev = x, order
        x = _update(x, d, lam, alpha, sigma, i, i + 1, outputs[-order:-1] if order > 1 else [], None)
    return x

"""The discrete variance-preserving noise schedule of Stable Diffusion, and its closed-form maths.

Notation (Ho et al. 2020 "DDPM"; Song et al. 2021 "DDIM"; Salimans & Ho 2022 "Progressive
Distillation", section 4 for v):

| symbol            | here                  | meaning                                                        |
|-------------------|-----------------------|----------------------------------------------------------------|
| T                 | num_train_timesteps   | number of training steps (1000); t is in [0, T), 0 = least noise |
| beta_t            | betas[t]              | per-step variance of q(x_t | x_{t-1})                          |
| alpha_t           | 1 - betas[t]          |                                                                |
| alpha_bar_t       | alphas_cumprod[t]     | prod_{s<=t} alpha_s; x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps |
| eps               | eps, noise            | the Gaussian noise, N(0, I)                                    |
| x_0, x_t          | x0, x_t               | clean and noised latents                                       |
| v                 | v                     | sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0              |
| SNR(t)            | snr(t)                | alpha_bar_t / (1 - alpha_bar_t)                                |
| beta~_t           | posterior variance    | (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t ("fixed small") |

The betas are SD's "scaled linear" schedule: linear in sqrt(beta), squared, computed in float64 as
the original LDM code does (its `make_beta_schedule("linear")`). diffusers builds the same formula in
float32, so its alphas_cumprod differ from these by up to ~5e-7 (float32 rounding in the cumprod).

Timesteps `t` may be a Python int/float, a 0-d tensor or a (B,) tensor on any device, int/long or
float. Integer-valued t index the tables exactly; fractional float t (continuous-time samplers)
interpolate log(alpha_bar) linearly between the neighbouring integer steps. Every coefficient is
computed in float64 on the CPU and only then cast to the device and dtype of the tensor it
multiplies, so the class holds no device state, is cheap to build and works on any device
(including ones without float64).
"""
from __future__ import annotations

import math

import torch

Timesteps = int | float | torch.Tensor


def _cpu_tensor(t: Timesteps) -> torch.Tensor:
    """Timesteps as a CPU tensor (a device-to-host copy for accelerator tensors; they are tiny)."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu()
    return torch.tensor(t, device="cpu")


class NoiseSchedule:
    """SD's 1000-step scaled-linear VP schedule. Not an nn.Module: it has no weights or buffers."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        # (T,) float64 on CPU. LDM/SD "linear" = linear in sqrt(beta).
        # device="cpu" explicitly: models are built under `with torch.device("meta")`, and the tables
        # must hold real numbers even then.
        self.betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps,
                                    dtype=torch.float64, device="cpu") ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def __repr__(self) -> str:
        return (f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, "
                f"beta_start={self.beta_start}, beta_end={self.beta_end})")

    # ---- alpha_bar lookup -------------------------------------------------------------------------

    def alpha_bar(self, t: Timesteps) -> torch.Tensor:
        """alpha_bar_t as a float64 CPU tensor of t's shape (see the module docstring for float t)."""
        t = _cpu_tensor(t)
        if t.is_floating_point():
            t = t.double()
        if bool((t < 0).any()) or bool((t > self.num_train_timesteps - 1).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], "
                             f"got min {t.min().item()} max {t.max().item()}")
        if not t.is_floating_point():
            return self.alphas_cumprod[t.long()]
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo.double()
        log_ab = self.alphas_cumprod.log()
        interpolated = torch.exp(torch.lerp(log_ab[lo], log_ab[hi], w))
        # Integer-valued floats take the table value itself, so 500.0 and 500 agree bit for bit.
        return torch.where(w == 0, self.alphas_cumprod[lo], interpolated)

    def snr(self, t: Timesteps) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), float64 CPU tensor of t's shape."""
        ab = self.alpha_bar(t)
        return ab / (1.0 - ab)

    def _coef(self, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A float64 (B,) or scalar coefficient cast to `like`'s device/dtype, shaped to broadcast."""
        value = value.to(device=like.device, dtype=like.dtype)
        if value.dim() == 0:
            return value
        if value.shape[0] != like.shape[0]:
            raise ValueError(f"timesteps have batch {value.shape[0]} but the tensor has batch {like.shape[0]}")
        return value.reshape(-1, *([1] * (like.dim() - 1)))  # (B,) -> (B, 1, 1, 1)

    def _sqrt_ab(self, t: Timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), broadcastable against `like`."""
        ab = self.alpha_bar(t)
        return self._coef(ab.sqrt(), like), self._coef((1.0 - ab).sqrt(), like)

    # ---- forward process and parameterisations --------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: Timesteps, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) (DDPM eq. 4): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        a, s = self._sqrt_ab(t, x0)
        return a * x0 + s * noise

    def predict_x0(self, x_t: torch.Tensor, t: Timesteps, eps: torch.Tensor) -> torch.Tensor:
        """x_0 from x_t and predicted eps: eq. 4 solved for x_0 (DDPM eq. 15; the "predicted x_0" of DDIM eq. 12)."""
        a, s = self._sqrt_ab(t, x_t)
        return (x_t - s * eps) / a

    def predict_eps(self, x_t: torch.Tensor, t: Timesteps, x0: torch.Tensor) -> torch.Tensor:
        """eps from x_t and x_0: eq. 4 solved for eps."""
        a, s = self._sqrt_ab(t, x_t)
        return (x_t - a * x0) / s

    def v_target(self, x0: torch.Tensor, t: Timesteps, noise: torch.Tensor) -> torch.Tensor:
        """The v-prediction target (Salimans & Ho 2022, sec. 4): sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0."""
        a, s = self._sqrt_ab(t, x0)
        return a * noise - s * x0

    get_v = v_target  # the name diffusers uses (get_velocity); same function

    def eps_from_v(self, x_t: torch.Tensor, t: Timesteps, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t (substitute eq. 4 into the definition of v)."""
        a, s = self._sqrt_ab(t, x_t)
        return a * v + s * x_t

    def x0_from_v(self, x_t: torch.Tensor, t: Timesteps, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
        a, s = self._sqrt_ab(t, x_t)
        return a * x_t - s * v

    # ---- reverse process (DDPM posterior) --------------------------------------------------------

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: Timesteps,
                                  t_prev: Timesteps | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and "fixed small" variance of q(x_{t_prev} | x_t, x_0) (DDPM eqs. 6-7).

        t_prev defaults to t - 1 (the full 1000-step chain). For a respaced chain pass the previous
        kept step: the per-step beta becomes 1 - alpha_bar_t / alpha_bar_{t_prev}. A negative t_prev
        means "past the last step": alpha_bar_{t_prev} = 1, so the mean is x_0 and the variance 0.

        Returns (mean like x_t, variance broadcastable against x_t: (B, 1, 1, 1) or scalar).
        """
        t_cpu = _cpu_tensor(t).long()
        t_prev_cpu = t_cpu - 1 if t_prev is None else _cpu_tensor(t_prev).long()
        ab_t = self.alpha_bar(t_cpu)
        ab_prev = torch.where(t_prev_cpu >= 0, self.alphas_cumprod[t_prev_cpu.clamp(min=0)], torch.ones_like(ab_t))
        beta_t = 1.0 - ab_t / ab_prev  # the effective beta of this (possibly respaced) step
        # eq. 7: mu~ = sqrt(ab_prev) beta_t / (1 - ab_t) x_0 + sqrt(alpha_t) (1 - ab_prev) / (1 - ab_t) x_t
        coef_x0 = ab_prev.sqrt() * beta_t / (1.0 - ab_t)
        coef_xt = (1.0 - beta_t).sqrt() * (1.0 - ab_prev) / (1.0 - ab_t)
        variance = (1.0 - ab_prev) / (1.0 - ab_t) * beta_t  # beta~_t, "fixed small"
        mean = self._coef(coef_x0, x_t) * x0 + self._coef(coef_xt, x_t) * x_t
        return mean, self._coef(variance, x_t)

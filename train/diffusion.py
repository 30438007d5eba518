"""The diffusion-training maths both trainers share: latents, timesteps, noise, the target.

One training example (LDM / DreamBooth / ControlNet alike):

    z0  = (mean + std * n) * scale        n ~ N(0, I); mean, std from the frozen VAE encoder
    t   ~ U{0, ..., T-1}                  T = 1000
    eps ~ N(0, I)
    z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps                     (schedule.q_sample)
    target = eps ("epsilon") or sqrt(ab_t) eps - sqrt(1 - ab_t) z0 ("v_prediction")
    loss = mean((unet(z_t, t, context) - target)^2)

All randomness comes from one explicit generator (on the training device), so a run's noise is
reproduced exactly after a resume once the generator state is restored.
"""
from __future__ import annotations

import torch

from model.schedule import NoiseSchedule
from model.vae import AutoencoderKL

PREDICTION_TYPES = ("epsilon", "v_prediction")


@torch.no_grad()
def encode_posterior(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of images (B, 3, H, W) in [-1, 1], float32, unscaled.

    Kept apart from the sampling so a run can cache (mean, std) once and still draw a fresh
    posterior sample every step, exactly as an uncached run does."""
    dtype = next(vae.parameters()).dtype
    posterior = vae.encode(images.to(dtype))
    return posterior.mean.float(), posterior.std.float()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scale: float,
                   generator: torch.Generator) -> torch.Tensor:
    """z0 = (mean + std * n) * scale, n drawn (float32) from `generator`."""
    noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return (mean + std * noise.to(mean.device)) * scale


def sample_timesteps(batch: int, generator: torch.Generator, num_train_timesteps: int = 1000
                     ) -> torch.Tensor:
    """(B,) int64 timesteps uniform in [0, T), on the generator's device."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=generator.device)


def sample_noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """eps ~ N(0, I) of `like`'s shape, float32, drawn from `generator`, on `like`'s device."""
    return torch.randn(like.shape, generator=generator, device=generator.device,
                       dtype=torch.float32).to(like.device)


def diffusion_target(schedule: NoiseSchedule, prediction_type: str, z0: torch.Tensor,
                     noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output at (z_t, t): eps, or v for v-prediction models."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return schedule.v_target(z0, t, noise)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

"""The Stable Diffusion bundle: UNet + VAE + text encoder + tokenizer + noise schedule, and presets.

A preset names a whole model family member:

| preset    | family | prediction   | UNet                     | text encoder              | image |
|-----------|--------|--------------|--------------------------|---------------------------|-------|
| sd15      | sd1    | epsilon      | 8 heads, context 768     | CLIP ViT-L/14, last layer | 512   |
| sd21      | sd2    | epsilon      | 64-dim heads, ctx 1024   | OpenCLIP ViT-H/14, penult.| 512   |
| sd21-v    | sd2    | v_prediction | as sd21                  | as sd21                   | 768   |
| tiny      | sd1    | epsilon      | 2 levels, 32 channels    | 2 layers, width 32        | 64    |
| tiny-sd2  | sd2    | epsilon      | as tiny, linear proj     | 2 layers, gelu, penult.   | 64    |

`StableDiffusion` is a plain container module: it owns no maths of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from model.schedule import NoiseSchedule
from model.text_encoder import TextEncoder, TextEncoderConfig
from model.tokenizer import Tokenizer
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig

FAMILIES = ("sd1", "sd2")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class SDConfig:
    family: str = "sd1"
    prediction_type: str = "epsilon"
    unet: UNetConfig = field(default_factory=UNetConfig.sd15)
    vae: VAEConfig = field(default_factory=VAEConfig.sd)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig.clip_l)
    image_size: int = 512  # native resolution in pixels; latents are image_size // vae.downsample_factor

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"SDConfig.family must be one of {FAMILIES}, got {self.family!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"SDConfig.prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        if self.unet.context_dim != self.text.width:
            raise ValueError(f"UNet context_dim {self.unet.context_dim} != text encoder width {self.text.width}")


PRESETS: dict[str, SDConfig] = {
    "sd15": SDConfig("sd1", "epsilon", UNetConfig.sd15(), VAEConfig.sd(), TextEncoderConfig.clip_l(), 512),
    "sd21": SDConfig("sd2", "epsilon", UNetConfig.sd21(), VAEConfig.sd(), TextEncoderConfig.openclip_h(), 512),
    "sd21-v": SDConfig("sd2", "v_prediction", UNetConfig.sd21(), VAEConfig.sd(), TextEncoderConfig.openclip_h(), 768),
    "tiny": SDConfig("sd1", "epsilon", UNetConfig.tiny(), VAEConfig.tiny(), TextEncoderConfig.tiny(), 64),
    "tiny-sd2": SDConfig("sd2", "epsilon", UNetConfig.tiny_sd2(), VAEConfig.tiny(), TextEncoderConfig.tiny_sd2(), 64),
    # The v-prediction twin of tiny-sd2 (as sd21-v is of sd21): the tests train and sample it.
    "tiny-sd2-v": SDConfig("sd2", "v_prediction", UNetConfig.tiny_sd2(), VAEConfig.tiny(), TextEncoderConfig.tiny_sd2(),
                           64),
}


def preset(name: str, **overrides) -> SDConfig:
    """The SDConfig of a named preset, with optional field overrides (e.g. prediction_type)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


class StableDiffusion(nn.Module):
    """UNet, VAE and text encoder of one SD model, plus its tokenizer and noise schedule.

    Build on the meta device and load weights with `load_state_dict(..., assign=True)` (weights/
    does this), or build with random weights for tests: `StableDiffusion(preset("tiny"))`.
    """

    def __init__(self, config: SDConfig):
        super().__init__()
        self.config = config
        self.unet = UNet(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.text_encoder = TextEncoder(config.text)
        self.tokenizer = Tokenizer.from_config(config.text)
        self.schedule = NoiseSchedule()

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    @property
    def latent_scale(self) -> float:
        """Latents = VAE sample * latent_scale (0.18215 for SD)."""
        return self.config.vae.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text conditioning (B, 77, width) for a list of prompts, on the text encoder's device."""
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(self.tokenizer(prompts).to(device))

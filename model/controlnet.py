"""The control copy (ControlNet, Zhang et al. 2023; the paper's "HyperNetwork", sec. 4.2).

A trainable copy of the UNet's encoder half (time embedding, input blocks, middle block) reads the
noisy latents, the timestep, the text and a hint image (the topological driver), and returns one
residual per skip connection plus one for the middle block; the frozen UNet adds them
(`unet(x, t, context, control=residuals)`). Every residual leaves through a zero-initialised 1x1
convolution, so a fresh copy changes nothing and training starts from the base model exactly.

Module names reproduce the original `control_model.*` checkpoint keys (lllyasviel/ControlNet
`cldm.ControlNet`) with the prefix stripped, in the same state-dict order:

    time_embed.{0,2}                 copied from the UNet
    input_blocks.N                   copied from the UNet (12 for SD)
    zero_convs.N.0                   1x1 conv, zero-initialised, one per input block
    input_hint_block.{0,2,...,14}    hint encoder: 3x3 convs with SiLU between (odd indices), last zero
    middle_block.{0,1,2}             copied from the UNet
    middle_block_out.0               1x1 conv, zero-initialised

The blocks are built by model/unet.py's builders (no UNet code lives here) and `from_unet` copies a
UNet's weights into them.

Hint encoder (SD): 3 -> 16 -> 16 -> 32 (s2) -> 32 -> 96 (s2) -> 96 -> 256 (s2) -> 320, i.e. stage
widths (16, 32, 96, 256), one stride-2 conv between stages, so a 512 px hint becomes a 64x64 map
of model_channels, the latent size. Generalisation for other configs (`hint_widths_for`): one stage
more than log2(VAE downsample factor) stages, widths taken from SD's (16, 32, 96, 256, 256, ...)
and capped at model_channels; the final conv always maps to model_channels. SD (320 channels,
8x VAE) gets exactly the original; the tiny config (32 channels, 8x VAE) gets (16, 32, 32, 32).

The encoded hint is added once, to the output of the first input block (conv_in), as in the
original and in diffusers' ControlNetModel.

Residual scales: `scale` multiplies every residual (diffusers' conditioning_scale, the original's
"strength"); guess mode uses scale * 0.825 ** (n - 1 - i) for residual i of n (the original's
`control_scales` in guess mode: 0.825**12 ~ 0.1 for the full-resolution skip up to 1 for the
middle block). `global_pool` (ControlNet 1.1 shuffle) averages each residual over space.

Notation: B batch, C channels, H/W latent size, f the hint downsample factor (8), T context tokens,
D context width.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from model.layers import timestep_embedding, zero_module
from model.unet import (CheckpointedBlocks, UNet, UNetConfig, build_input_blocks, build_middle_block,
                        build_time_embed)

# Stage widths of the original hint encoder; `hint_widths_for` extends them with 256 for deeper VAEs.
SD_HINT_WIDTHS = (16, 32, 96, 256)
GUESS_MODE_BASE = 0.825  # cldm gradio demos: control_scales = [strength * 0.825 ** (12 - i) for i in range(13)]


def hint_widths_for(model_channels: int, downsample_factor: int = 8) -> tuple[int, ...]:
    """Hint-encoder stage widths for a UNet with `model_channels` under a VAE that downsamples by
    `downsample_factor` (a power of two): log2(factor) + 1 stages, SD's widths capped at
    model_channels. (320, 8) -> (16, 32, 96, 256), the original; (32, 8) -> (16, 32, 32, 32)."""
    stages = downsample_factor.bit_length()  # log2(factor) + 1 for a power of two
    if downsample_factor < 1 or downsample_factor & (downsample_factor - 1):
        raise ValueError(f"hint_widths_for: downsample_factor must be a power of two, got {downsample_factor}")
    widths = list(SD_HINT_WIDTHS[:stages]) + [SD_HINT_WIDTHS[-1]] * max(0, stages - len(SD_HINT_WIDTHS))
    return tuple(min(w, model_channels) for w in widths)


@dataclass(frozen=True)
class ControlNetConfig:
    """A control copy: the UNet config it copies, plus its hint encoder."""

    unet: UNetConfig = field(default_factory=UNetConfig.sd15)
    hint_channels: int = 3                        # RGB driver
    hint_widths: tuple[int, ...] = SD_HINT_WIDTHS  # stage widths; len - 1 stride-2 convs
    global_pool: bool = False                     # ControlNet 1.1 shuffle: residuals averaged over space

    def __post_init__(self):
        if not self.hint_widths:
            raise ValueError("ControlNetConfig.hint_widths must hold at least one width")

    @property
    def downsample_factor(self) -> int:
        """Hint pixels per latent pixel (8 for SD): 2 ** (number of stride-2 convs)."""
        return 2 ** (len(self.hint_widths) - 1)

    @classmethod
    def sd15(cls) -> ControlNetConfig:
        return cls(UNetConfig.sd15())

    @classmethod
    def sd21(cls) -> ControlNetConfig:
        return cls(UNetConfig.sd21())

    @classmethod
    def tiny(cls) -> ControlNetConfig:
        return cls(UNetConfig.tiny(), hint_widths=hint_widths_for(UNetConfig.tiny().model_channels))

    @classmethod
    def tiny_sd2(cls) -> ControlNetConfig:
        return cls(UNetConfig.tiny_sd2(), hint_widths=hint_widths_for(UNetConfig.tiny_sd2().model_channels))


def build_hint_encoder(config: ControlNetConfig) -> nn.Sequential:
    """Hint image (B, hint_channels, fH, fW) -> (B, model_channels, H, W).

    Convs at even indices, SiLU at odd ones (the original's Sequential, so the keys are
    input_hint_block.0, .2, ..., .14 for SD); within a stage a same-width conv, between stages a
    stride-2 conv; the last conv is zero-initialised, so a fresh encoder outputs zeros.
    """
    widths = config.hint_widths
    layers: list[nn.Module] = [nn.Conv2d(config.hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(w_in, w_in, 3, padding=1), nn.SiLU(),
                   nn.Conv2d(w_in, w_out, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(zero_module(nn.Conv2d(widths[-1], config.unet.model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


def zero_conv(channels: int) -> nn.Sequential:
    """The original's `make_zero_conv`: a zero-initialised 1x1 conv, wrapped so its key is `.0`."""
    return nn.Sequential(zero_module(nn.Conv2d(channels, channels, 1)))


class ControlNet(CheckpointedBlocks, nn.Module):
    """control(x, t, context, hint, scale=1.0, guess_mode=False) -> len(input_blocks) + 1 residuals.

    Build a fresh copy of a UNet with `ControlNet.from_unet(unet)`; build on the meta device and
    load with `load_state_dict(sd, strict=True, assign=True)` for checkpoints (weights/ does this:
    `weights.load_control`). No buffers, nothing computed at construction that forward needs.
    """

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        # Created in the original's order, so state_dict() lists keys as the checkpoint files do.
        self.time_embed = build_time_embed(config.unet)
        self.input_blocks, skip_channels = build_input_blocks(config.unet)
        self.zero_convs = nn.ModuleList(zero_conv(ch) for ch in skip_channels)
        self.input_hint_block = build_hint_encoder(config)
        self.middle_block = build_middle_block(config.unet)
        self.middle_block_out = zero_conv(config.unet.model_channels * config.unet.channel_mult[-1])

    @classmethod
    def from_unet(cls, unet: UNet, hint_channels: int = 3, hint_widths: tuple[int, ...] | None = None,
                  downsample_factor: int = 8, dtype: torch.dtype = torch.float32) -> ControlNet:
        """A fresh control copy of `unet`: its time embedding, input blocks and middle block with
        their current weights, new zero convs and a new hint encoder (last conv zero).

        hint_widths: None = `hint_widths_for(model_channels, downsample_factor)`, where
        downsample_factor is the VAE's (8 for SD and the tiny preset).
        The copy lives on the UNet's device in `dtype` (float32: trainable weights stay float32).
        """
        widths = hint_widths if hint_widths is not None else hint_widths_for(unet.config.model_channels,
                                                                             downsample_factor)
        config = ControlNetConfig(unet.config, hint_channels, tuple(widths))
        device = next(unet.parameters()).device
        with torch.device(device):
            control = cls(config).to(dtype)
        for name in ("time_embed", "input_blocks", "middle_block"):
            getattr(control, name).load_state_dict(getattr(unet, name).state_dict(), strict=True)
        return control

    def residual_scales(self, scale: float = 1.0, guess_mode: bool = False) -> list[float]:
        """The factor of each residual (input blocks, then middle): `scale`, or guess mode's ramp."""
        n = len(self.input_blocks) + 1
        if guess_mode:
            return [scale * GUESS_MODE_BASE ** (n - 1 - i) for i in range(n)]
        return [scale] * n

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor,
                scale: float = 1.0, guess_mode: bool = False) -> list[torch.Tensor]:
        """Control residuals for the UNet.

        x: (B, in_channels, H, W) noisy latents; t: (B,) timesteps (int or float; 0-dim broadcast);
        context: (B, T, D) text context; hint: (B, hint_channels, fH, fW) driver in [0, 1] at
        image resolution (f = config.downsample_factor).
        Returns len(input_blocks) + 1 tensors in x's dtype: residual i (B, C_i, H_i, W_i) for skip i,
        then the middle block's (B, C_mid, H / 2**(levels-1), W / 2**(levels-1)) LAST.
        """
        f = self.config.downsample_factor
        if hint.shape[-2:] != (x.shape[-2] * f, x.shape[-1] * f) or hint.shape[0] != x.shape[0]:
            raise ValueError(f"ControlNet: hint shape {tuple(hint.shape)} does not fit latents {tuple(x.shape)}: "
                             f"expected (B={x.shape[0]}, {self.config.hint_channels}, {x.shape[-2] * f}, "
                             f"{x.shape[-1] * f}) (the image size, {f}x the latent size)")
        if t.dim() == 0:
            t = t.expand(x.shape[0])  # () -> (B,)
        # As in the UNet: the sinusoid is float32, the MLP runs in the model dtype.
        emb = self.time_embed(timestep_embedding(t, self.config.unet.model_channels).to(x.dtype))  # (B, 4mc)
        guided_hint = self.input_hint_block(hint.to(x.dtype))  # (B, 3, fH, fW) -> (B, mc, H, W)

        outs = []
        h = x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = self._run(block, h, emb, context)
            if i == 0:
                h = h + guided_hint  # the hint enters once, after conv_in
            outs.append(zero(h))
        h = self._run(self.middle_block, h, emb, context)
        outs.append(self.middle_block_out(h))

        scales = self.residual_scales(scale, guess_mode)
        if any(s != 1.0 for s in scales):
            outs = [o * s for o, s in zip(outs, scales)]
        if self.config.global_pool:
            outs = [o.mean(dim=(2, 3), keepdim=True) for o in outs]  # (B, C, H, W) -> (B, C, 1, 1)
        return outs

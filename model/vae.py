"""The Stable Diffusion KL autoencoder (LDM `AutoencoderKL` with `diffusionmodules.model` Encoder/Decoder).

Images (B, 3, H, W) in [-1, 1] <-> latents (B, 4, H/8, W/8). Module names reproduce the original
checkpoint keys with `first_stage_model.` stripped:

    encoder.conv_in, encoder.down.{i}.block.{j}, encoder.down.{i}.downsample.conv,
    encoder.mid.{block_1, attn_1, block_2}, encoder.norm_out, encoder.conv_out, quant_conv,
    post_quant_conv, decoder.conv_in, decoder.mid.*, decoder.up.{i}.block.{j} (num_res_blocks + 1
    of them), decoder.up.{i}.upsample.conv, decoder.norm_out, decoder.conv_out

`decoder.up.i` is indexed by resolution level like the encoder (up.0 is full resolution), although
the decoder runs it last. Attention only in the middle blocks, one head over all channels, with
q/k/v/proj_out as 1x1 convolutions (the LDM weights are [C, C, 1, 1]).

`decode` takes UNSCALED latents: callers divide by `config.scaling_factor` first (and multiply
after `encode`), so the VAE itself stays a pure autoencoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import GroupNorm32, TokenConv1x1, Upsample, attention


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the autoencoder. Defaults are SD 1.x/2.x (both use the same VAE)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215  # latents = posterior sample * scaling_factor (unit variance for SD)

    def __post_init__(self):
        for mult in self.channel_mult:
            if (self.base_channels * mult) % self.norm_groups:
                raise ValueError(f"VAEConfig.norm_groups {self.norm_groups} does not divide "
                                 f"{self.base_channels * mult} channels (base_channels * {mult})")

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: one 2x downsample between consecutive levels (8 for SD)."""
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def sd(cls) -> VAEConfig:
        """SD 1.x / 2.x `first_stage_config` (embed_dim 4, ch 128, ch_mult 1,2,4,4)."""
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """Test network (~1.3M parameters) that keeps SD's 8x downsampling, so the tiny pipeline's
        image/latent geometry (64 px -> 8x8 latents) is the real one: base 32, four levels,
        one res block per level."""
        return cls(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------

class ResnetBlock(nn.Module):
    """Norm-SiLU-conv twice with a residual; no timestep input (LDM temb_channels=0).

    (B, C_in, H, W) -> (B, C_out, H, W); a 1x1 conv `nin_shortcut` matches channels on the skip.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm32(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, as 1x1 convs; residual.

    (B, C, H, W) -> (B, C, H, W). At SD's 512 px this is 4096 tokens of width 512.
    """

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.norm = GroupNorm32(groups, channels, eps=eps)
        self.q = TokenConv1x1(channels, channels)
        self.k = TokenConv1x1(channels, channels)
        self.v = TokenConv1x1(channels, channels)
        self.proj_out = TokenConv1x1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # q/k/v are 1x1 convs applied to the token view (TokenConv1x1): they come out directly in
        # the (B, 1, HW, C) layout attention wants, without three transposed copies.
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        q = self.q(tokens)[:, None]  # (B, HW, C) -> (B, 1, HW, C)
        k = self.k(tokens)[:, None]  # (B, HW, C) -> (B, 1, HW, C)
        v = self.v(tokens)[:, None]  # (B, HW, C) -> (B, 1, HW, C)
        h = attention(q, k, v)[:, 0]  # (B, 1, HW, C) -> (B, HW, C)
        h = self.proj_out(h)  # (B, HW, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, HW, C) -> (B, C, H, W), a channels-last view
        # h + x (not x + h) keeps h's channels-last layout for the rest of the network, as the
        # diffusers reference does: the convolutions then sum in the same order and float32 results
        # agree bit for bit (a contiguous sum differs by ~1e-6 relative per layer). No copy either way.
        return h + x


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom by one (LDM's asymmetric padding,
    which the checkpoints were trained with). (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # (B, C, H, W) -> (B, C, H + 1, W + 1)
        return self.conv(x)


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution (keys block_1, attn_1, block_2)."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, eps)
        self.attn_1 = AttnBlock(channels, groups, eps)
        self.block_2 = ResnetBlock(channels, channels, groups, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution level: ResnetBlocks (`block`), then `downsample` unless it is the last."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample  # None registers no parameters, so no keys for the last level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution level: ResnetBlocks (`block`), then `upsample` unless it is level 0."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """(B, 3, H, W) images -> (B, 2 * latent_channels, H/f, W/f) posterior mean and log-variance."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        base, groups, eps = cfg.base_channels, cfg.norm_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)
        ch = base
        levels = []
        for i, mult in enumerate(cfg.channel_mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, base * mult, groups, eps))
                ch = base * mult
            last = i == len(cfg.channel_mult) - 1
            levels.append(DownLevel(blocks, None if last else Downsample(ch)))
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(ch, groups, eps)
        self.norm_out = GroupNorm32(groups, ch, eps=eps)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, 3, h*f, w*f) images (roughly [-1, 1], not clamped)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        base, groups, eps = cfg.base_channels, cfg.norm_groups, cfg.norm_eps
        ch = base * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, groups, eps)
        # Built deepest level first (that is the order data flows), stored by level index.
        levels: list[UpLevel] = []
        for i in reversed(range(len(cfg.channel_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, base * cfg.channel_mult[i], groups, eps))
                ch = base * cfg.channel_mult[i]
            levels.insert(0, UpLevel(blocks, Upsample(ch) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = GroupNorm32(groups, ch, eps=eps)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element.

    mean, logvar, std: (B, latent_channels, h, w). logvar is clamped to [-30, 20] as in LDM, which
    keeps exp() finite for untrained or fine-tuned encoders.
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, 2c, h, w) -> 2 x (B, c, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * noise. `generator` may be a list with one generator per batch row, so a
        row's sample does not depend on the batch it was encoded in."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != self.mean.shape[0]:
                raise ValueError(f"DiagonalGaussian.sample: {len(generator)} generators for a batch "
                                 f"of {self.mean.shape[0]}")
            noise = torch.cat([torch.randn(self.mean.shape[1:], generator=g, device=self.mean.device,
                                           dtype=self.mean.dtype)[None] for g in generator])
        else:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                                dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class AutoencoderKL(nn.Module):
    """SD's VAE: encode(images) -> DiagonalGaussian, decode(unscaled latents) -> images.

    Build on the meta device and load with `load_state_dict(sd, strict=True, assign=True)`.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # 1x1 convs between the autoencoder and the latent space (LDM's embed_dim = z_channels).
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images: (B, 3, H, W) in [-1, 1], H and W multiples of `downsample_factor`.
        Returns the posterior over UNSCALED latents (B, latent_channels, H/f, W/f)."""
        factor = self.config.downsample_factor
        if images.shape[-2] % factor or images.shape[-1] % factor:
            raise ValueError(f"AutoencoderKL.encode: image size {tuple(images.shape[-2:])} must be a "
                             f"multiple of {factor} (the VAE downsamples {factor}x)")
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, latent_channels, h, w) UNSCALED latents (divide SD latents by scaling_factor).
        Returns images (B, 3, h*f, w*f), roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

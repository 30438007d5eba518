"""The Stable Diffusion denoising UNet (LDM `openaimodel.UNetModel` + `attention.SpatialTransformer`).

Module names reproduce the original single-file checkpoint keys with `model.diffusion_model.`
stripped, so `UNet(UNetConfig.sd15()).load_state_dict(ldm_unet_tensors, strict=True)` just works:

    time_embed.{0,2}                          timestep MLP
    input_blocks.0.0                          conv_in
    input_blocks.N.0 / .1                     ResBlock / SpatialTransformer, or Downsample (.op)
    middle_block.{0,1,2}                      ResBlock, SpatialTransformer, ResBlock
    output_blocks.N.{0,1,2}                   ResBlock, SpatialTransformer?, Upsample (.conv)?
    out.{0,2}                                 GroupNorm, (SiLU), conv_out

Shapes for SD at 512x512 (latents 64x64): 320 channels at 64x64, 640 at 32x32, 1280 at 16x16 and
8x8. The encoder half (time_embed, input_blocks, middle_block) is built by module-level functions
that ControlNet reuses, and its blocks (ResBlock, SpatialTransformer, Downsample, TimestepSequential)
are importable from here.

Notation: B batch, C channels, H/W latent height/width, L = H*W tokens, T context tokens (77),
D context width (768 SD1, 1024 SD2), emb the (B, 4*model_channels) timestep embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.layers import GroupNorm32, TokenConv1x1, Upsample, attention, timestep_embedding, zero_module

# The transformer's GroupNorm uses a fixed eps in LDM (`Normalize`) and diffusers alike,
# independent of the ResBlock eps.
TRANSFORMER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the UNet. Defaults are SD 1.x; see the presets below."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with a SpatialTransformer, 0 = full res
    num_heads: int | None = 8  # SD 1.x: a fixed number of heads per level ...
    head_dim: int | None = None  # ... SD 2.x: a fixed head width (64); exactly one of the two is set
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_proj: bool = False  # SD 2.x: proj_in/proj_out are Linear, SD 1.x: 1x1 Conv2d
    norm_groups: int = 32
    norm_eps: float = 1e-5

    def __post_init__(self):
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(f"UNetConfig: set exactly one of num_heads ({self.num_heads}) "
                             f"and head_dim ({self.head_dim})")
        for level in self.attention_levels:
            if not 0 <= level < len(self.channel_mult):
                raise ValueError(f"UNetConfig.attention_levels: level {level} outside "
                                 f"0..{len(self.channel_mult) - 1} (channel_mult {self.channel_mult})")
        for mult in self.channel_mult:
            channels = self.model_channels * mult
            if channels % self.norm_groups:
                raise ValueError(f"UNetConfig.norm_groups {self.norm_groups} does not divide "
                                 f"{channels} channels (model_channels * {mult})")
            if channels % (self.num_heads or self.head_dim):
                raise ValueError(f"UNetConfig: {channels} channels not divisible by "
                                 f"num_heads/head_dim {self.num_heads or self.head_dim}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def downsample_factor(self) -> int:
        """Latent H and W must be multiples of this (8 for SD: 64 pixels through the 8x VAE)."""
        return 2 ** (len(self.channel_mult) - 1)

    def heads_for(self, channels: int) -> int:
        """Attention heads of a transformer with `channels` channels."""
        return self.num_heads if self.num_heads is not None else channels // self.head_dim

    @classmethod
    def sd15(cls) -> UNetConfig:
        """SD 1.x (v1-inference.yaml): 8 heads everywhere, CLIP ViT-L context 768, conv proj."""
        return cls()

    @classmethod
    def sd21(cls) -> UNetConfig:
        """SD 2.x (v2-inference[-v].yaml): 64-dim heads, OpenCLIP ViT-H context 1024, linear proj."""
        return cls(num_heads=None, head_dim=64, context_dim=1024, use_linear_proj=True)

    @classmethod
    def tiny(cls) -> UNetConfig:
        """SD1-style test network (~1.4M parameters): two levels, attention at the lower one only,
        as in diffusers' tiny pipeline-test UNets; context 32 = TextEncoderConfig.tiny().width."""
        return cls(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(1,),
                   num_heads=2, context_dim=32, norm_groups=8)

    @classmethod
    def tiny_sd2(cls) -> UNetConfig:
        """SD2-style twin of `tiny`: 16-dim heads (2 at 32 channels, 4 at 64) and linear proj."""
        return cls(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(1,),
                   num_heads=None, head_dim=16, context_dim=32, use_linear_proj=True, norm_groups=8)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the timestep embedding as a per-channel bias, twice, with a skip.

    x (B, C_in, H, W), emb (B, E) -> (B, C_out, H, W). The Sequential indices (in_layers.2,
    emb_layers.1, out_layers.3) are the LDM key names; index 2 of out_layers is LDM's dropout slot
    (SD trains and samples with dropout 0), kept as Identity so out_layers.3 keeps its name.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, eps: float):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, in_channels, eps=eps),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels, eps=eps),
            nn.SiLU(),
            nn.Identity(),
            # Zero-initialised as in LDM: a fresh block is the identity on its input.
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        # A 1x1 conv only where the channel count changes (LDM: use_conv=False).
        self.skip_connection = (nn.Identity() if in_channels == out_channels
                                else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C_out) -> (B, C_out, 1, 1), broadcast
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of x over itself (context None) or over the text context.

    x (B, L, C), context (B, T, D) -> (B, L, C). q/k/v have no bias, as in LDM.
    """

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        context_dim = query_dim if context_dim is None else context_dim
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        # LDM's to_out is Sequential(Linear, Dropout(0)); only the Linear carries weights (to_out.0).
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, L, C = x.shape
        h = self.heads
        q = self.to_q(x).view(B, L, h, C // h).transpose(1, 2)  # (B, L, C) -> (B, h, L, C/h)
        k = self.to_k(context).view(B, -1, h, C // h).transpose(1, 2)  # (B, T, C) -> (B, h, T, C/h)
        v = self.to_v(context).view(B, -1, h, C // h).transpose(1, 2)  # (B, T, C) -> (B, h, T, C/h)
        out = attention(q, k, v)  # (B, h, L, C/h)
        # Free when the kernel writes (B, L, h, C/h)-major memory, as torch's SDPA kernels do.
        out = out.transpose(1, 2).reshape(B, L, C)  # (B, h, L, C/h) -> (B, L, C)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Linear to 2*inner, then value * gelu(gate) (Shazeer 2020). (B, L, C) -> (B, L, inner)."""

    def __init__(self, dim_in: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, L, 2*inner) -> 2 x (B, L, inner) views
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width. (B, L, C) -> (B, L, C).

    `net` indices are the LDM names: net.0 GEGLU (net.0.proj), net.1 the dropout slot, net.2 Linear.
    """

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward; all residual.

    x (B, L, C), context (B, T, D) -> (B, L, C). Submodules are created in LDM's order (attn1,
    ff, attn2, norm1..3) so state_dict() lists keys in the same order as the checkpoint files.
    """

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, with an outer residual.

    x (B, C, H, W), context (B, T, D) -> (B, C, H, W). SD 1.x checkpoints hold proj_in/proj_out
    as 1x1 convs ([C, C, 1, 1]), SD 2.x as Linears ([C, C], `use_linear_proj`); the maths is the
    same, so both kinds are applied to the tokens (TokenConv1x1 keeps the conv's keys and shape).
    proj_out is zero-initialised as in LDM.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int,
                 use_linear_proj: bool, groups: int):
        super().__init__()
        self.norm = GroupNorm32(groups, channels, eps=TRANSFORMER_NORM_EPS)
        if use_linear_proj:
            self.proj_in = nn.Linear(channels, channels)
        else:
            self.proj_in = TokenConv1x1(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth))
        if use_linear_proj:
            self.proj_out = zero_module(nn.Linear(channels, channels))
        else:
            self.proj_out = zero_module(TokenConv1x1(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # A transposed view, no copy: proj_in's GEMM reads it as is and writes contiguous tokens.
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, C, H, W) -> (B, HW, C)
        # Both projection kinds act on the tokens (a 1x1 conv on the map is a Linear on its tokens):
        # on CPU a plain GEMM instead of a 1x1 convolution with its layout conversions, and no copy
        # back to NCHW for proj_out.
        h = self.proj_in(h)  # (B, HW, C) contiguous
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h)  # (B, HW, C)
        return x + h.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, HW, C) -> (B, C, H, W), a strided view


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (LDM name `op`). (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepSequential(nn.Sequential):
    """A Sequential whose children take what they need: ResBlocks the timestep embedding,
    SpatialTransformers the text context, everything else only x (LDM's TimestepEmbedSequential).

    x (B, C, H, W), emb (B, E), context (B, T, D) -> (B, C', H', W').
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------
# Builders shared with ControlNet (which copies the encoder half of the UNet)
# ----------------------------------------------------------------------------------------------

def build_time_embed(cfg: UNetConfig) -> nn.Sequential:
    """Linear(mc, 4mc), SiLU, Linear(4mc, 4mc): keys time_embed.0 / time_embed.2."""
    return nn.Sequential(nn.Linear(cfg.model_channels, cfg.time_embed_dim), nn.SiLU(),
                         nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim))


def _transformer(cfg: UNetConfig, channels: int) -> SpatialTransformer:
    return SpatialTransformer(channels, cfg.heads_for(channels), cfg.context_dim, cfg.transformer_depth,
                              cfg.use_linear_proj, cfg.norm_groups)


def build_input_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The encoder's blocks (conv_in, then per level ResBlock[+transformer] x n, then Downsample)
    and the output channel count of each, which is also the channel count of its skip connection.
    SD: 12 blocks, channels [320]*4 + [640]*3 + [1280]*5 (with the middle block: 13 skip residuals).
    """
    mc = cfg.model_channels
    blocks = [TimestepSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))]
    channels = [mc]
    ch = mc
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, mult * mc, cfg.time_embed_dim, cfg.norm_groups, cfg.norm_eps)]
            ch = mult * mc
            if level in cfg.attention_levels:
                layers.append(_transformer(cfg, ch))
            blocks.append(TimestepSequential(*layers))
            channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepSequential(Downsample(ch)))
            channels.append(ch)
    return nn.ModuleList(blocks), channels


def build_middle_block(cfg: UNetConfig) -> TimestepSequential:
    """ResBlock, SpatialTransformer, ResBlock at the lowest resolution (always with attention)."""
    ch = cfg.model_channels * cfg.channel_mult[-1]
    return TimestepSequential(
        ResBlock(ch, ch, cfg.time_embed_dim, cfg.norm_groups, cfg.norm_eps),
        _transformer(cfg, ch),
        ResBlock(ch, ch, cfg.time_embed_dim, cfg.norm_groups, cfg.norm_eps),
    )


def build_output_blocks(cfg: UNetConfig, skip_channels: list[int]) -> nn.ModuleList:
    """The decoder's blocks, deepest level first: num_res_blocks + 1 per level (each consumes one
    skip connection), a transformer where the level has attention, and an Upsample closing every
    level but the top one. SD: 12 blocks.
    """
    mc = cfg.model_channels
    skips = list(skip_channels)
    ch = mc * cfg.channel_mult[-1]
    blocks = []
    for level in reversed(range(len(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            out_ch = mc * cfg.channel_mult[level]
            # The input is the running features concatenated with the popped skip (channels add).
            layers: list[nn.Module] = [ResBlock(ch + skips.pop(), out_ch, cfg.time_embed_dim,
                                                cfg.norm_groups, cfg.norm_eps)]
            ch = out_ch
            if level in cfg.attention_levels:
                layers.append(_transformer(cfg, ch))
            if level != 0 and i == cfg.num_res_blocks:
                layers.append(Upsample(ch))
            blocks.append(TimestepSequential(*layers))
    return nn.ModuleList(blocks)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class CheckpointedBlocks:
    """The opt-in gradient-checkpointing switch of the UNet and the control copy: `_run` calls a
    TimestepSequential block, recomputing its activations in backward when the switch is on."""

    gradient_checkpointing: bool = False

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (less memory,
        ~30% more compute). Only active while autograd is recording."""
        self.gradient_checkpointing = enabled

    def _run(self, block: TimestepSequential, h: torch.Tensor, emb: torch.Tensor,
             context: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # Non-reentrant checkpointing: works with inputs that do not require grad (frozen
            # latents) and with torch.compile; RNG state is restored for the recompute.
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)


class UNet(CheckpointedBlocks, nn.Module):
    """eps (or v) prediction network: UNet(config)(x, t, context, control=None).

    Build on the meta device and load with `load_state_dict(sd, strict=True, assign=True)`:
    there are no buffers, and nothing computed at construction time is needed by forward.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.time_embed = build_time_embed(config)
        self.input_blocks, skip_channels = build_input_blocks(config)
        self.middle_block = build_middle_block(config)
        self.output_blocks = build_output_blocks(config, skip_channels)
        self.out = nn.Sequential(
            GroupNorm32(config.norm_groups, config.model_channels, eps=config.norm_eps),
            nn.SiLU(),
            zero_module(nn.Conv2d(config.model_channels, config.out_channels, 3, padding=1)),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                control: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Predict the noise (or v) of latents x at timesteps t given the text context.

        x: (B, in_channels, H, W) latents, H and W multiples of `config.downsample_factor`.
        t: (B,) timesteps in [0, 1000), int or float (a 0-dim tensor is broadcast over the batch).
        context: (B, T, context_dim) text-encoder output.
        control: None, or len(input_blocks) + 1 residuals in ControlNet order: one per input
            block (added to that block's skip connection), then the middle block's (added to the
            middle-block output) LAST.
        Returns (B, out_channels, H, W) in x's dtype.
        """
        factor = self.config.downsample_factor
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"UNet: latent size {tuple(x.shape[-2:])} must be a multiple of {factor} "
                             f"(image H and W multiples of {8 * factor} through the 8x VAE)")
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"UNet: control must hold {len(self.input_blocks) + 1} residuals "
                             f"({len(self.input_blocks)} input blocks + middle), got {len(control)}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])  # () -> (B,)
        # The sinusoid is float32 (timesteps up to 1000 need it); the MLP runs in the model dtype.
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))  # (B, 4mc)

        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        if control is not None:
            h = h + control[-1]
            skips = [s + c for s, c in zip(skips, control[:-1])]
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C, H, W) + (B, C_skip, H, W) -> (B, C + C_skip, H, W)
            h = self._run(block, h, emb, context)
        return self.out(h)

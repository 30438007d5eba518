"""Layers shared by the UNet, the VAE and (through the UNet) the ControlNet.

This is the file to edit when porting to other hardware: attention is computed in exactly one
function (`attention`), group normalisation in exactly one class (`GroupNorm32`), layer
normalisation in one class (`LayerNorm32`, the text encoder's), and a 1x1 convolution applied to
tokens in one class (`TokenConv1x1`). Everything else in model/ is plain nn.Conv2d, nn.Linear,
nn.LayerNorm and elementwise maths, each reached through its module's own forward, so a port may
swap any module for its own.

Precision policy (DESIGN.md): weights may be bf16/fp16 for inference, but GroupNorm statistics
and the attention softmax are always accumulated in float32. SD 2.x in particular overflows in
fp16 otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention, softmax(q k^T / sqrt(d) + mask) v.

    q: (B, heads, Lq, d); k, v: (B, heads, Lk, d); mask: None, or a bool tensor broadcastable to
    (B, heads, Lq, Lk) (True = attend) or an additive float tensor of that shape.
    Returns (B, heads, Lq, d) in the dtype of q.

    The single attention entry point of the project. torch's fused kernels (flash, memory-efficient,
    the CPU flash kernel) keep the running max and sum of the softmax in float32 even for bf16/fp16
    inputs, which is our "softmax in float32" rule; a port to hardware without SDPA replaces this
    body (for example with an explicit float32 softmax) and nothing else.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, Lq, d)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics and affine transform are computed in float32.

    Input (B, C, ...) of any float dtype; the output has the input's dtype. With float32 inputs and
    weights this is exactly nn.GroupNorm (`.float()` is then a no-op, no copy is made).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upcast the affine parameters too: a bf16 model holds bf16 weights, and F.group_norm wants
        # one dtype. The mean/variance of a 32-channel group in bf16 would lose ~3 significant digits.
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and returned in the input dtype.

    In bf16/fp16 the variance of a 768/1024-wide row loses too many bits; CLIP's own fp16 code
    (open_clip LayerNormFp32, OpenAI CLIP) upcasts here too. Same parameters and keys as nn.LayerNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class TokenConv1x1(nn.Conv2d):
    """A 1x1 convolution that is applied to tokens: (B, L, C_in) -> (B, L, C_out).

    The checkpoints hold these projections as 1x1 convs (weight [C_out, C_in, 1, 1]: LDM's SD 1.x
    proj_in/proj_out, the VAE's q/k/v/proj_out), and a 1x1 conv on a map is a Linear on its
    tokens. Running it as one GEMM on the token view is what attention wants anyway (no layout
    conversions, no transposed copies); the parameters and state-dict keys stay those of the
    nn.Conv2d it subclasses, so checkpoints load unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # weight [C_out, C_in, 1, 1] -> [C_out, C_in]: a view, no copy
        return F.linear(tokens, self.weight.flatten(1), self.bias)  # (B, L, C_in) -> (B, L, C_out)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it.

    Used where the original LDM initialises a residual branch's last layer to zero, so a freshly
    built block starts as the identity (and, in ControlNet, the control copy starts with no effect).
    Works on meta tensors too (zero_ is then a no-op), so meta construction stays cheap.
    """
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding in [cos, sin] order, as in LDM (openaimodel.timestep_embedding).

    t: (B,) integer or fractional timesteps. Returns (B, dim) float32.
    Frequency i (of dim // 2) is max_period ** (-i / (dim // 2)), so the same values come out as
    diffusers' `get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)`.
    An odd `dim` gets one zero column at the end.
    """
    half = dim // 2
    # Same operation order as the reference, so float32 results agree bit for bit.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]  # (B, 1) * (1, half) -> (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))  # (B, dim - 1) -> (B, dim)
    return embedding


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution.

    (B, C, H, W) -> (B, C, 2H, 2W). The same block (parameter name `conv`) in the UNet's output
    blocks and the VAE decoder, so both load the LDM keys `...upsample.conv.*` / `output_blocks.N.k.conv.*`.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(x)

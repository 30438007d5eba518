"""The CLIP text encoder that conditions Stable Diffusion: SD 1.x CLIP ViT-L/14, SD 2.x OpenCLIP ViT-H/14.

Both are the same network, a pre-LayerNorm transformer over 77 tokens with a causal mask (GPT-2
style), as in Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision" (2021), section 2.4. SD uses the per-token hidden states, not CLIP's pooled embedding:

    x = token_embedding(tokens) + position_embedding(0..76)        (B, 77, width)
    x = layers[0 .. n_run - 1](x)      pre-LN blocks, causal self-attention
    context = final_layer_norm(x)                                  (B, 77, width) -> UNet cross-attention

| family | network            | width | layers | heads | activation | output layer      | pad id |
|--------|--------------------|-------|--------|-------|------------|-------------------|--------|
| SD 1.x | CLIP ViT-L/14      | 768   | 12     | 12    | quick_gelu | last (-1)         | 49407  |
| SD 2.x | OpenCLIP ViT-H/14  | 1024  | 24     | 16    | gelu       | penultimate (-2)  | 0      |

SD 2.x (`FrozenOpenCLIPEmbedder(layer="penultimate")`) stops one block early and still applies the
final LayerNorm; the last block's weights stay in the file and in this module so checkpoints load
strictly, but forward never runs it. Its `text_projection` and `logit_scale` (used by CLIP's
contrastive head, not by SD) are kept as parameters for the same reason.

Module names are the SD 1.x checkpoint names with `cond_stage_model.transformer.text_model.`
stripped (`embeddings.token_embedding.weight`, `encoder.layers.0.self_attn.q_proj.weight`,
`final_layer_norm.bias`, ...); weights/ maps OpenCLIP and diffusers layouts onto them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from model.layers import LayerNorm32, attention

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408
    max_length: int = 77  # context length: BOS + 75 prompt tokens + EOS
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP, exact erf form)
    output_layer: int = -1  # -1 last block, -2 penultimate (SD 2.x); final LayerNorm applied after either
    pad_token_id: int = 49407  # what the tokenizer pads with: EOS for SD 1.x, 0 ("!") for SD 2.x
    norm_eps: float = 1e-5
    projection_dim: int | None = None  # SD 2.x files hold text_projection (width, projection_dim)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"TextEncoderConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.width % self.heads:
            raise ValueError(f"TextEncoderConfig.width {self.width} is not divisible by heads {self.heads}")
        if not -self.layers <= self.output_layer <= -1:
            raise ValueError(f"TextEncoderConfig.output_layer must be in [-{self.layers}, -1] "
                             f"(-1 = last block), got {self.output_layer}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"TextEncoderConfig.pad_token_id {self.pad_token_id} is outside the vocabulary "
                             f"[0, {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def layers_run(self) -> int:
        """How many blocks forward runs: all of them for output_layer -1, one fewer for -2, ..."""
        return self.layers + 1 + self.output_layer

    @classmethod
    def clip_l(cls) -> "TextEncoderConfig":
        """SD 1.x: OpenAI CLIP ViT-L/14 text tower, last layer."""
        return cls()

    @classmethod
    def openclip_h(cls) -> "TextEncoderConfig":
        """SD 2.x: OpenCLIP ViT-H/14 (LAION-2B) text tower, penultimate layer, padded with 0."""
        return cls(width=1024, layers=24, heads=16, mlp_dim=4096, activation="gelu", output_layer=-2,
                   pad_token_id=0, projection_dim=1024)

    @classmethod
    def tiny(cls) -> "TextEncoderConfig":
        """SD 1.x-style toy for tests: width 32 to match the tiny UNet's context_dim."""
        return cls(width=32, layers=2, heads=4, mlp_dim=37)

    @classmethod
    def tiny_sd2(cls) -> "TextEncoderConfig":
        """SD 2.x-style toy: gelu, penultimate of 3 blocks, pad 0, with the projection parameters."""
        return cls(width=32, layers=3, heads=4, mlp_dim=37, activation="gelu", output_layer=-2,
                   pad_token_id=0, projection_dim=32)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU that OpenAI CLIP was trained with.

    SD 1.x weights were trained with this approximation, so it is kept rather than exact GELU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_length, config.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) int64, L <= max_length -> (B, L, width)."""
        # Positions come from arange here, not from a buffer: checkpoints disagree on whether a
        # position_ids buffer exists (and merged files store it as drifted floats), so we hold none.
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # (L,)
        return self.token_embedding(tokens) + self.position_embedding(positions)  # (B, L, W) + (L, W)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (the CLIP checkpoint layout).

    OpenCLIP stores q, k and v fused as one in_proj (3 * width, width); weights/ splits it.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.heads = config.heads
        width = config.width
        # Declared in checkpoint order (k, v, q, out) so state_dict() lists keys as SD 1.x files do.
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, width), mask (L, L) bool, True where attention is allowed -> (B, L, width)."""
        B, L, W = x.shape
        # (B, L, W) -> (B, L, heads, d) -> (B, heads, L, d)
        q = self.q_proj(x).view(B, L, self.heads, W // self.heads).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.heads, W // self.heads).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.heads, W // self.heads).transpose(1, 2)
        out = attention(q, k, v, mask=mask)  # (B, heads, L, d), scaled by 1/sqrt(d)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, W))  # (B, heads, L, d) -> (B, L, W)


class MLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.activation = QuickGELU() if config.activation == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(config.mlp_dim, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))  # (B, L, W) -> (B, L, mlp_dim) -> (B, L, W)


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.self_attn = SelfAttention(config)
        self.layer_norm1 = LayerNorm32(config.width, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = LayerNorm32(config.width, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, width), mask (L, L) bool -> (B, L, width)."""
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """The stack of blocks; a module of its own only so keys read `encoder.layers.{i}.*`."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers))


class TextEncoder(nn.Module):
    """CLIP text transformer returning per-token hidden states for UNet cross-attention.

    forward(tokens (B, L) int64, L <= max_length, normally 77) -> (B, L, width) in the module's dtype.

    With output_layer = -2 the last block is held but never run, so its parameters get no gradient:
    when the text encoder is trained under DDP, either freeze them or use find_unused_parameters.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = LayerNorm32(config.width, eps=config.norm_eps)
        if config.projection_dim is not None:
            # Only for round-tripping SD 2.x files: CLIP's pooled projection and contrastive
            # temperature. Orientation as OpenCLIP stores it: pooled (B, width) @ text_projection.
            self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim))
            self.logit_scale = nn.Parameter(torch.empty(()))
        self._init_weights()

    def _init_weights(self) -> None:
        """CLIP's initialisation (small embeddings, projection std width^-0.5, temperature 1/0.07),
        so a randomly built model behaves sensibly in tests and toy training; real runs load weights.
        Skipped on the meta device, where there is nothing to initialise (loaders assign real tensors)."""
        if self.embeddings.token_embedding.weight.is_meta:
            return
        nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)
        if self.config.projection_dim is not None:
            nn.init.normal_(self.text_projection, std=self.config.width ** -0.5)
            nn.init.constant_(self.logit_scale, math.log(1 / 0.07))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) int64 ids in [0, vocab_size) -> hidden states (B, L, width)."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"TextEncoder expects integer token ids of shape (B, L), got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.config.max_length:
            raise ValueError(f"TextEncoder holds {self.config.max_length} positions, got {tokens.shape[1]} tokens")
        L = tokens.shape[1]
        x = self.embeddings(tokens)  # (B, L, W)
        # Causal mask (L, L), True on and below the diagonal: token i sees tokens 0..i only. Built
        # here rather than at __init__ so the module constructs on the meta device and holds no buffer.
        causal = torch.ones(L, L, dtype=torch.bool, device=tokens.device).tril()
        for layer in self.encoder.layers[: self.config.layers_run]:
            x = layer(x, causal)
        return self.final_layer_norm(x)

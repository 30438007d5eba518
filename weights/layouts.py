"""Key tables: how our modules' keys are named in LDM single files, diffusers folders and OpenCLIP.

Our state-dict keys are the LDM single-file keys with the component prefix stripped, so every LDM
layout is a bare prefix. diffusers and OpenCLIP names go through the template tables below
("{}" fields are block indices, filled from the config), plus three explicit transforms:
VAE attention conv 1x1 <-> linear, OpenCLIP fused qkv, and the flat LDM EMA names.

Block numbering (UNet, L levels, R res blocks per level):
    LDM input_blocks.n, n = 1 + level * (R + 1) + j   <->  diffusers down_blocks.level.resnets.j
    LDM output_blocks.n, n = i * (R + 1) + j          <->  diffusers up_blocks.i (level L-1-i)
    VAE decoder.up.level                              <->  decoder.up_blocks.(L-1-level)
"""
from __future__ import annotations

from weights.keymap import CONV1X1_FROM_LINEAR, SPLIT_QKV, Layout, Rule, expand, join, nest

# ---------------------------------------------------------------------------------------------
# Prefixes of the components inside an LDM single file (SD 1.x / 2.x).
LDM_UNET = "model.diffusion_model."
LDM_UNET_EMA = "model_ema."          # + "diffusion_model" + our key without dots
LDM_VAE = "first_stage_model."
LDM_CLIP = "cond_stage_model.transformer.text_model."   # SD 1.x (transformers CLIPTextModel)
LDM_CLIP_NAI = "cond_stage_model.transformer."          # some merges drop `text_model.`
LDM_OPENCLIP = "cond_stage_model.model."                 # SD 2.x (OpenCLIP ViT-H/14 text tower)
TRANSFORMERS4_TEXT = "text_model."                        # transformers 4.x CLIPTextModel files

# ---------------------------------------------------------------------------------------------
# Keys real files carry that no module of ours holds. They are ignored on load (and counted by
# `inspect`), never silently: anything else unknown is an error.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)
KNOWN_EXTRAS: dict[str, tuple[str, ...]] = {
    # name -> exact keys, or prefixes when the entry ends with "." or "*" (the "*" is dropped)
    "schedule buffers": SCHEDULE_BUFFERS,          # recomputed by model/schedule.py
    "logvar": ("logvar",),                         # ControlNet's ldm fork registers it
    "EMA bookkeeping": ("model_ema.decay", "model_ema.num_updates"),
    "position_ids": (LDM_CLIP + "embeddings.position_ids", LDM_CLIP_NAI + "embeddings.position_ids",
                     TRANSFORMERS4_TEXT + "embeddings.position_ids", "embeddings.position_ids"),
    "VAE training loss": ("loss.", LDM_VAE + "loss."),   # LPIPS / discriminator of VAE training
}
# Conditional extras: the UNet weights that a load did not choose.
EMA_WEIGHTS = ("model_ema.diffusion_model*",)    # ignored when ema=False
NON_EMA_UNET = (LDM_UNET,)                        # ignored when ema=True


def matches(key: str, patterns: tuple[str, ...]) -> bool:
    """Exact names, or prefixes for patterns ending with "." or "*"."""
    for pattern in patterns:
        if pattern.endswith("*"):
            if key.startswith(pattern[:-1]):
                return True
        elif pattern.endswith("."):
            if key.startswith(pattern):
                return True
        elif key == pattern:
            return True
    return False


def known_extra(key: str, ema: bool) -> str | None:
    """The KNOWN_EXTRAS group a file key belongs to, or None."""
    for group, patterns in KNOWN_EXTRAS.items():
        if matches(key, patterns):
            return group
    if not ema and matches(key, EMA_WEIGHTS):
        return "EMA weights (ema=False)"
    if ema and matches(key, NON_EMA_UNET):
        return "non-EMA UNet weights (ema=True)"
    return None


# ---------------------------------------------------------------------------------------------
# UNet: ours (LDM) <-> diffusers UNet2DConditionModel.
UNET_RESBLOCK = (  # ResBlock (LDM) <-> ResnetBlock2D (diffusers)
    ("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"),
)
UNET_TOP = (
    ("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
)
# SpatialTransformer internals (norm, proj_in, transformer_blocks.*, proj_out) keep their names.
UNET_BLOCKS = {
    "down_res": ("input_blocks.{n}.0", "down_blocks.{level}.resnets.{j}"),
    "down_attn": ("input_blocks.{n}.1", "down_blocks.{level}.attentions.{j}"),
    "down_sample": ("input_blocks.{n}.0.op", "down_blocks.{level}.downsamplers.0.conv"),
    "mid_res": ("middle_block.{m}", "mid_block.resnets.{j}"),
    "mid_attn": ("middle_block.1", "mid_block.attentions.0"),
    "up_res": ("output_blocks.{n}.0", "up_blocks.{i}.resnets.{j}"),
    "up_attn": ("output_blocks.{n}.1", "up_blocks.{i}.attentions.{j}"),
    "up_sample": ("output_blocks.{n}.{u}.conv", "up_blocks.{i}.upsamplers.0.conv"),
}


def _pair(name: str, table: dict[str, tuple[str, str]], **indices: object) -> tuple[str, str]:
    ours, theirs = table[name]
    return expand(ours, **indices), expand(theirs, **indices)


def unet_diffusers_layout(config) -> Layout:
    """Our UNet keys <-> diffusers `unet/diffusion_pytorch_model.*` for a UNetConfig."""
    levels, res = len(config.channel_mult), config.num_res_blocks
    attn = set(config.attention_levels)
    pairs = list(UNET_TOP)
    for level in range(levels):
        for j in range(res):
            n = 1 + level * (res + 1) + j
            pairs += nest(_pair("down_res", UNET_BLOCKS, n=n, level=level, j=j), UNET_RESBLOCK)
            if level in attn:
                pairs.append(_pair("down_attn", UNET_BLOCKS, n=n, level=level, j=j))
        if level < levels - 1:
            pairs.append(_pair("down_sample", UNET_BLOCKS, n=(level + 1) * (res + 1), level=level))
    for m, j in ((0, 0), (2, 1)):
        pairs += nest(_pair("mid_res", UNET_BLOCKS, m=m, j=j), UNET_RESBLOCK)
    pairs.append(UNET_BLOCKS["mid_attn"])
    for i in range(levels):
        has_attn = (levels - 1 - i) in attn
        for j in range(res + 1):
            n = i * (res + 1) + j
            pairs += nest(_pair("up_res", UNET_BLOCKS, n=n, i=i, j=j), UNET_RESBLOCK)
            if has_attn:
                pairs.append(_pair("up_attn", UNET_BLOCKS, n=n, i=i, j=j))
        if i < levels - 1:
            pairs.append(_pair("up_sample", UNET_BLOCKS, n=i * (res + 1) + res, u=2 if has_attn else 1, i=i))
    return Layout("diffusers-unet", renames=tuple(pairs))


def unet_ema_layout() -> Layout:
    """LDM EMA copies: `model_ema.diffusion_model` + our key with the dots removed."""
    return Layout("ldm-ema", renames=(("", "diffusion_model"),), prefix=LDM_UNET_EMA, flatten=True)


# ---------------------------------------------------------------------------------------------
# VAE: ours (LDM) <-> diffusers AutoencoderKL.
VAE_RESBLOCK = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                ("nin_shortcut", "conv_shortcut"))
VAE_TOP = (
    ("encoder.conv_in", "encoder.conv_in"), ("encoder.norm_out", "encoder.conv_norm_out"),
    ("encoder.conv_out", "encoder.conv_out"), ("decoder.conv_in", "decoder.conv_in"),
    ("decoder.norm_out", "decoder.conv_norm_out"), ("decoder.conv_out", "decoder.conv_out"),
    ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv"),
)
VAE_BLOCKS = {
    "enc_res": ("encoder.down.{level}.block.{j}", "encoder.down_blocks.{level}.resnets.{j}"),
    "enc_down": ("encoder.down.{level}.downsample.conv", "encoder.down_blocks.{level}.downsamplers.0.conv"),
    "mid_res": ("{part}.mid.block_{b}", "{part}.mid_block.resnets.{j}"),
    "mid_attn": ("{part}.mid.attn_1", "{part}.mid_block.attentions.0"),
    "dec_res": ("decoder.up.{level}.block.{j}", "decoder.up_blocks.{i}.resnets.{j}"),
    "dec_up": ("decoder.up.{level}.upsample.conv", "decoder.up_blocks.{i}.upsamplers.0.conv"),
}
# Mid-block attention leaves; diffusers < 0.14 (which wrote the SD 1.5 repo) used the legacy names.
VAE_ATTENTION = {
    "current": (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")),
    "legacy": (("norm", "group_norm"), ("q", "query"), ("k", "key"), ("v", "value"), ("proj_out", "proj_attn")),
}


def vae_diffusers_layout(config, attention: str = "current") -> Layout:
    """Our VAE keys <-> diffusers `vae/diffusion_pytorch_model.*` (current or legacy attention names)."""
    levels, res = len(config.channel_mult), config.num_res_blocks
    pairs = list(VAE_TOP)
    for level in range(levels):
        for j in range(res):
            pairs += nest(_pair("enc_res", VAE_BLOCKS, level=level, j=j), VAE_RESBLOCK)
        if level < levels - 1:
            pairs.append(_pair("enc_down", VAE_BLOCKS, level=level))
    for part in ("encoder", "decoder"):
        for b, j in ((1, 0), (2, 1)):
            pairs += nest(_pair("mid_res", VAE_BLOCKS, part=part, b=b, j=j), VAE_RESBLOCK)
        pairs += nest(_pair("mid_attn", VAE_BLOCKS, part=part), VAE_ATTENTION[attention])
    for i in range(levels):
        level = levels - 1 - i
        for j in range(res + 1):  # the decoder has one more res block per level
            pairs += nest(_pair("dec_res", VAE_BLOCKS, level=level, i=i, j=j), VAE_RESBLOCK)
        if i < levels - 1:
            pairs.append(_pair("dec_up", VAE_BLOCKS, level=level, i=i))
    reshapes = {join(part, "mid.attn_1", name, "weight"): CONV1X1_FROM_LINEAR
                for part in ("encoder", "decoder") for name in ("q", "k", "v", "proj_out")}
    return Layout(f"diffusers-vae-{attention}", renames=tuple(pairs), reshapes=reshapes)


# ---------------------------------------------------------------------------------------------
# Text encoder: ours = transformers CLIPTextModel names (`text_model.` stripped); OpenCLIP below.
def transformers_text_layout(version: int) -> Layout:
    """transformers 4.x files have the `text_model.` prefix (+ position_ids); 5.x files have neither."""
    return Layout(f"transformers{version}-text", prefix=TRANSFORMERS4_TEXT if version == 4 else "")


OPENCLIP_TOP = (
    ("embeddings.token_embedding", "token_embedding"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm", "ln_final"), ("text_projection", "text_projection"), ("logit_scale", "logit_scale"),
)
OPENCLIP_LAYER = ("encoder.layers.{i}", "transformer.resblocks.{i}")
OPENCLIP_LAYER_LEAVES = (
    ("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
)
OPENCLIP_QKV = ("encoder.layers.{i}.self_attn.{proj}_proj.{param}", "transformer.resblocks.{i}.attn.in_proj_{param}")


def openclip_layout(config) -> Layout:
    """Our text keys <-> an OpenCLIP text tower (`cond_stage_model.model.*` in SD 2.x files)."""
    pairs = list(OPENCLIP_TOP)
    fused = []
    for i in range(config.layers):
        pairs += nest(_pair_i(OPENCLIP_LAYER, i), OPENCLIP_LAYER_LEAVES)
        for param in ("weight", "bias"):
            ours = tuple(expand(OPENCLIP_QKV[0], i=i, proj=p, param=param) for p in ("q", "k", "v"))
            fused.append(Rule(ours, (expand(OPENCLIP_QKV[1], i=i, param=param),), SPLIT_QKV))
    return Layout("openclip", renames=tuple(pairs), fused=tuple(fused))


def _pair_i(pair: tuple[str, str], i: int) -> tuple[str, str]:
    return expand(pair[0], i=i), expand(pair[1], i=i)

"""Component configs from checkpoints: diffusers/transformers config.json <-> our dataclasses, and
inference from tensor shapes for single files.

Shapes fix most fields (channels, levels, layers, widths). What they cannot tell (attention heads,
GroupNorm groups, activation, which text layer conditions the UNet) comes from, in order:
1. a preset whose shape fields all agree (sd15, sd21, tiny, tiny-sd2: `model.stable_diffusion.PRESETS`);
2. otherwise the family's reference values: SD 1.x 8 UNet heads, SD 2.x 64-dim UNet heads, CLIP text
   heads of width 64 (true of every released CLIP text tower), GroupNorm 32.
A config.json we cannot represent exactly is rejected with the field and the value we support.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from model.stable_diffusion import PRESETS
from model.text_encoder import TextEncoderConfig
from model.unet import UNetConfig
from model.vae import VAEConfig

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose key names and config fields we write
TRANSFORMERS_VERSION = "4.30.2"  # text_encoder files are written in the 4.x layout (prefix + position_ids)
BOS_TOKEN_ID, EOS_TOKEN_ID = 49406, 49407

Shapes = Mapping[str, tuple[int, ...]]


class ConfigError(ValueError):
    """A config (config.json, or what the tensor shapes imply) that our modules cannot represent."""


def _need(shapes: Shapes, key: str, source: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ConfigError(f"{source}: cannot infer the architecture: key {key!r} is missing")
    return shapes[key]


def _count(shapes: Shapes, template: str, start: int = 0) -> int:
    """How many consecutive indices i have some key starting with template.format(i) + '.'."""
    prefixes = {k.rsplit(".", 1)[0] for k in shapes}
    n = start
    while any(p == template.format(n) or p.startswith(template.format(n) + ".") for p in prefixes):
        n += 1
    return n - start


def settle(inferred: dict[str, Any], candidates: list, default, source: str):
    """The first candidate config agreeing with every inferred field, else `default` with them."""
    for candidate in candidates:
        try:
            if replace(candidate, **inferred) == candidate:
                return candidate
        except ValueError:  # the shapes are not even valid for this candidate
            continue
    try:
        return replace(default, **inferred)
    except ValueError as err:
        raise ConfigError(f"{source}: the tensor shapes imply {inferred}, which gives an invalid config "
                          f"({err}); pass an explicit config") from err


def _preset_configs(component: str) -> list:
    seen = []
    for cfg in PRESETS.values():
        value = getattr(cfg, component)
        if value not in seen:
            seen.append(value)
    return seen


# ---------------------------------------------------------------------------------------------
# UNet
def family_of_context(context_dim: int) -> str:
    """SD 2.x conditions on OpenCLIP-H (1024 wide); everything else is treated as SD 1.x-like."""
    return "sd2" if context_dim == 1024 else "sd1"


def unet_config_from_shapes(shapes: Shapes, source: str) -> UNetConfig:
    """UNetConfig from our (LDM, prefix-stripped) key shapes."""
    conv_in = _need(shapes, "input_blocks.0.0.weight", source)
    model_channels, in_channels = conv_in[0], conv_in[1]
    out_channels = _need(shapes, "out.2.weight", source)[0]
    n_input = _count(shapes, "input_blocks.{}")
    downsamples = [n for n in range(n_input) if f"input_blocks.{n}.0.op.weight" in shapes]
    num_res_blocks = downsamples[0] - 1 if downsamples else n_input - 1
    levels = len(downsamples) + 1
    if n_input != 1 + levels * num_res_blocks + (levels - 1):
        raise ConfigError(f"{source}: {n_input} input blocks do not form a UNet with {levels} levels of "
                          f"{num_res_blocks} res blocks")
    channel_mult, attention_levels = [], []
    for level in range(levels):
        n = 1 + level * (num_res_blocks + 1)
        width = _need(shapes, f"input_blocks.{n}.0.out_layers.3.weight", source)[0]
        if width % model_channels:
            raise ConfigError(f"{source}: level {level} has {width} channels, not a multiple of {model_channels}")
        channel_mult.append(width // model_channels)
        if f"input_blocks.{n}.1.proj_in.weight" in shapes:
            attention_levels.append(level)
    proj_in = _need(shapes, "middle_block.1.proj_in.weight", source)
    context_dim = _need(shapes, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", source)[1]
    inferred = dict(in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                    channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                    attention_levels=tuple(attention_levels),
                    transformer_depth=_count(shapes, "middle_block.1.transformer_blocks.{}"),
                    context_dim=context_dim, use_linear_proj=len(proj_in) == 2)
    default = UNetConfig.sd21() if family_of_context(context_dim) == "sd2" else UNetConfig.sd15()
    return settle(inferred, _preset_configs("unet"), default, source)


def unet_config_from_diffusers(cfg: Mapping[str, Any], source: str) -> UNetConfig:
    """UNetConfig from a diffusers UNet2DConditionModel config.json (rejects what we cannot build)."""
    def get(name, default=None):
        return cfg.get(name, default)

    unsupported = {  # field: (value we support, what a different value means)
        "addition_embed_type": (None, "SDXL-style added conditioning (text_time) is not supported"),
        "class_embed_type": (None, "class-conditioned UNets (upscaler, unCLIP) are not supported"),
        "num_class_embeds": (None, "class-conditioned UNets are not supported"),
        "encoder_hid_dim": (None, "an encoder_hid_proj is not supported"),
        "time_embedding_type": ("positional", "only sinusoidal timestep embeddings are supported"),
        "flip_sin_to_cos": (True, "our timestep embedding is [cos, sin]"),
        "freq_shift": (0, "our timestep embedding has no frequency shift"),
        "act_fn": ("silu", "our blocks use SiLU"),
        "center_input_sample": (False, "input centering is not supported"),
        "dual_cross_attention": (False, "dual cross-attention is not supported"),
        "only_cross_attention": (False, "cross-attention-only blocks are not supported"),
        "resnet_time_scale_shift": ("default", "scale-shift timestep conditioning is not supported"),
        "conv_in_kernel": (3, "conv_in must be 3x3"),
        "conv_out_kernel": (3, "conv_out must be 3x3"),
        "time_cond_proj_dim": (None, "guidance-embedding UNets (LCM) are not supported"),
        "mid_block_type": ("UNetMidBlock2DCrossAttn", "the middle block must be ResBlock-attention-ResBlock"),
        "downsample_padding": (1, "downsampling convs use padding 1"),
        "mid_block_scale_factor": (1, "the middle block has no output scale"),
        "attention_type": ("default", "only the default attention is supported"),
        "cross_attention_norm": (None, "cross-attention norms are not supported"),
        "resnet_skip_time_act": (False, "not supported"),
        "resnet_out_scale_factor": (1.0, "not supported"),
        "timestep_post_act": (None, "not supported"),
        "time_embedding_dim": (None, "the time embedding is 4 x the first block's channels"),
        "class_embeddings_concat": (False, "not supported"),
    }
    for name, (supported, why) in unsupported.items():
        if name in cfg and cfg[name] != supported:
            raise ConfigError(f"{source}: {name} = {cfg[name]!r} ({why}; supported: {supported!r})")
    if get("in_channels", 4) == 9:
        raise ConfigError(f"{source}: in_channels = 9 is an inpainting UNet (latents + mask + masked "
                          f"image); inpainting is not supported")
    blocks = list(get("block_out_channels", (320, 640, 1280, 1280)))
    model_channels = blocks[0]
    if any(b % model_channels for b in blocks):
        raise ConfigError(f"{source}: block_out_channels {blocks} are not multiples of {model_channels}")
    down = list(get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    attention_levels = []
    for level, kind in enumerate(down):
        if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise ConfigError(f"{source}: down_block_types[{level}] = {kind!r}; supported: "
                              f"CrossAttnDownBlock2D, DownBlock2D")
        if kind == "CrossAttnDownBlock2D":
            attention_levels.append(level)
    expected_up = ["CrossAttnUpBlock2D" if lvl in attention_levels else "UpBlock2D"
                   for lvl in reversed(range(len(down)))]
    if up != expected_up:
        raise ConfigError(f"{source}: up_block_types {up} do not mirror down_block_types {down} "
                          f"(expected {expected_up})")
    layers = get("layers_per_block", 2)
    depth = get("transformer_layers_per_block", 1)
    for name, value in (("layers_per_block", layers), ("transformer_layers_per_block", depth)):
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ConfigError(f"{source}: {name} = {value}: per-level values are not supported")
    layers = layers[0] if isinstance(layers, (list, tuple)) else layers
    depth = depth[0] if isinstance(depth, (list, tuple)) else depth
    context_dim = get("cross_attention_dim", 1280)
    if isinstance(context_dim, (list, tuple)):
        if len(set(context_dim)) != 1:
            raise ConfigError(f"{source}: cross_attention_dim = {context_dim}: per-level values are not supported")
        context_dim = context_dim[0]
    # diffusers' legacy naming: `attention_head_dim` holds the number of heads (num_attention_heads
    # overrides it when set). An int is SD 1.x's fixed head count; a per-level list (SD 2.x: 5, 10,
    # 20, 20) is a fixed head width when channels / heads agree across levels.
    heads = get("num_attention_heads") or get("attention_head_dim", 8)
    if isinstance(heads, int):
        head_fields = dict(num_heads=heads, head_dim=None)
    else:
        heads = list(heads)
        widths = {blocks[i] // heads[i] for i in range(len(blocks)) if blocks[i] % heads[i] == 0}
        if len(set(heads)) == 1:
            head_fields = dict(num_heads=heads[0], head_dim=None)
        elif len(widths) == 1 and all(blocks[i] % heads[i] == 0 for i in range(len(blocks))):
            head_fields = dict(num_heads=None, head_dim=widths.pop())
        else:
            raise ConfigError(f"{source}: attention_head_dim {heads} with block_out_channels {blocks} is "
                              f"neither a fixed head count nor a fixed head width")
    try:
        return UNetConfig(in_channels=get("in_channels", 4), out_channels=get("out_channels", 4),
                          model_channels=model_channels, channel_mult=tuple(b // model_channels for b in blocks),
                          num_res_blocks=layers, attention_levels=tuple(attention_levels),
                          transformer_depth=depth, context_dim=context_dim,
                          use_linear_proj=bool(get("use_linear_projection", False)),
                          norm_groups=get("norm_num_groups", 32), norm_eps=get("norm_eps", 1e-5), **head_fields)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from err


def unet_config_to_diffusers(config: UNetConfig, sample_size: int) -> dict[str, Any]:
    """The diffusers UNet2DConditionModel config.json of a UNetConfig (SD 1.5 / 2.1 field set)."""
    blocks = [config.model_channels * m for m in config.channel_mult]
    levels = range(len(blocks))
    if config.num_heads is not None:
        heads: int | list[int] = config.num_heads
    else:
        heads = [b // config.head_dim for b in blocks]
    out = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu", "attention_head_dim": heads, "block_out_channels": blocks,
        "center_input_sample": False, "cross_attention_dim": config.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if lvl in config.attention_levels else "DownBlock2D"
                             for lvl in levels],
        "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": config.in_channels, "layers_per_block": config.num_res_blocks,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": config.norm_eps, "norm_num_groups": config.norm_groups,
        "only_cross_attention": False, "out_channels": config.out_channels,
        "sample_size": sample_size, "transformer_layers_per_block": config.transformer_depth,
        "up_block_types": ["CrossAttnUpBlock2D" if lvl in config.attention_levels else "UpBlock2D"
                           for lvl in reversed(levels)],
        "use_linear_projection": config.use_linear_proj,
    }
    return out


# ---------------------------------------------------------------------------------------------
# VAE
def vae_config_from_shapes(shapes: Shapes, source: str) -> VAEConfig:
    """VAEConfig from our (LDM, prefix-stripped) key shapes."""
    conv_in = _need(shapes, "encoder.conv_in.weight", source)
    base, in_channels = conv_in[0], conv_in[1]
    levels = _count(shapes, "encoder.down.{}")
    num_res_blocks = _count(shapes, "encoder.down.0.block.{}")
    channel_mult = []
    for level in range(levels):
        width = _need(shapes, f"encoder.down.{level}.block.{num_res_blocks - 1}.conv2.weight", source)[0]
        channel_mult.append(width // base)
    inferred = dict(in_channels=in_channels, out_channels=_need(shapes, "decoder.conv_out.weight", source)[0],
                    latent_channels=_need(shapes, "post_quant_conv.weight", source)[0], base_channels=base,
                    channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks)
    return settle(inferred, _preset_configs("vae"), VAEConfig.sd(), source)


def vae_config_from_diffusers(cfg: Mapping[str, Any], source: str) -> VAEConfig:
    """VAEConfig from a diffusers AutoencoderKL config.json."""
    blocks = list(cfg.get("block_out_channels", (64,)))
    levels = len(blocks)
    checks = {
        "down_block_types": (["DownEncoderBlock2D"] * levels, "encoder levels must be DownEncoderBlock2D"),
        "up_block_types": (["UpDecoderBlock2D"] * levels, "decoder levels must be UpDecoderBlock2D"),
        "act_fn": ("silu", "our blocks use SiLU"),
        "mid_block_add_attention": (True, "the middle block must have attention"),
        "use_quant_conv": (True, "quant_conv is required"),
        "use_post_quant_conv": (True, "post_quant_conv is required"),
        "shift_factor": (None, "latent shift factors (SD3/Flux VAEs) are not supported"),
        "latents_mean": (None, "per-channel latent statistics (SDXL-style) are not supported"),
        "latents_std": (None, "per-channel latent statistics (SDXL-style) are not supported"),
    }
    for name, (supported, why) in checks.items():
        if name in cfg and cfg[name] is not None and (list(cfg[name]) if isinstance(cfg[name], (list, tuple))
                                                       else cfg[name]) != supported:
            raise ConfigError(f"{source}: {name} = {cfg[name]!r} ({why}; supported: {supported!r})")
    base = blocks[0]
    if any(b % base for b in blocks):
        raise ConfigError(f"{source}: block_out_channels {blocks} are not multiples of {base}")
    try:
        return VAEConfig(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                         latent_channels=cfg.get("latent_channels", 4), base_channels=base,
                         channel_mult=tuple(b // base for b in blocks),
                         num_res_blocks=cfg.get("layers_per_block", 1), norm_groups=cfg.get("norm_num_groups", 32),
                         scaling_factor=cfg.get("scaling_factor", 0.18215))
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from err


def vae_config_to_diffusers(config: VAEConfig, sample_size: int) -> dict[str, Any]:
    if config.norm_eps != 1e-6:
        raise ConfigError(f"VAEConfig.norm_eps = {config.norm_eps}: diffusers' AutoencoderKL always uses 1e-6")
    levels = len(config.channel_mult)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "block_out_channels": [config.base_channels * m for m in config.channel_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "in_channels": config.in_channels,
        "latent_channels": config.latent_channels, "layers_per_block": config.num_res_blocks,
        "norm_num_groups": config.norm_groups, "out_channels": config.out_channels,
        "sample_size": sample_size, "scaling_factor": config.scaling_factor,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


# ---------------------------------------------------------------------------------------------
# Text encoder
def _text_default(activation: str) -> TextEncoderConfig:
    """SD 2.x's OpenCLIP uses gelu, SD 1.x's CLIP quick_gelu: the family's reference config."""
    return TextEncoderConfig.openclip_h() if activation == "gelu" else TextEncoderConfig.clip_l()


def _text_settle(inferred: dict[str, Any], default: TextEncoderConfig, source: str) -> TextEncoderConfig:
    width = inferred["width"]
    candidates = [c for c in _preset_configs("text") if c.activation == default.activation]
    for candidate in candidates:
        try:
            if replace(candidate, **inferred) == candidate:
                return candidate
        except ValueError:
            continue
    if width % 64:
        raise ConfigError(f"{source}: text width {width} is not a multiple of 64, so the head count "
                          f"cannot be inferred (CLIP text towers use 64-wide heads); pass an explicit config")
    return settle(dict(inferred, heads=width // 64), [], default, source)


def text_config_from_shapes(shapes: Shapes, layout: str, source: str) -> TextEncoderConfig:
    """TextEncoderConfig from our key shapes (layout "clip": SD 1.x) or OpenCLIP names ("openclip": SD 2.x).

    CLIP (SD 1.x) files use the last layer and quick_gelu; OpenCLIP (SD 2.x) files use the
    penultimate layer and gelu, as the LDM configs (FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder) do.
    """
    if layout == "openclip":
        token = _need(shapes, "token_embedding.weight", source)
        inferred = dict(vocab_size=token[0], width=token[1],
                        max_length=_need(shapes, "positional_embedding", source)[0],
                        layers=_count(shapes, "transformer.resblocks.{}"),
                        mlp_dim=_need(shapes, "transformer.resblocks.0.mlp.c_fc.weight", source)[0],
                        projection_dim=shapes["text_projection"][1] if "text_projection" in shapes else None)
        return _text_settle(inferred, TextEncoderConfig.openclip_h(), source)
    token = _need(shapes, "embeddings.token_embedding.weight", source)
    inferred = dict(vocab_size=token[0], width=token[1],
                    max_length=_need(shapes, "embeddings.position_embedding.weight", source)[0],
                    layers=_count(shapes, "encoder.layers.{}"),
                    mlp_dim=_need(shapes, "encoder.layers.0.mlp.fc1.weight", source)[0],
                    projection_dim=shapes["text_projection"][1] if "text_projection" in shapes else None)
    return _text_settle(inferred, TextEncoderConfig.clip_l(), source)


def text_config_from_transformers(cfg: Mapping[str, Any], source: str, pad_token_id: int | None = None,
                                  extra_layers: int = 0, projection_dim: int | None = None) -> TextEncoderConfig:
    """TextEncoderConfig from a transformers CLIPTextConfig config.json.

    A CLIPTextModel's output is its last layer after the final LayerNorm (output_layer -1).
    `extra_layers` > 0 re-attaches layers that an SD 2.x diffusers export dropped (see
    weights/save.py): the output layer then stays the one the file's config describes.
    """
    architectures = cfg.get("architectures") or ["CLIPTextModel"]
    if cfg.get("model_type", "clip_text_model") != "clip_text_model" or "CLIPTextModel" not in architectures:
        raise ConfigError(f"{source}: model_type {cfg.get('model_type')!r} / architectures {architectures}: "
                          f"expected a transformers CLIPTextModel (clip_text_model)")
    activation = cfg.get("hidden_act", "quick_gelu")
    if activation not in ("quick_gelu", "gelu"):
        raise ConfigError(f"{source}: hidden_act = {activation!r}; supported: quick_gelu, gelu")
    default = _text_default(activation)
    layers = cfg.get("num_hidden_layers", 12)
    try:
        return TextEncoderConfig(
            vocab_size=cfg.get("vocab_size", 49408), max_length=cfg.get("max_position_embeddings", 77),
            width=cfg.get("hidden_size", 512), layers=layers + extra_layers, heads=cfg.get("num_attention_heads", 8),
            mlp_dim=cfg.get("intermediate_size", 2048), activation=activation, output_layer=-1 - extra_layers,
            pad_token_id=default.pad_token_id if pad_token_id is None else pad_token_id,
            norm_eps=cfg.get("layer_norm_eps", 1e-5), projection_dim=projection_dim)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from err


def text_config_to_transformers(config: TextEncoderConfig, layers: int) -> dict[str, Any]:
    """The transformers CLIPTextConfig config.json for the first `layers` blocks of our encoder."""
    return {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": BOS_TOKEN_ID,
        "dropout": 0.0, "eos_token_id": EOS_TOKEN_ID, "hidden_act": config.activation,
        "hidden_size": config.width, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": config.mlp_dim, "layer_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_length, "model_type": "clip_text_model",
        "num_attention_heads": config.heads, "num_hidden_layers": layers,
        "pad_token_id": config.pad_token_id, "projection_dim": config.projection_dim or config.width,
        "torch_dtype": "float32", "transformers_version": TRANSFORMERS_VERSION, "vocab_size": config.vocab_size,
    }

"""ControlNet key tables and configs: the original `control_model.*` layout and diffusers' ControlNetModel.

Our ControlNet's keys are the original's with `control_model.` stripped (model/controlnet.py), so
the LDM layouts are bare prefixes:

    control_model.                 ControlNet 1.0 full files (SD + control, `control_sd15_*.pth`)
                                   and ControlNet 1.1 standalone files (`control_v11*_sd15_*.pth`)
    model.control_model.           a variant ComfyUI's loader also accepts
    (none)                         a bare control state dict (ComfyUI accepts it too)

diffusers' ControlNetModel names the copied encoder as UNet2DConditionModel does (the UNet table
of weights/layouts.py, restricted to the encoder half) plus the tables below ("{}" = indices):

    zero_convs.{i}.0           <-> controlnet_down_blocks.{i}
    middle_block_out.0         <-> controlnet_mid_block
    input_hint_block.0         <-> controlnet_cond_embedding.conv_in
    input_hint_block.{2k+2}    <-> controlnet_cond_embedding.blocks.{k}
    input_hint_block.{last}    <-> controlnet_cond_embedding.conv_out

Configs: a diffusers config.json states everything; single files only give shapes, and shapes do
not tell the attention heads or GroupNorm groups, nor `global_pool` (ControlNet 1.1 shuffle). The
UNet fields come from the same shape inference as the UNet's (a preset when one agrees); loading
with a base UNet (`weights.load_control(path, unet=...)`) checks the shapes against it and takes
the rest from the base, which is what the control was trained from.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from model.controlnet import ControlNetConfig, SD_HINT_WIDTHS
from model.unet import UNetConfig
from weights import configs, layouts
from weights.configs import ConfigError, DIFFUSERS_VERSION
from weights.keymap import Layout, expand

Shapes = Mapping[str, tuple[int, ...]]

# ---------------------------------------------------------------------------------------------
# Prefixes and signatures (layout kind, prefix, keys after the prefix, description); weights/
# components.py wraps them in `Signature`s. Tried in order.
CONTROL_PREFIX = "control_model."
COMFY_CONTROL_PREFIX = "model.control_model."
_LDM_KEYS = ("input_hint_block.0.weight", "zero_convs.0.0.weight", "input_blocks.0.0.weight")
SIGNATURES = (
    ("ldm", CONTROL_PREFIX, _LDM_KEYS, "ControlNet (control_model.*)"),
    ("ldm", COMFY_CONTROL_PREFIX, _LDM_KEYS, "ControlNet (model.control_model.*, ComfyUI variant)"),
    ("ldm", "", _LDM_KEYS, "ControlNet state dict (control_model. stripped)"),
    ("diffusers", "", ("controlnet_cond_embedding.conv_in.weight", "controlnet_mid_block.weight", "conv_in.weight"),
     "diffusers ControlNetModel"),
)
# safetensors metadata key of files our save_control writes: the ControlNetConfig as JSON.
METADATA_CONTROL_CONFIG = "defectsynth.controlnet_config"

# ---------------------------------------------------------------------------------------------
# diffusers table
CONTROLNET_BLOCKS = {
    "zero_conv": ("zero_convs.{i}.0", "controlnet_down_blocks.{i}"),
    "mid_out": ("middle_block_out.0", "controlnet_mid_block"),
    "hint_in": ("input_hint_block.0", "controlnet_cond_embedding.conv_in"),
    "hint_block": ("input_hint_block.{n}", "controlnet_cond_embedding.blocks.{k}"),
    "hint_out": ("input_hint_block.{n}", "controlnet_cond_embedding.conv_out"),
}
# Our top-level modules that the copied encoder shares with the UNet's diffusers table.
ENCODER_MODULES = ("time_embed.", "input_blocks.", "middle_block.")


def _pair(name: str, **indices: object) -> tuple[str, str]:
    ours, theirs = CONTROLNET_BLOCKS[name]
    return expand(ours, **indices), expand(theirs, **indices)


def hint_conv_indices(num_stages: int) -> list[int]:
    """Sequential indices of the hint encoder's convs (SiLUs sit between): SD's 4 stages -> 0, 2, ..., 14."""
    return list(range(0, 4 * num_stages, 2))


def controlnet_diffusers_layout(config: ControlNetConfig) -> Layout:
    """Our ControlNet keys <-> diffusers ControlNetModel `diffusion_pytorch_model.*`."""
    unet_pairs = layouts.unet_diffusers_layout(config.unet).renames
    pairs = [p for p in unet_pairs if p[0].startswith(ENCODER_MODULES)]
    levels, res = len(config.unet.channel_mult), config.unet.num_res_blocks
    num_input_blocks = 1 + levels * res + (levels - 1)
    pairs += [_pair("zero_conv", i=i) for i in range(num_input_blocks)]
    pairs.append(_pair("mid_out"))
    convs = hint_conv_indices(len(config.hint_widths))
    pairs.append(_pair("hint_in"))
    pairs += [_pair("hint_block", n=n, k=k) for k, n in enumerate(convs[1:-1])]
    pairs.append(_pair("hint_out", n=convs[-1]))
    return Layout("diffusers-controlnet", renames=tuple(pairs))


def controlnet_layout(kind: str, config: ControlNetConfig) -> Layout:
    """The layout of a kind named in SIGNATURES (the file prefix is added by the loader)."""
    if kind == "ldm":
        return Layout("ldm-controlnet")
    if kind == "diffusers":
        return controlnet_diffusers_layout(config)
    raise ValueError(f"unknown ControlNet layout kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# Configs
def hint_config_from_shapes(shapes: Shapes, source: str) -> tuple[int, tuple[int, ...]]:
    """(hint_channels, hint_widths) from the `input_hint_block.{n}.weight` shapes (our names)."""
    present = sorted(int(k.split(".")[1]) for k in shapes
                     if k.startswith("input_hint_block.") and k.endswith(".weight"))
    if not present or len(present) % 2 or present != hint_conv_indices(len(present) // 2):
        raise ConfigError(f"{source}: input_hint_block convs at indices {present}; expected 0, 2, 4, ... "
                          f"(an even count: conv_in, two per stage step, conv_out)")
    weight = [shapes[f"input_hint_block.{n}.weight"] for n in present]
    widths = [weight[0][0]] + [w[0] for w in weight[2:-1:2]]  # stage widths: conv_in, then each stride-2 conv
    return weight[0][1], tuple(widths)


def controlnet_config_from_shapes(kind: str, shapes: Shapes, source: str) -> ControlNetConfig:
    """ControlNetConfig from a file's shapes (prefix stripped; diffusers names renamed to ours first)."""
    if kind == "diffusers":
        levels = configs._count(shapes, "down_blocks.{}")
        structure = ControlNetConfig(
            UNetConfig(channel_mult=(1,) * levels, num_res_blocks=configs._count(shapes, "down_blocks.0.resnets.{}"),
                       attention_levels=tuple(i for i in range(levels)
                                              if f"down_blocks.{i}.attentions.0.norm.weight" in shapes)),
            hint_widths=(1,) * (configs._count(shapes, "controlnet_cond_embedding.blocks.{}") // 2 + 1))
        layout = controlnet_diffusers_layout(structure)
        shapes = {ours: shape for key, shape in shapes.items() if (ours := layout.our_key(key)) is not None}
    conv_in = configs._need(shapes, "input_blocks.0.0.weight", source)
    # A control copy has no output head; every SD UNet maps its latent channels back to themselves,
    # so the UNet shape inference is given that out conv.
    unet_shapes = dict(shapes, **{"out.2.weight": (conv_in[1], conv_in[0], 3, 3)})
    unet = configs.unet_config_from_shapes(unet_shapes, source)
    hint_channels, widths = hint_config_from_shapes(shapes, source)
    last = shapes[f"input_hint_block.{hint_conv_indices(len(widths))[-1]}.weight"]
    if last[0] != unet.model_channels:
        raise ConfigError(f"{source}: the hint encoder ends with {last[0]} channels, the copied UNet starts "
                          f"with {unet.model_channels}")
    return ControlNetConfig(unet, hint_channels, widths)


def _mirrored_up_blocks(down: list[str]) -> list[str]:
    return [{"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}.get(kind, kind)
            for kind in reversed(down)]


def controlnet_config_from_diffusers(cfg: Mapping[str, Any], source: str) -> ControlNetConfig:
    """ControlNetConfig from a diffusers ControlNetModel config.json (what we cannot build is refused)."""
    order = cfg.get("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise ConfigError(f"{source}: controlnet_conditioning_channel_order = {order!r} (supported: 'rgb'; "
                          f"flip the hint's channels yourself)")
    down = list(cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    # The UNet reader checks the decoder mirrors the encoder; a ControlNet has no decoder, so give it
    # the mirror, and the output channels of every SD UNet (= input channels).
    unet_json = dict(cfg, up_block_types=_mirrored_up_blocks(down), out_channels=cfg.get("in_channels", 4))
    unet = configs.unet_config_from_diffusers(unet_json, source)
    widths = cfg.get("conditioning_embedding_out_channels") or SD_HINT_WIDTHS
    try:
        return ControlNetConfig(unet, hint_channels=cfg.get("conditioning_channels", 3),
                                hint_widths=tuple(widths),
                                global_pool=bool(cfg.get("global_pool_conditions", False)))
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from err


def controlnet_config_to_diffusers(config: ControlNetConfig) -> dict[str, Any]:
    """The diffusers ControlNetModel config.json (the field set of lllyasviel/sd-controlnet-*)."""
    unet = configs.unet_config_to_diffusers(config.unet, sample_size=0)
    for name in ("sample_size", "out_channels", "up_block_types"):  # not ControlNetModel arguments
        del unet[name]
    return dict(unet, _class_name="ControlNetModel", _diffusers_version=DIFFUSERS_VERSION,
                class_embed_type=None, conditioning_channels=config.hint_channels,
                conditioning_embedding_out_channels=list(config.hint_widths),
                controlnet_conditioning_channel_order="rgb", global_pool_conditions=config.global_pool,
                num_class_embeds=None, projection_class_embeddings_input_dim=None,
                resnet_time_scale_shift="default", upcast_attention=False)


# Fields a state dict pins down (the rest, heads and norms, only a config file or the base UNet states).
SHAPE_FIELDS = ("in_channels", "model_channels", "channel_mult", "num_res_blocks", "attention_levels",
                "transformer_depth", "context_dim", "use_linear_proj")
ARCH_FIELDS = SHAPE_FIELDS + ("num_heads", "head_dim", "norm_groups", "norm_eps")


def fit_to_base(config: ControlNetConfig, base: UNetConfig, source: str, from_shapes: bool) -> ControlNetConfig:
    """The control's config with the base UNet's, after checking they describe the same encoder.

    from_shapes: the control's config was inferred from tensor shapes, so only SHAPE_FIELDS are
    facts and the heads / norms are taken from the base; otherwise every ARCH_FIELDS field must agree.
    Raises ConfigError naming each differing field (and the SD family of each side when the text
    context width differs, e.g. an SD 2.x control on an SD 1.5 base).
    """
    names = SHAPE_FIELDS if from_shapes else ARCH_FIELDS
    diffs = [f"{n}: control {getattr(config.unet, n)!r} vs base {getattr(base, n)!r}"
             for n in names if getattr(config.unet, n) != getattr(base, n)]
    if diffs:
        hint = ""
        if config.unet.context_dim != base.context_dim:
            family = {"sd1": "SD 1.x", "sd2": "SD 2.x"}
            hint = (f". The ControlNet was trained for {family[configs.family_of_context(config.unet.context_dim)]} "
                    f"(text context {config.unet.context_dim}) but the base UNet is "
                    f"{family[configs.family_of_context(base.context_dim)]} (context {base.context_dim}): use a "
                    f"ControlNet of the base model's family")
        raise ConfigError(f"{source}: this ControlNet does not match the base UNet ({'; '.join(diffs)}){hint}")
    return replace(config, unet=base)

"""The registry of loadable components: how each is recognised in a file, named, configured, built.

A `Component` ties together one of our modules and its checkpoint layouts:

* `signatures`: (layout kind, key prefix, keys that must exist) tried in order to recognise the
  component inside a single file or state dict;
* `layout(kind, config)`: the `Layout` (weights/keymap.py) of that kind, without the file prefix;
* `infer_config(kind, shapes, source)`: the config from tensor shapes (prefix stripped);
* `config_from_json(config_json, source)`: the config from a diffusers/transformers config.json,
  for component folders whose config.json `_class_name` / `architectures` is in `folder_classes`.

Adding a component is one more `Component` in `COMPONENTS` plus its key table; the detection,
strict loading, coverage report and writers iterate over this registry. ControlNet
(`control_model.*` in LDM files, diffusers `ControlNetModel` folders) is registered this way,
with its tables in weights/controlnet_keys.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping

from model.controlnet import ControlNet
from model.text_encoder import TextEncoder
from model.unet import UNet
from model.vae import AutoencoderKL
from weights import configs, controlnet_keys, layouts
from weights.keymap import Layout

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Signature:
    layout: str                 # layout kind, an argument of Component.layout
    prefix: str                 # prepended to every key of the component in the file
    keys: tuple[str, ...]       # keys (after the prefix) that must all exist
    describes: str              # for messages and `inspect`


@dataclass(frozen=True)
class Component:
    name: str                   # attribute of StableDiffusion and diffusers subfolder name
    module: type
    signatures: tuple[Signature, ...]
    layout: Callable[[str, Any], Layout]
    infer_config: Callable[[str, Shapes, str], Any]
    config_from_json: Callable[[Mapping[str, Any], str], Any]
    folder_classes: tuple[str, ...]
    weight_files: tuple[str, ...]   # candidate weights file names in a component folder, preferred first


def _count(shapes: Shapes, template: str) -> int:
    return configs._count(shapes, template)


# ---------------------------------------------------------------------------------------------
# UNet
def _unet_layout(kind: str, config) -> Layout:
    if kind == "ldm":
        return Layout("ldm-unet")
    if kind == "ldm-ema":
        return layouts.unet_ema_layout()
    if kind == "diffusers":
        return layouts.unet_diffusers_layout(config)
    raise ValueError(f"unknown UNet layout kind {kind!r}")


def _unet_infer(kind: str, shapes: Shapes, source: str):
    if kind == "diffusers":
        # The block structure from diffusers names, then every shape renamed to ours through the
        # same table the loader uses, then the one shape-inference function.
        levels = _count(shapes, "down_blocks.{}")
        structure = SimpleNamespace(
            channel_mult=(1,) * levels, num_res_blocks=_count(shapes, "down_blocks.0.resnets.{}"),
            attention_levels=tuple(i for i in range(levels) if f"down_blocks.{i}.attentions.0.norm.weight" in shapes))
        shapes = _rename_shapes(layouts.unet_diffusers_layout(structure), shapes)
    return configs.unet_config_from_shapes(shapes, source)


def _rename_shapes(layout: Layout, shapes: Shapes) -> dict[str, tuple[int, ...]]:
    out = {}
    for key, shape in shapes.items():
        ours = layout.our_key(key)
        if ours is not None:
            out[ours] = shape
    return out


UNET = Component(
    name="unet", module=UNet,
    signatures=(
        Signature("ldm", layouts.LDM_UNET, ("input_blocks.0.0.weight",), "LDM single file"),
        Signature("ldm", "", ("input_blocks.0.0.weight", "middle_block.0.in_layers.0.weight", "out.2.weight"),
                  "LDM UNet state dict"),
        Signature("diffusers", "", ("conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "up_blocks.0.resnets.0.conv1.weight"),
                  "diffusers UNet2DConditionModel"),
    ),
    layout=_unet_layout, infer_config=_unet_infer,
    config_from_json=configs.unet_config_from_diffusers,
    folder_classes=("UNet2DConditionModel",),
    weight_files=("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                  "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors.index.fp16.json",
                  "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
)


# ---------------------------------------------------------------------------------------------
# VAE
def _vae_layout(kind: str, config) -> Layout:
    if kind == "ldm":
        return Layout("ldm-vae")
    if kind == "diffusers":
        return layouts.vae_diffusers_layout(config, "current")
    if kind == "diffusers-legacy":
        return layouts.vae_diffusers_layout(config, "legacy")
    raise ValueError(f"unknown VAE layout kind {kind!r}")


def _vae_infer(kind: str, shapes: Shapes, source: str):
    if kind.startswith("diffusers"):
        structure = SimpleNamespace(channel_mult=(1,) * _count(shapes, "encoder.down_blocks.{}"),
                                    num_res_blocks=_count(shapes, "encoder.down_blocks.0.resnets.{}"))
        shapes = _rename_shapes(layouts.vae_diffusers_layout(structure, kind.replace("diffusers", "").strip("-")
                                                             or "current"), shapes)
    return configs.vae_config_from_shapes(shapes, source)


_VAE_LDM_KEYS = ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "decoder.conv_in.weight")
_VAE_DIFFUSERS_KEYS = ("encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.conv_in.weight")
VAE = Component(
    name="vae", module=AutoencoderKL,
    signatures=(
        Signature("ldm", layouts.LDM_VAE, _VAE_LDM_KEYS, "LDM single file"),
        Signature("ldm", "", _VAE_LDM_KEYS, "LDM VAE state dict (standalone VAE file)"),
        Signature("diffusers", "", _VAE_DIFFUSERS_KEYS + ("encoder.mid_block.attentions.0.to_q.weight",),
                  "diffusers AutoencoderKL"),
        Signature("diffusers-legacy", "", _VAE_DIFFUSERS_KEYS + ("encoder.mid_block.attentions.0.query.weight",),
                  "diffusers AutoencoderKL, legacy attention names (diffusers < 0.14)"),
    ),
    layout=_vae_layout, infer_config=_vae_infer,
    config_from_json=configs.vae_config_from_diffusers,
    folder_classes=("AutoencoderKL",),
    weight_files=UNET.weight_files,
)


# ---------------------------------------------------------------------------------------------
# Text encoder
def _text_layout(kind: str, config) -> Layout:
    if kind == "clip":
        return Layout("clip-text")
    if kind == "openclip":
        return layouts.openclip_layout(config)
    raise ValueError(f"unknown text encoder layout kind {kind!r}")


def _text_infer(kind: str, shapes: Shapes, source: str):
    return configs.text_config_from_shapes(shapes, kind, source)


_CLIP_KEYS = ("embeddings.token_embedding.weight", "encoder.layers.0.self_attn.q_proj.weight")
_OPENCLIP_KEYS = ("token_embedding.weight", "transformer.resblocks.0.attn.in_proj_weight")
TEXT_ENCODER = Component(
    name="text_encoder", module=TextEncoder,
    signatures=(
        Signature("clip", layouts.LDM_CLIP, _CLIP_KEYS, "LDM single file, SD 1.x CLIP"),
        Signature("clip", layouts.LDM_CLIP_NAI, _CLIP_KEYS, "LDM single file, SD 1.x CLIP without text_model."),
        Signature("openclip", layouts.LDM_OPENCLIP, _OPENCLIP_KEYS, "LDM single file, SD 2.x OpenCLIP"),
        Signature("clip", layouts.TRANSFORMERS4_TEXT, _CLIP_KEYS, "transformers 4.x CLIPTextModel"),
        Signature("clip", "", _CLIP_KEYS, "transformers 5.x CLIPTextModel (no text_model. prefix)"),
        Signature("openclip", "", _OPENCLIP_KEYS, "OpenCLIP text tower state dict"),
    ),
    layout=_text_layout, infer_config=_text_infer,
    config_from_json=configs.text_config_from_transformers,
    folder_classes=("CLIPTextModel",),
    weight_files=("model.safetensors", "model.safetensors.index.json", "model.fp16.safetensors",
                  "model.safetensors.index.fp16.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                  "pytorch_model.fp16.bin"),
)

# ---------------------------------------------------------------------------------------------
# ControlNet (not part of StableDiffusion; loaded by weights.load_control). Tables and configs in
# weights/controlnet_keys.py.
CONTROLNET = Component(
    name="controlnet", module=ControlNet,
    signatures=tuple(Signature(*s) for s in controlnet_keys.SIGNATURES),
    layout=controlnet_keys.controlnet_layout, infer_config=controlnet_keys.controlnet_config_from_shapes,
    config_from_json=controlnet_keys.controlnet_config_from_diffusers,
    folder_classes=("ControlNetModel",),
    weight_files=UNET.weight_files,
)

# Order matters only for reports; StableDiffusion holds the first three as attributes of the same names.
COMPONENTS: dict[str, Component] = {c.name: c for c in (UNET, VAE, TEXT_ENCODER, CONTROLNET)}
SD_COMPONENTS = ("unet", "vae", "text_encoder")

# Key patterns that mean "a model we do not load", checked before any layout detection.
# (pattern, reason). Patterns ending with "." are prefixes.
UNSUPPORTED_KEYS: tuple[tuple[str, str], ...] = (
    ("conditioner.", "SDXL (its text conditioning lives under conditioner.*): defectsynth loads SD 1.x / 2.x only"),
    ("model.diffusion_model.label_emb.", "a UNet with label_emb (SDXL, the SD x4 upscaler or unCLIP "
                                         "class/added conditioning): defectsynth loads SD 1.x / 2.x only"),
    ("label_emb.", "a UNet with label_emb (SDXL-style added conditioning): not supported"),
    ("add_embedding.", "a diffusers UNet with add_embedding (SDXL text_time conditioning): not supported"),
    ("class_embedding.", "a class-conditioned diffusers UNet (x4 upscaler, unCLIP): not supported"),
)

"""Checkpoint files: reading, layout detection, key tables, strict loading and writing.

The only package that knows foreign key names (LDM single files, diffusers folders, OpenCLIP,
transformers, ControlNet through the same registry). Files:

    files.py       safetensors / weights_only pickles / shards / manifests as key -> tensor sources; atomic writes
    keymap.py      the mapping mechanism: Layout (template renames + transforms) -> explicit Rules
    layouts.py     the key tables (UNet, VAE, text encoder; LDM, EMA, diffusers, OpenCLIP) and known extras
    configs.py     config.json <-> our config dataclasses; configs inferred from tensor shapes
    components.py  the registry of loadable components (how each is recognised, named, configured, built)
    load.py        detection, prediction type, meta-device planning, strict loading, LoadInfo
    save.py        save_ldm (single .safetensors) and save_diffusers (pipeline folder)
    controlnet_keys.py  ControlNet key tables (control_model.*, diffusers ControlNetModel) and configs
    controlnet.py  load_control / save_control
    inspect.py     python -m weights.inspect PATH | --manifest FILE.json
    convert.py     python -m weights.convert SRC DST --to ldm|diffusers

Real checkpoints belong in the git-ignored folder weights/checkpoints/.
"""
from weights.files import CheckpointError
from weights.load import (LoadInfo, decide_prediction_type, inspect_checkpoint, load_pipeline, load_text_encoder,
                          load_unet, load_vae)
from weights.save import save_diffusers, save_ldm
from weights.controlnet import load_control, save_control

__all__ = [
    "CheckpointError", "LoadInfo", "decide_prediction_type", "inspect_checkpoint", "load_pipeline",
    "load_text_encoder", "load_unet", "load_vae", "save_diffusers", "save_ldm", "load_control", "save_control",
]

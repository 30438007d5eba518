"""Loading and writing ControlNet weights: `load_control` and `save_control`.

    control = load_control("control_v11p_sd15_canny.safetensors", unet=sd.unet)   # checks it fits the base
    save_control(control, "mine.safetensors")                        # ControlNet 1.1 layout (control_model.*)
    save_control(control, "full.safetensors", base=sd)               # ControlNet 1.0 layout (SD + control_model.*)
    save_control(control, "mine-diffusers", layout="diffusers")      # diffusers ControlNetModel folder

What loads (recognised by weights/components.py's CONTROLNET signatures, tables in
weights/controlnet_keys.py): ControlNet 1.0 full files (`control_sd15_*.pth`: the SD model plus
`control_model.*`, and `logvar`), ControlNet 1.1 standalone files (`control_v11*.pth`, every key
`control_model.*`), the `model.control_model.*` and bare variants ComfyUI also accepts, and diffusers
ControlNetModel folders (config.json + diffusion_pytorch_model.*; a StableDiffusionControlNetPipeline
folder's `controlnet/` is found too). Loading is strict, on the meta device first, exactly as
`load_pipeline` (weights/load.py); `python -m weights.inspect` reports ControlNet files the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from defectsynth.runconfig import config_from_dict, config_to_dict
from model.controlnet import ControlNet, ControlNetConfig
from weights import layouts
from weights.components import COMPONENTS
from weights.configs import ConfigError, family_of_context
from weights.controlnet_keys import (CONTROL_PREFIX, METADATA_CONTROL_CONFIG, controlnet_config_to_diffusers,
                                     fit_to_base)
from weights.files import CheckpointError, save_json, save_safetensors
from weights.keymap import to_theirs
from weights.load import METADATA_CONFIG, LoadInfo, analyse, materialise, open_checkpoint
from weights.save import DTYPES, _cast, ldm_state_dict

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
LOGVAR_STEPS = 1000  # ControlLDM registers logvar = zeros(num_timesteps) as a persistent buffer


def _metadata_control_config(file) -> ControlNetConfig | None:
    text = file.metadata.get(METADATA_CONTROL_CONFIG)
    if not text:
        return None
    try:
        return config_from_dict(ControlNetConfig, json.loads(text), source=f"{file.path} metadata")
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{file.path}: metadata {METADATA_CONTROL_CONFIG} is not a valid "
                              f"ControlNetConfig ({err})") from err


def load_control(path: str | Path, unet=None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, config: ControlNetConfig | None = None) -> ControlNet:
    """Our ControlNet from a ControlNet file or diffusers folder, strictly.

    unet: the base UNet the control will drive. Its config is checked against the control's
        (channels, levels, attention levels, context width, ...; a mismatch such as an SD 2.x
        control on an SD 1.5 base is an error naming the fields), and supplies what tensor shapes
        cannot tell (attention heads, GroupNorm groups).
    device, dtype: default to the base UNet's (CPU / float32 without one). Pass
        dtype=torch.float32 to train a control next to a half-precision frozen UNet.
    config: an explicit ControlNetConfig (e.g. `global_pool=True` for a 1.1 shuffle file).
    """
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "controlnet" / "config.json").is_file():
        path = path / "controlnet"  # a StableDiffusionControlNetPipeline folder
    checkpoint = open_checkpoint(path, only=("controlnet",))
    part = checkpoint.parts.get("controlnet")
    if part is None:
        raise CheckpointError(f"{path}: no ControlNet found (looked for control_model.*, model.control_model.*, "
                              f"a diffusers ControlNetModel); the file holds: {sorted(checkpoint.parts) or 'nothing known'}")
    stored = _metadata_control_config(part.file)
    if config is not None:
        part.config, part.config_source = config, "given explicitly"
    elif stored is not None:
        part.config, part.config_source = stored, "file metadata (written by defectsynth)"
    if unet is not None:
        try:
            part.config = fit_to_base(part.config, unet.config, str(path),
                                      from_shapes=part.config_source == "tensor shapes")
        except ConfigError as err:
            raise CheckpointError(str(err)) from err
        reference = next(unet.parameters())
        device = reference.device if device is None else device
        dtype = reference.dtype if dtype is None else dtype
    info, plans = analyse(checkpoint, ("controlnet",))
    if not info.ok:
        raise CheckpointError(f"{info.path}: cannot load the ControlNet strictly ({info.format}):\n{info.problems()}")
    return materialise(plans["controlnet"], device or "cpu", dtype or torch.float32)


def ldm_control_state_dict(control: ControlNet, base=None) -> dict[str, torch.Tensor]:
    """The tensors `save_control(layout="ldm")` writes, in file order.

    base None: ControlNet 1.1 layout, `control_model.*` only. base a StableDiffusion: ControlNet 1.0
    full layout, ControlLDM's state_dict order: the 12 schedule buffers, `logvar` (zeros, as
    ControlLDM initialises it), the SD model (`save_ldm`'s keys), then `control_model.*`.
    """
    control_tensors = {CONTROL_PREFIX + k: v for k, v in control.state_dict().items()}
    if base is None:
        return control_tensors
    if base.config.unet != control.config.unet:
        fit_to_base(control.config, base.config.unet, "save_control", from_shapes=False)  # raises, naming fields
    sd_tensors, _ = ldm_state_dict(base)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd_tensors.items():
        out[key] = tensor
        if key == layouts.SCHEDULE_BUFFERS[-1]:
            out["logvar"] = torch.zeros(LOGVAR_STEPS)
    out.update(control_tensors)
    return out


def diffusers_control_tensors(control: ControlNet) -> dict[str, torch.Tensor]:
    """Our ControlNet's tensors under diffusers ControlNetModel names."""
    state = control.state_dict()
    rules = COMPONENTS["controlnet"].layout("diffusers", control.config).rules(list(state))
    return to_theirs(rules, state)


def save_control(control: ControlNet, path: str | Path, layout: str = "ldm", base=None,
                 dtype: torch.dtype | str | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write a ControlNet; returns the path.

    layout "ldm": one `.safetensors` with the original keys (`control_model.*`, the ControlNet 1.1
        layout), or with `base=` a StableDiffusion, the ControlNet 1.0 full layout (SD + control).
        The metadata carries our configs, so a reload is exact even for toy configs.
    layout "diffusers": a ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors)
        that diffusers' `ControlNetModel.from_pretrained` loads; config.json is written last and
        marks a complete folder.
    dtype: None keeps each tensor's dtype; torch.float16 / "fp16" etc. casts floating tensors.
    metadata: extra string entries for the LDM file's header (e.g. train.condition's condition
        record); our own config keys cannot be overridden.
    """
    path = Path(path)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if layout == "ldm":
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: save_control writes .safetensors only (pickles can run code when loaded)")
        header = {**(metadata or {}), "format": "pt",
                  METADATA_CONTROL_CONFIG: json.dumps(config_to_dict(control.config), sort_keys=True)}
        if base is not None:
            header[METADATA_CONFIG] = json.dumps(config_to_dict(ldm_state_dict(base)[1]), sort_keys=True)
        save_safetensors(_cast(ldm_control_state_dict(control, base), dtype), path, metadata=header)
        return path
    if layout == "diffusers":
        if metadata:
            raise ValueError("save_control: metadata= is for the LDM file; a diffusers folder keeps extra "
                             "records in files of their own")
        if base is not None:
            raise ValueError("save_control: base= is for the LDM full layout; save the SD model with "
                             "weights.save_diffusers")
        if (path / "config.json").exists():
            (path / "config.json").unlink()  # the marker goes first, comes back last
        save_safetensors(_cast(diffusers_control_tensors(control), dtype), path / DIFFUSERS_WEIGHTS, {"format": "pt"})
        save_json(controlnet_config_to_diffusers(control.config), path / "config.json")
        return path
    raise ValueError(f"save_control: layout must be 'ldm' or 'diffusers', got {layout!r}")


def controlnet_summary(info: LoadInfo) -> str:
    """The lines `python -m weights.inspect` adds for a file holding a ControlNet."""
    report = info.components.get("controlnet")
    if report is None or report.config is None:
        return ""
    config: ControlNetConfig = report.config
    family = family_of_context(config.unet.context_dim)
    kind = ("ControlNet 1.0 full file (SD model + control_model.*)"
            if any(name != "controlnet" for name in info.components) else
            "diffusers ControlNetModel" if report.layout.startswith("diffusers") else
            "ControlNet 1.1 layout (control_model.* only)")
    levels, res = len(config.unet.channel_mult), config.unet.num_res_blocks
    return (f"ControlNet:      yes, {kind}\n"
            f"  layout:        {report.layout}\n"
            f"  base family:   {family} ({'SD 1.x' if family == 'sd1' else 'SD 2.x'}: text context "
            f"{config.unet.context_dim}, {config.unet.model_channels} channels x {config.unet.channel_mult}); "
            f"load with load_control(path, unet=<a {family} UNet>)\n"
            f"  residuals:     {1 + levels * res + levels - 1 + 1} (input blocks + middle); hint "
            f"{config.hint_channels} channels at {config.downsample_factor}x the latent size")

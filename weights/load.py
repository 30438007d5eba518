"""Strict loading of SD checkpoints into our modules, and the coverage report `inspect` prints.

    load_pipeline(path)        single file (.safetensors / .ckpt / .pth) or diffusers folder -> StableDiffusion
    load_unet / load_vae / load_text_encoder(path)   one component, from a component folder or a file
    inspect_checkpoint(path)   the same analysis on meta tensors: no weights are read

How a load works:
1. `open_checkpoint` recognises the format (single file, diffusers pipeline or component folder,
   manifest) and each component's layout (weights/components.py signatures), and refuses
   models we do not implement (SDXL, inpainting) with the reason. ControlNet parts are
   recognised too (weights/controlnet.py loads them: `load_control`).
2. The config comes from config.json, from the `defectsynth.sd_config` metadata our own
   `save_ldm` writes, or from the tensor shapes (weights/configs.py).
3. Each module is built on the meta device; its layout's rules (weights/keymap.py) are checked
   against the file on meta tensors: missing keys, shape mismatches and unexpected keys are
   collected. Keys in `layouts.KNOWN_EXTRAS` are ignored (and counted).
4. Only a clean plan is materialised: one tensor at a time is read, transformed, cast to the
   requested dtype and device, then `load_state_dict(strict=True, assign=True)` adopts them, so a
   4 GB file never exists twice in memory. A final check proves no meta tensor is left.

Prediction type (epsilon vs v) cannot be read from SD weights. `decide_prediction_type` documents
the rule used; the choice and its reason are in `LoadInfo` and scripts print them.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from defectsynth.runconfig import config_from_dict
from model.schedule import NoiseSchedule
from model.stable_diffusion import PRESETS, SDConfig, StableDiffusion
from weights import layouts
from weights.components import COMPONENTS, SD_COMPONENTS, UNSUPPORTED_KEYS, Component, Signature
from weights.configs import ConfigError, family_of_context
from weights.files import (CheckpointError, MergedFile, TensorFile, first_existing, open_tensor_file,
                           read_manifest)
from weights.checks import count_non_finite, dtype_problems, non_finite_error, scan_non_finite
from weights.keymap import Layout, Rule

log = logging.getLogger("weights")

METADATA_CONFIG = "defectsynth.sd_config"       # safetensors metadata key written by save_ldm
SD2_TEXT_EXTRA = "sd2_text_extra.safetensors"     # see weights/save.py: what diffusers drops from SD 2.x text
EXAMPLES = 5                                      # keys listed per problem in error messages


# ---------------------------------------------------------------------------------------------
# Opening: which components, in which layout, with which config
@dataclass
class Part:
    """One component's tensors inside a checkpoint."""
    component: str
    file: TensorFile
    layout_kind: str
    prefix: str
    describes: str
    config: Any = None
    config_source: str = ""
    sample_size: int | None = None                # diffusers config.json sample_size (latent pixels)


@dataclass
class Checkpoint:
    path: str
    format: str                                   # "single file", "diffusers folder", "component folder", "manifest"
    parts: dict[str, Part]
    files: list[TensorFile]
    scheduler: dict[str, Any] | None = None       # diffusers scheduler_config.json
    unet_sample_size: int | None = None


def _check_unsupported(file: TensorFile) -> None:
    for key in file.keys():
        for pattern, reason in UNSUPPORTED_KEYS:
            if key.startswith(pattern):
                raise CheckpointError(f"{file.path}: not supported: {reason} (found key {key!r})")


def _detect(file: TensorFile, component: Component) -> Signature | None:
    for signature in component.signatures:
        if all(signature.prefix + key in file for key in signature.keys):
            return signature
    return None


def _strip(file: TensorFile, prefix: str) -> dict[str, tuple[int, ...]]:
    n = len(prefix)
    return {k[n:]: file.shape(k) for k in file.keys() if k.startswith(prefix)}


def _metadata_config(file: TensorFile) -> SDConfig | None:
    text = file.metadata.get(METADATA_CONFIG)
    if not text:
        return None
    try:
        return config_from_dict(SDConfig, json.loads(text), source=f"{file.path} metadata {METADATA_CONFIG}")
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{file.path}: metadata {METADATA_CONFIG} is not a valid SDConfig ({err})") from err


def _single_file_parts(file: TensorFile, only: tuple[str, ...] | None = None) -> dict[str, Part]:
    _check_unsupported(file)
    parts = {}
    sd_config = _metadata_config(file)
    for name, component in COMPONENTS.items():
        signature = _detect(file, component)
        if signature is None:
            continue
        part = Part(name, file, signature.layout, signature.prefix, signature.describes)
        if only is None or name in only:
            if sd_config is not None and getattr(sd_config, {"text_encoder": "text"}.get(name, name), None):
                part.config = getattr(sd_config, {"text_encoder": "text"}.get(name, name))
                part.config_source = "file metadata (written by defectsynth)"
            else:
                try:
                    part.config = component.infer_config(signature.layout, _strip(file, signature.prefix),
                                                         f"{file.path} [{name}]")
                except ConfigError as err:
                    raise CheckpointError(str(err)) from err
                part.config_source = "tensor shapes"
        parts[name] = part
    if not parts:
        keys = file.keys()
        raise CheckpointError(
            f"{file.path}: unknown layout: no SD 1.x/2.x component found among {len(keys)} keys (looked for "
            f"LDM prefixes model.diffusion_model. / first_stage_model. / cond_stage_model., bare LDM, diffusers, "
            f"transformers and OpenCLIP names); first keys: {keys[:EXAMPLES]}")
    unet = parts.get("unet")
    if unet is not None and unet.config is not None and unet.config.in_channels != 4:
        what = "an inpainting UNet (latents + mask + masked image)" if unet.config.in_channels == 9 else \
            "not a text-to-image UNet (depth-to-image has 5, the x4 upscaler 7)"
        raise CheckpointError(f"{file.path}: not supported: the UNet takes {unet.config.in_channels} input channels, "
                              f"{what}; defectsynth loads 4-channel SD 1.x / 2.x text-to-image UNets "
                              f"(key {unet.prefix}{'input_blocks.0.0.weight' if unet.layout_kind == 'ldm' else 'conv_in.weight'})")
    return parts


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({err})") from err


def _pad_token_id(folder: Path) -> int | None:
    """The tokenizer's pad id from a sibling tokenizer/ folder: "!" (0) for SD 2.x, EOS for SD 1.x."""
    special = folder.parent / "tokenizer" / "special_tokens_map.json"
    if not special.is_file():
        return None
    pad = _read_json(special).get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return {"!": 0, "<|endoftext|>": 49407}.get(pad)


def _component_folder(folder: Path, expect: str | None = None) -> Part:
    """A diffusers / transformers component folder: config.json + weights."""
    cfg = _read_json(folder / "config.json")
    cls = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
    matches = [c for c in COMPONENTS.values() if cls in c.folder_classes]
    if not matches:
        supported = sorted(cls for c in COMPONENTS.values() for cls in c.folder_classes)
        raise CheckpointError(f"{folder / 'config.json'}: component class {cls!r} is not supported "
                              f"(supported: {supported})")
    component = matches[0]
    if expect is not None and component.name != expect:
        raise CheckpointError(f"{folder}: holds a {cls} ({component.name}), expected a {expect}")
    weights = first_existing(folder, component.weight_files)
    if weights is None:
        raise CheckpointError(f"{folder}: no weights file; looked for {list(component.weight_files)}")
    file = open_tensor_file(weights)
    _check_unsupported(file)
    signature = _detect(file, component)
    if signature is None or (component.name != "text_encoder" and not signature.layout.startswith("diffusers")):
        raise CheckpointError(f"{weights}: keys do not match the {cls} layout of its config.json; "
                              f"first keys: {file.keys()[:EXAMPLES]}")
    source = str(folder / "config.json")
    try:
        if component.name == "text_encoder":
            extra_path = folder / SD2_TEXT_EXTRA
            extra_layers, projection = 0, None
            if extra_path.is_file():
                extra = open_tensor_file(extra_path)
                extra_layers = _count_text_layers(extra.keys())
                projection = extra.shape("text_projection")[1] if "text_projection" in extra else None
                file = MergedFile(str(weights), [file, extra], ["", signature.prefix])
            config = component.config_from_json(cfg, source, pad_token_id=_pad_token_id(folder),
                                                 extra_layers=extra_layers, projection_dim=projection)
        else:
            config = component.config_from_json(cfg, source)
    except ConfigError as err:
        raise CheckpointError(str(err)) from err
    return Part(component.name, file, signature.layout, signature.prefix, signature.describes,
                config, "config.json" + (f" + {SD2_TEXT_EXTRA}" if isinstance(file, MergedFile) else ""),
                cfg.get("sample_size"))


def _count_text_layers(keys: list[str]) -> int:
    return len({m.group(1) for k in keys if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})


def open_checkpoint(path: str | Path, only: tuple[str, ...] | None = None) -> Checkpoint:
    """Recognise a checkpoint: single file, diffusers pipeline folder, component folder or manifest."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            part = _component_folder(path)
            return Checkpoint(str(path), "component folder", {part.component: part}, [part.file],
                              unet_sample_size=part.sample_size if part.component == "unet" else None)
        subfolders = [name for name in SD_COMPONENTS if (path / name / "config.json").is_file()]
        if not subfolders:
            raise CheckpointError(f"{path}: neither a diffusers pipeline folder (model_index.json with unet/, vae/, "
                                  f"text_encoder/) nor a component folder (config.json)")
        parts = {name: _component_folder(path / name, expect=name) for name in subfolders
                 if only is None or name in only}
        scheduler_file = path / "scheduler" / "scheduler_config.json"
        scheduler = _read_json(scheduler_file) if scheduler_file.is_file() else None
        sample_size = parts["unet"].sample_size if "unet" in parts else None
        return Checkpoint(str(path), "diffusers folder", parts, [p.file for p in parts.values()], scheduler,
                          sample_size)
    if path.suffix == ".json" or path.name.endswith(".json.gz"):
        if not path.name.endswith(".index.json"):
            file = read_manifest(path)
            return Checkpoint(str(path), "manifest", _single_file_parts(file, only), [file])
    file = open_tensor_file(path)
    return Checkpoint(str(path), "single file", _single_file_parts(file, only), [file])


# ---------------------------------------------------------------------------------------------
# Prediction type
def decide_prediction_type(family: str, checkpoint: Checkpoint, explicit: str | None = None,
                           metadata_config: SDConfig | None = None) -> tuple[str, str]:
    """(prediction_type, how it was decided). The weights do not say; this is a documented guess.

    1. `explicit` (the `prediction_type=` argument / `--prediction-type` flag) always wins.
    2. A diffusers folder's scheduler/scheduler_config.json `prediction_type`.
    3. The `defectsynth.sd_config` metadata of a file our save_ldm wrote.
    4. SD 1.x: epsilon (every SD 1.x release is an epsilon model).
    5. SD 2.x single files, by file name: a "768" or "v" token (v2-1_768-ema-pruned, 768-v-ema)
       -> v_prediction; a "512" or "base" token (v2-1_512-ema-pruned, 512-base-ema) -> epsilon.
    6. SD 2.x .ckpt files with global_step 875000 (the 512-base release) -> epsilon, as diffusers does.
    7. Otherwise SD 2.x -> v_prediction: the 2.0/2.1 768 models are the common ones. A guess; pass
       prediction_type="epsilon" for a 512-base-derived model.
    """
    if explicit is not None:
        if explicit not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {explicit!r}")
        return explicit, "given explicitly"
    if checkpoint.scheduler is not None and checkpoint.scheduler.get("prediction_type"):
        value = checkpoint.scheduler["prediction_type"]
        if value not in ("epsilon", "v_prediction"):
            raise CheckpointError(f"{checkpoint.path}: scheduler prediction_type {value!r} is not supported "
                                  f"(epsilon, v_prediction)")
        return value, "scheduler/scheduler_config.json"
    if metadata_config is not None:
        return metadata_config.prediction_type, "file metadata (written by defectsynth)"
    if family == "sd1":
        return "epsilon", "SD 1.x (all SD 1.x releases predict epsilon)"
    tokens = set(re.split(r"[-_.\s]+", Path(checkpoint.path).stem.lower()))
    if tokens & {"768", "v"}:
        return "v_prediction", f"SD 2.x file name {Path(checkpoint.path).name!r} says 768 / v (a guess)"
    if tokens & {"512", "base"}:
        return "epsilon", f"SD 2.x file name {Path(checkpoint.path).name!r} says 512 / base (a guess)"
    for file in checkpoint.files:
        if file.info.get("global_step") == 875000:
            return "epsilon", "SD 2.x global_step 875000 = the 512-base release (a guess)"
    return "v_prediction", ("SD 2.x default: the 768 releases are v models (a guess; pass "
                            "prediction_type='epsilon' for 512-base models)")


# ---------------------------------------------------------------------------------------------
# Planning on meta tensors
@dataclass
class ComponentReport:
    """How one component maps onto the file: filled on meta tensors, before any weight is read."""
    name: str
    layout: str
    config: Any
    config_source: str
    parameters: int = 0
    keys: int = 0                                         # our state-dict keys
    matched: int = 0                                      # our keys found with the right shape
    missing: list[str] = field(default_factory=list)      # file keys a rule needs but the file lacks
    mismatched: list[str] = field(default_factory=list)   # "file key (our key): file shape vs expected"
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched or self.errors)


@dataclass
class LoadInfo:
    """What a load found and decided; returned by load_pipeline(..., return_info=True) and inspect."""
    path: str
    format: str
    family: str
    prediction_type: str | None
    prediction_reason: str
    ema: bool
    components: dict[str, ComponentReport]
    judged_as: str = ""                                      # which loader the coverage is for
    file_keys: int = 0
    known_extras: dict[str, list[str]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    not_loaded: dict[str, int] = field(default_factory=dict)  # other components' keys this load skipped
    non_finite: list[str] = field(default_factory=list)     # "key: N of M values are NaN/inf" (check_values)

    @property
    def ok(self) -> bool:
        return not self.unexpected and not self.non_finite and all(r.ok for r in self.components.values())

    def problems(self) -> str:
        lines = []
        for report in self.components.values():
            if report.missing:
                lines.append(f"{report.name}: {len(report.missing)} missing key(s), e.g. {report.missing[:EXAMPLES]}")
            if report.mismatched:
                lines.append(f"{report.name}: {len(report.mismatched)} shape mismatch(es): "
                             + "; ".join(report.mismatched[:EXAMPLES]))
            lines += [f"{report.name}: {e}" for e in report.errors]
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected key(s), e.g. {self.unexpected[:EXAMPLES]}")
        if self.non_finite:
            lines.append(f"{len(self.non_finite)} tensor(s) hold NaN/inf (damaged weights), first: {self.non_finite[0]}")
        return "\n".join(lines)

    def summary(self) -> str:
        """The human-readable report `python -m weights.inspect` prints."""
        lines = [f"path:            {self.path}", f"format:          {self.format}", f"family:          {self.family}"]
        if self.prediction_type is not None:
            lines.append(f"prediction type: {self.prediction_type}  ({self.prediction_reason})")
        else:
            lines.append(f"prediction type: n/a ({self.prediction_reason})")
        lines.append(f"ema weights:     {'yes' if self.ema else 'no'}")
        lines.append(f"judged as:       {self.judged_as}")
        lines.append("components:")
        for r in self.components.values():
            if r.config is None:
                lines.append(f"  {r.name:<13} absent")
                continue
            lines.append(f"  {r.name:<13} {r.layout}; {r.parameters:,} parameters; config from {r.config_source}")
            lines.append(f"  {'':<13} {r.config}")
            lines.append(f"  {'':<13} keys: {r.matched}/{r.keys} matched, {len(r.missing)} missing, "
                         f"{len(r.mismatched)} shape mismatches" + (f", {len(r.errors)} errors" if r.errors else ""))
        extras = sum(len(v) for v in self.known_extras.values())
        lines.append(f"file keys:       {self.file_keys}")
        lines.append(f"known extras:    {extras}" + ("".join(f"\n  {g}: {len(k)}" for g, k in self.known_extras.items())))
        for name, count in self.not_loaded.items():
            lines.append(f"not loaded:      {name}: {count} keys")
        lines.append(f"unexpected:      {len(self.unexpected)}" + (f", e.g. {self.unexpected[:EXAMPLES]}" if self.unexpected else ""))
        problems = self.problems()
        lines.append("result:          " + ("loads strictly" if self.ok else "WOULD NOT LOAD\n" + problems))
        return "\n".join(lines)


@dataclass
class Plan:
    """A component ready to materialise: its meta module, rules and source file."""
    part: Part
    module: nn.Module
    rules: list[Rule]
    report: ComponentReport


def _layout_for(part: Part, ema: bool) -> Layout:
    component = COMPONENTS[part.component]
    if part.component == "unet" and ema:
        if part.layout_kind != "ldm" or part.prefix != layouts.LDM_UNET:
            raise CheckpointError(f"{part.file.path}: ema=True needs an LDM single file with model_ema.* weights; "
                                  f"this UNet is a {part.describes}")
        first = layouts.LDM_UNET_EMA + "diffusion_model"
        if not any(k.startswith(first) for k in part.file.keys()):
            raise CheckpointError(f"{part.file.path}: ema=True but the file has no EMA weights ({first}*); "
                                  f"it is a pruned or EMA-only file: load it with ema=False")
        return component.layout("ldm-ema", part.config)
    return component.layout(part.layout_kind, part.config).with_prefix(part.prefix)


def plan_component(part: Part, ema: bool = False) -> Plan:
    """Build the module on meta and check every rule against the file's shapes (no data read)."""
    component = COMPONENTS[part.component]
    layout = _layout_for(part, ema and part.component == "unet")
    with torch.device("meta"):
        module = component.module(part.config)
    ours = module.state_dict()
    report = ComponentReport(part.component, f"{part.describes} [{layout.name}, prefix {layout.prefix or '(none)'}]",
                             part.config, part.config_source, sum(t.numel() for t in ours.values()), len(ours))
    rules = _rules(layout, ours, report)
    if rules is None:
        return Plan(part, module, [], report)
    report.errors += dtype_problems(rules, part.file, ours)
    for rule in rules:
        absent = [k for k in rule.theirs if k not in part.file]
        if absent:
            report.missing += absent
            continue
        converted = rule.transform.to_ours([part.file.meta(k) for k in rule.theirs]) \
            if _shapes_fit(rule, part.file) else None
        expected = [tuple(ours[k].shape) for k in rule.ours]
        found = [tuple(t.shape) for t in converted] if converted is not None else None
        if found != expected:
            shapes = [part.file.shape(k) for k in rule.theirs]
            report.mismatched.append(f"file key {', '.join(rule.theirs)} (our {', '.join(rule.ours)}): "
                                     f"file shape {', '.join(map(str, shapes))}, expected "
                                     f"{', '.join(map(str, expected))}" + (f" after {rule.transform.name}"
                                                                          if rule.transform.name != "copy" else ""))
        else:
            report.matched += len(rule.ours)
    return Plan(part, module, rules, report)


def _rules(layout: Layout, ours: Mapping[str, torch.Tensor], report: ComponentReport) -> list[Rule] | None:
    try:
        return layout.rules(list(ours))
    except KeyError as err:
        report.errors.append(str(err))
        return None


def _shapes_fit(rule: Rule, file: TensorFile) -> bool:
    """Whether a transform can run on the file's shapes (e.g. a fused qkv divisible by 3)."""
    try:
        rule.transform.to_ours([file.meta(k) for k in rule.theirs])
        return True
    except (RuntimeError, ValueError, IndexError):
        return False


def analyse(checkpoint: Checkpoint, components: tuple[str, ...], ema: bool = False,
            prediction_type: str | None = None) -> tuple[LoadInfo, dict[str, Plan]]:
    """Plans for `components` and the whole-checkpoint coverage (LoadInfo)."""
    plans: dict[str, Plan] = {}
    missing_components = [c for c in components if c not in checkpoint.parts]
    for name in components:
        if name in checkpoint.parts:
            plans[name] = plan_component(checkpoint.parts[name], ema)
    used: dict[int, set[str]] = {id(f): set() for f in checkpoint.files}
    for plan in plans.values():
        used[id(plan.part.file)].update(k for rule in plan.rules for k in rule.theirs)
    loaders = ["load_pipeline"] if set(SD_COMPONENTS) <= set(components) else \
        [f"load_{name}" for name in components if name in SD_COMPONENTS]
    loaders += ["load_control"] if "controlnet" in components else []
    info = LoadInfo(checkpoint.path, checkpoint.format, "unknown", None, "", ema,
                    {name: plan.report for name, plan in plans.items()}, " + ".join(loaders))
    for name in missing_components:
        found = sorted(checkpoint.parts)
        info.components[name] = ComponentReport(name, "absent", None, "", errors=[
            f"no {name} in {checkpoint.path} (found: {found or 'nothing'})"])
    skipped = {n: p for n, p in checkpoint.parts.items() if n not in plans}
    for file in checkpoint.files:
        for key in file.keys():
            info.file_keys += 1
            if key in used[id(file)]:
                continue
            owner = next((n for n, p in skipped.items() if p.file is file and key.startswith(p.prefix) and p.prefix), None)
            if owner is not None:
                info.not_loaded[owner] = info.not_loaded.get(owner, 0) + 1
                continue
            group = layouts.known_extra(key, ema)
            if group is not None:
                info.known_extras.setdefault(group, []).append(key)
            else:
                info.unexpected.append(key)
    info.family = _family(checkpoint, plans)
    if "unet" in checkpoint.parts and info.family != "unknown":
        metadata = next((c for f in checkpoint.files if (c := _metadata_config(f)) is not None), None)
        info.prediction_type, info.prediction_reason = decide_prediction_type(
            info.family, checkpoint, prediction_type, metadata)
    else:
        info.prediction_reason = "no UNet in this checkpoint"
    return info, plans


def _family(checkpoint: Checkpoint, plans: Mapping[str, Plan]) -> str:
    """SD 1.x vs 2.x: the UNet's context width (768 / 1024), else the text encoder layout."""
    unet = checkpoint.parts.get("unet")
    text = checkpoint.parts.get("text_encoder")
    control = checkpoint.parts.get("controlnet")
    if unet is None and text is None and control is not None and control.config is not None:
        return family_of_context(control.config.unet.context_dim)  # the base a ControlNet alone was made for
    text_family = None
    if text is not None and text.config is not None:
        text_family = "sd2" if (text.layout_kind == "openclip" or text.config.activation == "gelu") else "sd1"
    if unet is not None and unet.config is not None:
        context = unet.config.context_dim
        if context in (768, 1024):
            family = family_of_context(context)
            if text_family is not None and text_family != family:
                raise CheckpointError(f"{checkpoint.path}: the UNet's context width {context} says {family} "
                                      f"but the text encoder ({text.describes}) says {text_family}")
            return family
        return text_family or "sd1"
    if text_family is None and "vae" in checkpoint.parts:
        return "sd1/sd2 (VAE only: both families share it)"
    return text_family or "unknown"


# ---------------------------------------------------------------------------------------------
# Materialising
def _meta_leftovers(module: nn.Module) -> list[str]:
    names = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    for attr, value in vars(module).items():
        for inner, tensor in (vars(value).items() if hasattr(value, "__dict__") and not isinstance(value, nn.Module)
                              else ()):
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                names.append(f"{attr}.{inner}")
    return names


def materialise(plan: Plan, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Read the plan's tensors one at a time into the meta module (strict, assign)."""
    file = plan.part.file
    state: dict[str, torch.Tensor] = {}
    for rule in plan.rules:
        tensors = [file.get(k) for k in rule.theirs]
        for key, tensor in zip(rule.theirs, tensors):
            bad = count_non_finite(tensor)  # before the cast: an fp16 inf stays inf, a NaN NaN
            if bad:
                raise non_finite_error(file.path, key, bad, tensor.numel())
        for our_key, tensor in zip(rule.ours, rule.transform.to_ours(tensors)):
            if tensor.is_floating_point():
                tensor = tensor.to(device=device, dtype=dtype)
            else:
                tensor = tensor.to(device=device)
            state[our_key] = tensor
    try:
        plan.module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # only reachable if a plan was not checked
        raise CheckpointError(f"{file.path}: {plan.part.component}: {err}") from err
    leftovers = _meta_leftovers(plan.module)
    if leftovers:
        raise CheckpointError(f"{file.path}: {plan.part.component}: tensors still on the meta device after "
                              f"loading: {leftovers[:EXAMPLES]}")
    return plan.module.eval()


def _raise_if_bad(info: LoadInfo) -> None:
    if not info.ok:
        raise CheckpointError(f"{info.path}: cannot load strictly ({info.format}):\n{info.problems()}")


def _load_one(path, name: str, device, dtype, config, ema: bool = False) -> nn.Module:
    checkpoint = open_checkpoint(path, only=(name,))
    if config is not None and name in checkpoint.parts:
        checkpoint.parts[name].config = config
        checkpoint.parts[name].config_source = "given explicitly"
    info, plans = analyse(checkpoint, (name,), ema=ema)
    _raise_if_bad(info)
    return materialise(plans[name], device, dtype)


def load_unet(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              config=None, ema: bool = False) -> nn.Module:
    """Our UNet from a diffusers `unet/` folder, a pipeline folder, or a single file (LDM, bare LDM or
    diffusers state dict). `config` overrides the derived UNetConfig; `ema` picks LDM EMA weights."""
    return _load_one(path, "unet", device, dtype, config, ema)


def load_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             config=None) -> nn.Module:
    """Our AutoencoderKL from a diffusers `vae/` folder, a pipeline folder, an SD single file or a
    standalone VAE file (`encoder.*`/`decoder.*`, its `loss.*` and EMA scalars ignored)."""
    return _load_one(path, "vae", device, dtype, config)


def load_text_encoder(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      config=None) -> nn.Module:
    """Our TextEncoder from a transformers CLIPTextModel folder (4.x or 5.x layout), a pipeline folder,
    an SD 1.x/2.x single file or an OpenCLIP text state dict (`cond_stage_model.model.*` or bare)."""
    return _load_one(path, "text_encoder", device, dtype, config)


def _image_size(family: str, prediction_type: str, parts: Mapping[str, Part], checkpoint: Checkpoint,
                metadata: SDConfig | None) -> int:
    if metadata is not None:
        return metadata.image_size
    factor = parts["vae"].config.downsample_factor
    if checkpoint.unet_sample_size:
        return checkpoint.unet_sample_size * factor
    for cfg in PRESETS.values():
        if (cfg.unet, cfg.vae, cfg.text, cfg.prediction_type) == (parts["unet"].config, parts["vae"].config,
                                                                  parts["text_encoder"].config, prediction_type):
            return cfg.image_size
    return 768 if (family == "sd2" and prediction_type == "v_prediction") else 512


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  prediction_type: str | None = None, ema: bool = False, return_info: bool = False):
    """A StableDiffusion from an SD 1.x/2.x single file or diffusers folder, strictly.

    dtype: floating tensors are cast to it (fp16/bf16 files load as float32 by default).
    prediction_type: "epsilon" / "v_prediction"; None = `decide_prediction_type`'s documented guess.
    ema: load the UNet from the file's `model_ema.*` copies (an error if it has none).
    return_info: also return the `LoadInfo` (what was found, the prediction type and why).
    """
    checkpoint = open_checkpoint(path)
    info, plans = analyse(checkpoint, SD_COMPONENTS, ema=ema, prediction_type=prediction_type)
    _raise_if_bad(info)
    metadata = next((c for f in checkpoint.files if (c := _metadata_config(f)) is not None), None)
    parts = checkpoint.parts
    try:
        config = SDConfig(info.family, info.prediction_type, parts["unet"].config, parts["vae"].config,
                          parts["text_encoder"].config,
                          _image_size(info.family, info.prediction_type, parts, checkpoint, metadata))
    except ValueError as err:
        raise CheckpointError(f"{checkpoint.path}: the components do not form one SD model: {err}") from err
    log.info("%s: %s, prediction type %s (%s)", checkpoint.path, info.family, info.prediction_type,
             info.prediction_reason)
    with torch.device("meta"):
        model = StableDiffusion(config)
    for name in SD_COMPONENTS:
        setattr(model, name, materialise(plans[name], device, dtype))
    model.schedule = NoiseSchedule()  # the one built above lives on the meta device
    leftovers = _meta_leftovers(model)
    if leftovers:
        raise CheckpointError(f"{checkpoint.path}: tensors still on the meta device after loading: {leftovers[:EXAMPLES]}")
    model.eval()
    return (model, info) if return_info else model


def inspect_checkpoint(path: str | Path, ema: bool = False, prediction_type: str | None = None,
                       check_values: bool = False) -> LoadInfo:
    """What `load_pipeline` (or, for a single-component file, load_unet / load_vae /
    load_text_encoder) would do with `path`, on meta tensors: no weights are read, unless
    `check_values`, which then reads every tensor the load would use once and lists those holding
    NaN / inf (`LoadInfo.non_finite`; the load itself refuses them)."""
    checkpoint = open_checkpoint(path)
    # An SD single file (LDM prefixes) or a diffusers pipeline folder is judged as load_pipeline
    # would (all three components needed); a bare component (a diffusers unet/ state dict, a VAE
    # file, a text encoder) as load_unet / load_vae / load_text_encoder would.
    # A ControlNet 1.0 full file (SD + control_model.*) is judged as both loads.
    pipeline = checkpoint.format == "diffusers folder" or any(
        p.prefix.startswith(("model.", "first_stage_model.", "cond_stage_model."))
        for name, p in checkpoint.parts.items() if name in SD_COMPONENTS)
    wanted = SD_COMPONENTS + tuple(n for n in checkpoint.parts if n not in SD_COMPONENTS) if pipeline \
        else tuple(checkpoint.parts)
    info, plans = analyse(checkpoint, wanted, ema=ema, prediction_type=prediction_type)
    if check_values:
        info.non_finite = scan_non_finite(plans)
    return info

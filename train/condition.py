"""Learn the condition (paper 4.2): a ControlNet control copy of the concept-tuned UNet.

    python -m train.condition --ckpt runs/concept/concept.safetensors --data runs/demo --out runs/condition
    python -m train.condition --preset tiny --random-weights --data runs/demo --out runs/tiny --steps 20
    python -m train.condition ... --condition inpaint                # the inpainting baseline (paper 5.3)
    torchrun --nproc_per_node 2 -m train.condition ...               # data parallel, rank 0 writes

The control copy is `ControlNet.from_unet(tuned UNet)`: its time embedding, input blocks and middle
block start as copies of the UNet's, every residual leaves through a zero-initialised 1x1 conv, so
at step 0 the controlled UNet computes exactly what the UNet alone does. The UNet (and VAE, text
encoder) stay frozen; only the control copy trains, on

    (defective image, its hint, prompt "an image of a sks with a <class> crack")

with the plain diffusion objective: loss = mean((unet(z_t, t, c, control(z_t, t, c, hint)) - target)^2),
target eps or v per the model's prediction type (train/diffusion.py). As in the original
(lllyasviel/ControlNet cldm):
  - prompts are replaced by "" with probability --drop-prompt-rate (0.5, as the ControlNet paper
    trains; Valvano et al. state no rate), so the
    control learns to read the hint alone; the draws come from their own seeded generator;
  - --no-sd-locked also trains the UNet's decoder half (output_blocks + out) at --decoder-lr;
  - --only-mid-control adds only the middle-block residual; the skip residuals' zero convs then
    get no gradient and stay exactly zero, so the exported control drives any runner the same way.

The hint (--condition): "driver", the topological driver (data/drivers.py), or "inpaint", the image
itself with its masks painted in class colour (data/hints.py), the paper's inpainting-style baseline.

Convergence: ControlNet training converges "suddenly" and the loss says little, so every validation
round generates one sample per fixed validation driver (fixed seeds) and scores how well each
follows its driver, with no learned model (data/adherence.py: topology re-extracted from the sample
vs the driver's, and defect contrast inside each mask). OUT/curves.png plots loss and adherence
over steps; OUT/validation/step_*.png shows driver | [hint |] sample rows.

Outputs (OUT):
    control.safetensors   the control, original ControlNet 1.1 layout (control_model.*); metadata:
                          the ControlNet config and the condition record (data/hints.py)
    controlnet/           the same as a diffusers ControlNetModel folder (+ defectsynth_condition.json)
    base.safetensors      the SD model the control drives: a hard link (or copy) of --ckpt when it is a
                          .safetensors file and the UNet stayed locked, else the model re-saved
                          (with --no-sd-locked: the tuned decoder)
    diffusers/            with --save-diffusers: the base as a diffusers pipeline folder
    control_ema.safetensors (base_ema.safetensors)   with --ema --export-ema
    checkpoints/, metrics.jsonl, curves.png, validation/, config.json
`python -m sample.generate --ckpt OUT/base.safetensors --control OUT/control.safetensors --hint D.png`
draws from it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.adherence import adherence, estimate_polarity
from data.coco import load_coco
from data.datasets import ConditionDataset
from data.drivers import THRESHOLD_METHODS, UPSAMPLING, DriverConfig
from data.files import write_json_atomic
from data.hints import CONDITION_METADATA_KEY, DIFFUSERS_CONDITION_FILE, HINT_KINDS, inpaint_hint
from data.images import tensor_to_image
from data.prompts import PromptConfig
from data.seeding import derive_seed
from defectsynth.errors import UserError, command
from defectsynth.runconfig import config_from_args, parser_from_dataclass, save_config_json
from model.controlnet import ControlNet
from model.stable_diffusion import StableDiffusion
from sample.pipeline import SAMPLERS, generate, random_pipeline
from sample.runtime import compile_module
from train.checkpoint import (archive_previous_run, checkpoint_name, refuse_to_overwrite, resolve_resume, strip_prefix,
                              with_prefix)
from train.data_order import IndexStream
from train.diffusion import diffusion_target, encode_posterior, sample_latents, sample_noise, sample_timesteps
from train.distributed import (all_reduce_mean, any_rank, barrier, distributed_session, grad_sync, unwrap,
                               wrap_ddp)
from train.ema import EMA
from train.monitor import MetricsLog, StopSignal, check_finite, progress_bar, save_image_grid, window_mean
from train.optim import build_adamw, lr_multiplier, optimizer_step, param_group
from train.plot import Curve, plot_curves
from train.precision import autocast, frozen_copy, make_grad_scaler, precision_dtype, resolve_precision
from train.options import RESUMABLE_CHANGES as FINE_TUNE_RESUMABLE, VALIDATION_STEPS_REFUSAL, FineTuneOptions
from train.state import restore_training_state, save_training_state
from weights import load_pipeline, save_control, save_diffusers, save_ldm

DECODER_PREFIXES = ("output_blocks.", "out.")  # the UNet half --no-sd-locked trains
# Fields that may change between a run and its resumption (they do not change what is trained).
RESUMABLE_CHANGES = FINE_TUNE_RESUMABLE | {"num_validation_images", "validation_data", "validation_sampler"}


@dataclass(frozen=True)
class ConditionConfig(FineTuneOptions):
    """Learn the condition: train a ControlNet control copy of the tuned SD UNet (paper 4.2).
    The model, optimiser and run fields it shares with train.concept are in train/options.py."""

    ckpt: str = field(default="", metadata={"help": "the concept-tuned SD model (train.concept's "
                                                    "concept.safetensors), any SD file or diffusers folder"})
    data: str = field(default="", metadata={"help": "annotated defective images: a COCO folder holding "
                                                    "annotations.json, or the COCO JSON itself"})
    steps: int = field(default=5000, metadata={
        "help": "optimizer steps (ours: neither this paper nor ControlNet's fixes a count)"})
    seed: int = field(default=0, metadata={"help": "run seed (data order, noise, prompt dropping, samples)"})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between checkpoints (0: end only)"})
    validation_sampler_steps: int = field(default=20, metadata={
        "help": "sampler steps of each validation sample (not an interval: that is --validate-every)",
        "formerly": ("validation_steps",), "refuse_formerly": VALIDATION_STEPS_REFUSAL})
    save_diffusers: bool = field(default=False, metadata={"help": "also write the base as OUT/diffusers"})
    condition: str = field(default="driver", metadata={
        "help": "the hint: the topological driver, or the inpainting baseline (image with painted masks)",
        "choices": list(HINT_KINDS)})
    # ---- topological driver (data/drivers.py; synthesis must use the same values)
    driver_downscale: int = field(default=4, metadata={"help": "driver: threshold at 1/N resolution"})
    driver_threshold_method: str = field(default="gaussian", metadata={
        "help": "driver: adaptive threshold window", "choices": sorted(THRESHOLD_METHODS)})
    driver_block_size: int = field(default=11, metadata={"help": "driver: odd window side (downscaled px)"})
    driver_threshold_c: float = field(default=2.0, metadata={"help": "driver: constant below the local mean"})
    driver_background_level: int = field(default=50, metadata={"help": "driver: grey level of the topology"})
    driver_upsample: str = field(default="linear", metadata={"help": "driver: resize back",
                                                             "choices": sorted(UPSAMPLING)})
    driver_inpaint_defects: bool = field(default=False, metadata={
        "help": "driver: threshold the image with its defects inpainted, so no halo of changed topology "
                "surrounds the paint (ours, beyond the paper; measured in docs/data.md)"})
    # ---- prompts (data/prompts.py)
    identifier: str = field(default="sks", metadata={"help": "the concept's identifier token [V]"})
    prompt_template: str = field(default=PromptConfig.template, metadata={"help": "prompt for one defect class"})
    multi_prompt_template: str = field(default=PromptConfig.multi_template, metadata={
        "help": "prompt for several defect classes"})
    empty_prompt_template: str = field(default=PromptConfig.empty_template, metadata={
        "help": "prompt for an image without annotations"})
    drop_prompt_rate: float = field(default=0.5, metadata={
        "help": "fraction of prompts replaced by \"\" (0.5: the ControlNet paper's training; this paper states none)"})
    # ---- control (as the original ControlNet)
    sd_locked: bool = field(default=True, metadata={
        "help": "keep the whole UNet frozen; --no-sd-locked also trains its decoder (output_blocks + out)"})
    only_mid_control: bool = field(default=False, metadata={"help": "add only the middle-block residual"})
    # ---- optimisation
    batch_size: int = field(default=4, metadata={"help": "images per micro-batch and rank"})
    lr: float = field(default=1e-5, metadata={"help": "control learning rate (ControlNet: 1e-5)"})
    decoder_lr: float | None = field(default=None, metadata={
        "help": "UNet decoder lr with --no-sd-locked (none: --lr, as the original; ControlNet suggests ~2e-6)"})
    cache_latents: bool = field(default=True, metadata={
        "help": "encode every image and build every hint once (off with --hflip / --random-crop)"})
    hflip: bool = field(default=False, metadata={"help": "random horizontal flips"})
    random_crop: bool = field(default=False, metadata={"help": "random crops instead of centre crops"})
    # ---- validation (one sample per fixed driver, scored for adherence)
    validate_every: int = field(default=250, metadata={
        "help": "steps between validation rounds (also at step 0 and at the end; 0: end only)"})
    num_validation_images: int = field(default=8, metadata={"help": "validation drivers, one sample each "
                                                                     "(0: no validation)", "formerly": ("num_validation",)})
    validation_data: str = field(default="", metadata={
        "help": "COCO folder/JSON of the validation drivers (default: the first images of --data)"})
    validation_sampler: str = field(default="ddim", metadata={"help": "sampler of the validation samples",
                                                                "choices": sorted(SAMPLERS)})

    @property
    def driver_config(self) -> DriverConfig:
        return DriverConfig(self.driver_downscale, self.driver_threshold_method, self.driver_block_size,
                            self.driver_threshold_c, self.driver_background_level, self.driver_upsample,
                            inpaint_defects=self.driver_inpaint_defects)

    @property
    def prompt_config(self) -> PromptConfig:
        return PromptConfig(token=self.identifier, template=self.prompt_template,
                            multi_template=self.multi_prompt_template, empty_template=self.empty_prompt_template)


@dataclass
class ConditionResult:
    """What `main` returns: the base model (its UNet on the training device), the control, every
    optimizer step's record (loss, fraction of prompts dropped), every validation record and the
    files written (rank 0; other ranks get the same histories, no files)."""
    model: StableDiffusion
    control: ControlNet
    history: list[dict[str, float]]
    validation: list[dict[str, float]]
    step: int
    stopped: bool
    checkpoint: Path | None
    exported: dict[str, Path]


@dataclass
class ValidationSet:
    """The fixed validation drivers: hint, topological driver (scored against), prompt, instances,
    seed, and the source images (their own adherence is the ceiling a sample can reach)."""
    hints: torch.Tensor                 # (N, 3, H, W) in [0, 1]: what the control sees
    drivers: torch.Tensor               # (N, 3, H, W) in [0, 1]: the topological driver of the source
    prompts: list[str]
    instances: list[list[tuple[np.ndarray, int]]]
    seeds: list[int]
    sources: list[np.ndarray]           # uint8 (H, W, 3) source images


# ----------------------------------------------------------------------------------- helpers

def check_flags(cfg: ConditionConfig) -> None:
    """The checks that need no model: they run before anything loads or is written."""
    if not cfg.out:
        raise UserError("train.condition: --out is required")
    if not cfg.data:
        raise UserError("train.condition: --data is required (a COCO folder or JSON file)")
    if cfg.condition not in HINT_KINDS:
        raise UserError(f"train.condition: --condition must be one of {HINT_KINDS}, got {cfg.condition!r}")
    if cfg.export_ema and not cfg.ema:
        raise UserError("train.condition: --export-ema needs --ema")
    if not 0.0 <= cfg.drop_prompt_rate <= 1.0:
        raise UserError(f"train.condition: --drop-prompt-rate must be in [0, 1], got {cfg.drop_prompt_rate}")
    for name in ("batch_size", "grad_accum", "log_every", "validation_sampler_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"train.condition: --{name.replace('_', '-')} must be at least 1, "
                             f"got {getattr(cfg, name)}")
    cfg.driver_config  # noqa: B018 - DriverConfig checks its own fields


def resolve_config(cfg: ConditionConfig, model: StableDiffusion, device: torch.device) -> ConditionConfig:
    """Check the flags and fill the "auto" / none fields with what this run uses (saved with checkpoints)."""
    check_flags(cfg)
    augmented = cfg.hflip or cfg.random_crop
    return replace(
        cfg, precision=resolve_precision(cfg.precision, device, announce="train.condition"),
        decoder_lr=cfg.decoder_lr if cfg.decoder_lr is not None else cfg.lr,
        resolution=cfg.resolution or model.config.image_size, prediction_type=model.prediction_type,
        device=device.type, cache_latents=cfg.cache_latents and not augmented)


def read_coco(path: str) -> dict[str, Any]:
    """A COCO folder holding annotations.json, or the COCO JSON file itself."""
    path = Path(path)
    return load_coco(path / "annotations.json" if path.is_dir() else path, progress=False)


def load_base_model(cfg: ConditionConfig) -> StableDiffusion:
    """The tuned model on the CPU in float32: a checkpoint, or random weights of a preset.

    Random weights come from `random_pipeline`, which also randomises the layers SD zero-initialises
    (the UNet's output conv among them): with those at zero the UNet's output would not depend on the
    control's residuals, and the control would get no gradient at all."""
    prediction_type = None if cfg.prediction_type == "auto" else cfg.prediction_type
    if cfg.random_weights:
        overrides = {} if prediction_type is None else {"prediction_type": prediction_type}
        return random_pipeline(cfg.preset, cfg.seed, **overrides)  # global RNG untouched, same on every rank
    if not cfg.ckpt:
        raise UserError("train.condition: give --ckpt TUNED_MODEL, or --random-weights with --preset")
    return load_pipeline(cfg.ckpt, device="cpu", dtype=torch.float32, prediction_type=prediction_type)


def decoder_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    """The UNet's decoder half, trained with --no-sd-locked: output_blocks.* and out.*."""
    return {name: p for name, p in unet.named_parameters() if name.startswith(DECODER_PREFIXES)}


def trainable_weights(control: nn.Module, unet: nn.Module, sd_locked: bool) -> dict[str, torch.Tensor]:
    """The trained tensors, keyed by network ("control.", "unet." for the decoder half)."""
    weights = with_prefix("control.", control.state_dict())
    if not sd_locked:
        weights.update(with_prefix("unet.", {k: p.detach() for k, p in decoder_parameters(unet).items()}))
    return weights


def item_instances(item: dict[str, Any]) -> list[tuple[np.ndarray, int]]:
    """(mask uint8 (H, W), category id) pairs of a ConditionDataset item built with return_masks=True."""
    return list(zip(item["instance_masks"].numpy(), item["category_ids"].tolist()))


def item_hint(item: dict[str, Any], condition: str) -> torch.Tensor:
    """The hint of a ConditionDataset item (built with return_masks=True): its topological driver,
    or the inpainting hint of its image and instances. float32 (3, H, W) in [0, 1]."""
    if condition == "driver":
        return item["driver"]
    return inpaint_hint(tensor_to_image(item["image"]), item_instances(item))


def to_levels(hints: torch.Tensor) -> torch.Tensor:
    """Hints in [0, 1] are k / 255 by construction: store them as exact uint8 levels (4x smaller)."""
    return (hints * 255).round().to(torch.uint8)


@torch.no_grad()
def cache_dataset(dataset: ConditionDataset, vae: nn.Module, condition: str, device: torch.device,
                  batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Every item once: VAE posterior (mean, std) float32 (N, 4, h, w) on `device`, hints as uint8
    levels (N, 3, H, W) on the CPU, prompts."""
    means, stds, hints, prompts = [], [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        mean, std = encode_posterior(vae, torch.stack([it["image"] for it in items]).to(device))
        means.append(mean), stds.append(std)
        hints.append(to_levels(torch.stack([item_hint(it, condition) for it in items])))
        prompts += [it["prompt"] for it in items]
    return torch.cat(means), torch.cat(stds), torch.cat(hints), prompts


def training_batch(indices: list[int], dataset: ConditionDataset, cache: tuple | None, vae: nn.Module,
                   condition: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(mean, std, hints float32 (B, 3, H, W) in [0, 1], prompts) of the items at `indices`: from
    the cache, or loaded (augmented) and encoded now."""
    if cache is not None:
        means, stds, hints, prompts = cache
        index = torch.tensor(indices)
        return (means[index.to(means.device)], stds[index.to(stds.device)],
                hints[index].to(device, torch.float32) / 255.0, [prompts[i] for i in indices])
    items = [dataset[i] for i in indices]
    mean, std = encode_posterior(vae, torch.stack([it["image"] for it in items]).to(device))
    hints = torch.stack([item_hint(it, condition) for it in items]).to(device)
    return mean, std, hints, [it["prompt"] for it in items]


@torch.no_grad()
def prompt_contexts(prompts: list[str], model: StableDiffusion, text_encoder: nn.Module,
                    table: dict[str, torch.Tensor]) -> torch.Tensor:
    """Text contexts (B, 77, D) float32 of `prompts`; each distinct prompt is encoded once and kept
    in `table` (the text encoder is frozen, and a dataset holds only a few distinct prompts).
    Prompts are encoded one at a time: batched, a prompt's rounding would depend on which others
    came first, and a resumed run (empty table) would differ from the uninterrupted one."""
    device = next(text_encoder.parameters()).device
    for prompt in dict.fromkeys(prompts):
        if prompt not in table:
            table[prompt] = text_encoder(model.tokenizer([prompt]).to(device))[0].float()  # (77, D)
    return torch.stack([table[p] for p in prompts])


def drop_prompts(batch: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) bool: rows whose prompt is replaced by "" (each with probability `rate`). Always draws
    B numbers from `generator`, so the stream does not depend on the rate."""
    return torch.rand(batch, generator=generator) < rate


def controlled_output(unet: nn.Module, control: nn.Module, x: torch.Tensor, t: torch.Tensor,
                      context: torch.Tensor, hint: torch.Tensor, only_mid_control: bool = False) -> torch.Tensor:
    """The frozen UNet driven by the control: unet(x, t, context, control=control(x, t, context, hint)).
    only_mid_control: the skip residuals are replaced by zeros, only the middle one is added (the
    original's `only_mid_control`; adding exact zeros changes nothing else)."""
    residuals = control(x, t, context, hint)
    if only_mid_control:
        residuals = [torch.zeros_like(r) for r in residuals[:-1]] + residuals[-1:]
    return unet(x, t, context, control=residuals)


def build_validation_set(dataset: ConditionDataset, count: int, condition: str, seed: int) -> ValidationSet:
    """The first `count` items of a (centre-cropped, unflipped) dataset, with fixed seeds."""
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    return ValidationSet(hints=torch.stack([item_hint(it, condition) for it in items]),
                         drivers=torch.stack([it["driver"] for it in items]),
                         prompts=[it["prompt"] for it in items],
                         instances=[item_instances(it) for it in items],
                         seeds=[derive_seed(seed, "validation", i) for i in range(len(items))],
                         sources=[tensor_to_image(it["image"]) for it in items])


@torch.no_grad()
def validate(model: StableDiffusion, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, control: ControlNet,
             val: ValidationSet, contexts: dict[str, torch.Tensor], polarity: dict[int, int], cfg: ConditionConfig,
             step: int, batch_size: int = 4) -> dict[str, float | None]:
    """One validation round: a sample per validation driver (its fixed seed), the mean adherence
    score (data/adherence.py) and a driver | [hint |] sample grid under OUT/validation. The record
    also holds the source images' own mean adherence ("adherence_source"): faint real defects or
    loose masks keep it below 1, and a sample can hardly do better than its source."""
    dtype = None if cfg.precision == "fp32" else precision_dtype(cfg.precision)
    device = next(unet.parameters()).device
    uncond = prompt_contexts([""], model, text_encoder, contexts)
    samples = []
    for start in range(0, len(val.seeds), batch_size):
        rows = slice(start, start + batch_size)
        cond = prompt_contexts(val.prompts[rows], model, text_encoder, contexts)
        samples.append(generate(model, seeds=val.seeds[rows], cond=cond, uncond=uncond,
                                sampler=cfg.validation_sampler, steps=cfg.validation_sampler_steps,
                                guidance=cfg.validation_guidance, height=cfg.resolution, width=cfg.resolution,
                                control=control, hints=val.hints[rows].to(device), dtype=dtype, unet=unet,
                                vae=vae).cpu())
    samples = torch.cat(samples)  # (N, 3, H, W) in [0, 1]
    scores = [adherence(tensor_to_image(s * 2 - 1), d, inst, polarity, cfg.driver_config)
              for s, d, inst in zip(samples, val.drivers, val.instances)]
    columns = [val.drivers] + ([val.hints] if cfg.condition != "driver" else []) + [samples]
    grid = torch.stack(columns, dim=1).flatten(0, 1)  # (N, K, 3, H, W) -> (N * K, 3, H, W), row per driver
    save_image_grid(grid * 2 - 1, Path(cfg.out) / "validation" / f"step_{step:08d}.png", nrow=len(columns))
    placements = [s.placement for s in scores if s.placement is not None]
    source = [adherence(image, d, inst, polarity, cfg.driver_config).score
              for image, d, inst in zip(val.sources, val.drivers, val.instances)]
    return {"step": step, "adherence": float(np.mean([s.score for s in scores])),
            "adherence_source": float(np.mean(source)),
            "adherence_topology": float(np.mean([s.topology for s in scores])),
            "adherence_placement": float(np.mean(placements)) if placements else None}


def plot_metrics(metrics_path: Path, out: Path) -> Path | None:
    """OUT/curves.png: training loss and validation adherence over steps, from metrics.jsonl."""
    if not metrics_path.is_file():
        return None
    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "adherence" in r]
    return plot_curves([Curve("training loss", [r["step"] for r in train], [r["loss"] for r in train]),
                        Curve("condition adherence", [r["step"] for r in val], [r["adherence"] for r in val],
                              (0.0, 1.0))], out)


def condition_record(cfg: ConditionConfig, polarity: dict[int, int], step: int) -> dict[str, Any]:
    """What the exported control records about its training (data/hints.py reads it back)."""
    driver = {k: v for k, v in dataclasses.asdict(cfg.driver_config).items() if k != "palette"}
    return {"condition": cfg.condition, "driver": driver, "prompt": dataclasses.asdict(cfg.prompt_config),
            "sd_locked": cfg.sd_locked, "only_mid_control": cfg.only_mid_control, "steps": step,
            "resolution": cfg.resolution, "prediction_type": cfg.prediction_type,
            "polarity": {str(k): v for k, v in polarity.items()}, "base": "base.safetensors"}


def export_base(model: StableDiffusion, cfg: ConditionConfig, path: Path) -> Path:
    """The base model beside the control: --ckpt itself (hard link, else copy) when the UNet stayed
    locked and --ckpt is a single .safetensors file, else `model` re-saved (save_ldm)."""
    source = Path(cfg.ckpt) if cfg.ckpt and not cfg.random_weights else None
    reuse = cfg.sd_locked and source is not None and source.is_file() and source.suffix == ".safetensors"
    if reuse and path.exists() and path.samefile(source):
        return path  # --ckpt is this very file (or already linked here)
    if path.exists() or path.is_symlink():
        path.unlink()
    if reuse:
        try:
            os.link(source, path)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(source, path)
        return path
    return save_ldm(model, path, dtype=cfg.save_dtype)


def export_control(model: StableDiffusion, control: ControlNet, cfg: ConditionConfig, record: dict[str, Any],
                   ema: EMA | None, params: list[nn.Parameter]) -> dict[str, Path]:
    """Write the control in both layouts, the base model beside it, and the EMA variants if asked."""
    out = Path(cfg.out)
    metadata = {CONDITION_METADATA_KEY: json.dumps(record, sort_keys=True)}
    written = {"control": save_control(control, out / "control.safetensors", dtype=cfg.save_dtype, metadata=metadata)}
    written["control_diffusers"] = save_control(control, out / "controlnet", layout="diffusers", dtype=cfg.save_dtype)
    write_json_atomic(out / "controlnet" / DIFFUSERS_CONDITION_FILE, record, indent=2)
    written["base"] = export_base(model, cfg, out / "base.safetensors")
    if cfg.save_diffusers:
        written["diffusers"] = save_diffusers(model, out / "diffusers", dtype=cfg.save_dtype)
    if cfg.export_ema and ema is not None:
        with ema.applied(params):
            ema_record = {**record, "ema": True,
                          "base": "base.safetensors" if cfg.sd_locked else "base_ema.safetensors"}
            written["control_ema"] = save_control(
                control, out / "control_ema.safetensors", dtype=cfg.save_dtype,
                metadata={CONDITION_METADATA_KEY: json.dumps(ema_record, sort_keys=True)})
            if not cfg.sd_locked:
                written["base_ema"] = save_ldm(model, out / "base_ema.safetensors", dtype=cfg.save_dtype)
    return written


# --------------------------------------------------------------------------------------- main

def main(cfg: ConditionConfig) -> ConditionResult:
    with distributed_session(cfg.device) as info:
        device = info.device
        # The checks that need no model run first (flags, the run in --out, the data: validated
        # COCO), and nothing in OUT changes until every check passed.
        check_flags(cfg)
        refuse_to_overwrite(cfg.out, cfg.resume, cfg.overwrite)
        if not read_coco(cfg.data)["images"]:
            raise UserError(f"train.condition: --data {cfg.data}: the COCO file lists no images")
        barrier()  # every rank has checked --out before rank 0 writes into it
        model = load_base_model(cfg)
        cfg = resolve_config(cfg, model, device)
        out, ckpt_root = Path(cfg.out), Path(cfg.out) / "checkpoints"
        resume_from = resolve_resume(ckpt_root, cfg.resume)
        if info.is_main:
            archive_previous_run(out, cfg.resume, cfg.overwrite)
            save_config_json(cfg, out / "config.json", provenance=True)

        # Networks. The control copy is made from the tuned UNet before anything else touches it and
        # trains in float32. The UNet is frozen (stored in the low dtype) unless --no-sd-locked, when
        # it stays float32 with only its decoder trainable. VAE and text encoder: frozen, low dtype.
        low = precision_dtype(cfg.precision)
        with torch.random.fork_rng(devices=[]):  # the hint encoder's random init: seeded, same on every rank
            torch.manual_seed(derive_seed(cfg.seed, "control_init"))
            control = ControlNet.from_unet(model.unet, hint_channels=3,
                                           downsample_factor=model.config.vae.downsample_factor).to(device)
        control.train().requires_grad_(True)
        if cfg.sd_locked:
            unet = frozen_copy(model.unet, low, device)
        else:
            unet = model.unet.to(device).train().requires_grad_(False)
            for p in decoder_parameters(unet).values():
                p.requires_grad_(True)
        vae = frozen_copy(model.vae, low, device)
        text_encoder = frozen_copy(model.text_encoder, low, device)
        contexts: dict[str, torch.Tensor] = {}  # prompt -> (77, D) context, filled as prompts come

        # Data: (image, hint, prompt) items, cached once when there is no augmentation.
        coco = read_coco(cfg.data)
        plain = ConditionDataset(coco, cfg.resolution, cfg.driver_config, cfg.prompt_config, return_masks=True)
        dataset = plain if cfg.cache_latents else ConditionDataset(
            coco, cfg.resolution, cfg.driver_config, cfg.prompt_config, return_masks=True,
            crop="random" if cfg.random_crop else "center", hflip=cfg.hflip)
        cache = cache_dataset(plain, vae, cfg.condition, device) if cfg.cache_latents else None

        # Validation: fixed drivers and seeds. Each class's contrast direction comes from the real
        # images (the adherence score uses it; the exported control records it for synthesis).
        validation, polarity = None, {}
        if info.is_main:
            polarity = estimate_polarity((tensor_to_image(it["image"]), item_instances(it))
                                         for it in (plain[i] for i in range(min(len(plain), 64))))
        if info.is_main and cfg.num_validation_images:
            val_data = plain
            if cfg.validation_data:
                val_data = ConditionDataset(read_coco(cfg.validation_data), cfg.resolution, cfg.driver_config,
                                            cfg.prompt_config, return_masks=True)
            validation = build_validation_set(val_data, cfg.num_validation_images, cfg.condition, cfg.seed)

        # Optimizer, loss scaler, EMA, data order and the generators of noise and prompt dropping.
        groups = [param_group("control", control.parameters(), lr=cfg.lr)]
        if not cfg.sd_locked:
            groups.append(param_group("unet_decoder", decoder_parameters(unet).values(), lr=cfg.decoder_lr))
        params = [p for g in groups for p in g["params"]]
        optimizer = build_adamw(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay)
        scaler = make_grad_scaler(cfg.precision, device)
        ema = EMA(params, cfg.ema_decay) if cfg.ema else None
        order = IndexStream(len(dataset), derive_seed(cfg.seed, "order"))
        noise_gen = torch.Generator(device).manual_seed(derive_seed(cfg.seed, "noise", info.rank))
        prompt_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "drop_prompt", info.rank))
        generators = {"noise": noise_gen, "prompt": prompt_gen}
        torch.manual_seed(derive_seed(cfg.seed, "global", info.rank))

        start_step = 0
        if resume_from is not None:
            weights, state = restore_training_state(resume_from, cfg, info, optimizer, scaler, ema, generators,
                                                    RESUMABLE_CHANGES)
            control.load_state_dict(strip_prefix(weights, "control."), strict=True)
            if not cfg.sd_locked:
                saved = strip_prefix(weights, "unet.")
                decoder = decoder_parameters(unet)
                if set(saved) != set(decoder):
                    raise UserError(f"--resume {resume_from}: the checkpoint's UNet decoder tensors do not match")
                with torch.no_grad():
                    for name, p in decoder.items():
                        p.copy_(saved[name])
            order.load_state_dict(state["data"]["order"])
            start_step = state["step"]
            if info.is_main:
                print(f"resumed from {resume_from} at step {start_step}")

        control.set_gradient_checkpointing(cfg.gradient_checkpointing)
        unet.set_gradient_checkpointing(cfg.gradient_checkpointing)
        compile_module(control, cfg.compile)
        compile_module(unet, cfg.compile)
        # With only_mid_control the skip zero convs take no part in the loss: DDP must expect that.
        control_ddp = wrap_ddp(control, info, find_unused_parameters=cfg.only_mid_control)
        unet_ddp = unet if cfg.sd_locked else wrap_ddp(unet, info)
        synced = [control_ddp] + ([] if cfg.sd_locked else [unet_ddp])
        empty_context = prompt_contexts([""], model, text_encoder, contexts)  # (1, 77, D)
        rows = cfg.batch_size * cfg.grad_accum * info.world_size  # prompts per optimizer step

        def save(step: int) -> Path | None:
            return save_training_state(ckpt_root, step, trainable_weights(control, unet, cfg.sd_locked), cfg,
                                       info, params, optimizer, scaler, ema, generators,
                                       {"order": order.state_dict()}, cfg.keep_last)

        def run_validation(step: int) -> None:
            # Samples come from their own seeded generators; fork_rng keeps training independent of
            # when (and whether) validation runs, which may change on resume.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                record = validate(model, unet, vae, text_encoder, control, validation, contexts, polarity, cfg,
                                  step)
            validation_history.append(record)
            metrics.write(record)
            plot_metrics(out / "metrics.jsonl", out / "curves.png")

        metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step, enabled=info.is_main,
                             report_to=cfg.report_to)
        history: list[dict[str, float]] = []
        validation_history: list[dict[str, float]] = []
        if validation is not None and start_step == 0 and cfg.validate_every:
            run_validation(0)  # the inert control: the baseline the sudden convergence rises from
        bar = progress_bar(cfg.steps, start_step, enabled=cfg.progress and info.is_main, desc="condition")
        stopped, last_saved, started = False, None, time.perf_counter()
        with StopSignal() as stop:
            for step in range(start_step, cfg.steps):
                terms = torch.zeros(2, device=device)  # loss (mean over micro-batches), prompts dropped
                for micro in range(cfg.grad_accum):
                    # Batch: this rank's slice of the global batch; prompts dropped to "" at the rate.
                    mean, std, hints, prompts = training_batch(order.take_for_rank(cfg.batch_size, info.rank,
                                                                                    info.world_size),
                                                               dataset, cache, vae, cfg.condition, device)
                    dropped = drop_prompts(len(prompts), cfg.drop_prompt_rate, prompt_gen).to(device)
                    context = torch.where(dropped[:, None, None], empty_context,
                                          prompt_contexts(prompts, model, text_encoder, contexts))
                    # Encode -> noise, t (train/diffusion.py).
                    z0 = sample_latents(mean, std, model.latent_scale, noise_gen)
                    noise = sample_noise(z0, noise_gen)
                    t = sample_timesteps(z0.shape[0], noise_gen, model.schedule.num_train_timesteps).to(device)
                    z_t = model.schedule.q_sample(z0, t, noise)
                    target = diffusion_target(model.schedule, model.prediction_type, z0, noise, t)

                    # Control + frozen UNet -> loss -> backward; DDP syncs on the last micro-batch.
                    with grad_sync(synced, sync=micro == cfg.grad_accum - 1):
                        with autocast(device, cfg.precision):
                            pred = controlled_output(unet_ddp, control_ddp, z_t, t, context, hints,
                                                     cfg.only_mid_control)
                        loss = F.mse_loss(pred.float(), target.float())
                        micro_terms = all_reduce_mean(torch.stack([loss.detach(), dropped.sum().float()]))
                        check_finite(step + 1, {"loss": micro_terms[0].item()})
                        scaler.scale(loss / cfg.grad_accum).backward()
                    terms += torch.stack([micro_terms[0] / cfg.grad_accum, micro_terms[1] * info.world_size])

                # Unscale -> clip -> step -> zero_grad -> EMA, at this step's learning rate.
                lr_scale = lr_multiplier(step, cfg.lr_warmup_steps, cfg.steps, cfg.lr_schedule)
                grad_norm = optimizer_step(optimizer, scaler, params, cfg.max_grad_norm, ema, lr_scale)
                done = step + 1
                loss_value, dropped_count = terms.tolist()
                record = {"loss": loss_value, "dropped_prompts": dropped_count / rows}
                history.append({"step": done, **record})
                bar.update(1)

                # Log / checkpoint / validate.
                if done % cfg.log_every == 0 or done == cfg.steps:
                    lr = optimizer.param_groups[0]["lr"]
                    # the loss terms averaged over the logging window (train/monitor.py: window_mean)
                    metrics.write({"step": done, **window_mean(history, done, cfg.log_every), "lr": lr,
                                   "grad_norm": grad_norm.item(),
                                   "steps_per_s": (done - start_step) / (time.perf_counter() - started)})
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                stopped = any_rank(stop.requested, device)
                if stopped or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                    save(done)
                    last_saved = done
                if stopped:
                    if info.is_main:
                        bar.write(f"stopped by signal: saved step {done} under {ckpt_root}; "
                                  f"continue with --resume latest")
                    break
                if (validation is not None and cfg.validate_every and done % cfg.validate_every == 0
                        and done < cfg.steps):
                    run_validation(done)
        bar.close()

        # The end: last checkpoint, a final validation round, the exported control and base.
        step = history[-1]["step"] if history else start_step
        checkpoint, exported = None, {}
        if not stopped:
            if last_saved != step:
                save(step)
            checkpoint = ckpt_root / checkpoint_name(step)
            if info.is_main:
                if validation is not None:
                    run_validation(step)
                exported = export_control(model, control, cfg, condition_record(cfg, polarity, step), ema, params)
                exported["curves"] = plot_metrics(out / "metrics.jsonl", out / "curves.png")
        metrics.close()
        barrier()
        return ConditionResult(model, unwrap(control_ddp), history, validation_history, step, stopped,
                               checkpoint, exported)


# ---------------------------------------------------------------------------------------- CLI

def get_args_parser():
    return parser_from_dataclass(ConditionConfig, prog="python -m train.condition")


@command("condition")
def cli(argv: list[str] | None = None) -> int:
    result = main(config_from_args(ConditionConfig, get_args_parser().parse_args(argv)))
    return 1 if result.stopped else 0  # a stop (SIGINT/SIGTERM) is not a finished run


if __name__ == "__main__":
    sys.exit(cli())

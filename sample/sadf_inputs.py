"""The inputs of a synthesis run (the control's condition record, the two datasets, the models and
their sha256) and what one generate() call needs: SADF pairs -> prompts, hints -> images.

    builder = PairInputsBuilder(pairs, "driver", annotated)   # pair id -> prompt, hint, annotations, sources
    images = generate_rows(sd, control, PromptContexts(sd), [builder(p) for p in pair_ids], seeds, cfg, 512)
    reasons = reject_reasons(images, batch_to_uint8(images), blank_std=2.0)   # the guard, per row

Every prompt is encoded alone and cached, so a text context never depends on the batch it serves;
the hint is the control's condition (data/hints.py) of the pair's image variant and masks.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from data.coco import CocoError, load_coco
from data.drivers import DriverConfig
from data.hints import build_hint, read_condition_metadata
from data.images import ImageReadError
from data.importers import DatasetImportError, import_image_folder
from data.pairing import SadfPairs
from data.palette import PALETTE
from data.prompts import PromptConfig
from defectsynth.errors import UserError
from defectsynth.runconfig import config_from_dict
from model.controlnet import ControlNet
from model.stable_diffusion import StableDiffusion
from sample.pipeline import generate, random_pipeline
from sample.records import model_sha256
from sample.runtime import compile_module
from sample.sadf_jobs import Job
from weights import CheckpointError, load_control, load_pipeline

if TYPE_CHECKING:
    from sample.synthesize import SynthesizeConfig


class SynthesisError(UserError):
    """A bad input or setting, found before any sampling; the message names the flag and file."""


# ---------------------------------------------------------------------------------------------
# Inputs: condition, data sources, models
# ---------------------------------------------------------------------------------------------

def control_record(path: str) -> dict[str, Any] | None:
    """The training record train.condition stored with a control (None for a control without one,
    e.g. a downloaded ControlNet or a .pth file)."""
    path = Path(path)
    if not path.exists():
        raise SynthesisError(f"sample.synthesize: --control {path}: not found")
    if path.is_file() and path.suffix != ".safetensors":
        return None
    try:
        return read_condition_metadata(path)
    except Exception as err:  # safetensors header or JSON errors: name the file
        raise SynthesisError(f"sample.synthesize: --control {path}: cannot read its metadata ({err})") from err


def resolve_condition(cfg: SynthesizeConfig) -> dict[str, Any]:
    """The hint kind, driver and prompt configs and only_mid_control, from the control's training
    record (data/hints.py) when it has one."""
    record = control_record(cfg.control) if cfg.control else None
    trained = record.get("condition") if record else None
    if cfg.condition != "auto" and trained and trained != cfg.condition:
        raise SynthesisError(f"sample.synthesize: --control {cfg.control} was trained with condition {trained!r}, "
                             f"not {cfg.condition!r}; use --condition auto")
    kind = trained or ("driver" if cfg.condition == "auto" else cfg.condition)
    reason = ("the control's training record" if trained else
              "--condition" if cfg.condition != "auto" else "default (the control has no condition record)")
    record = record or {}
    # The hint and prompt the control was trained on (palette and templates included).
    driver = config_from_dict(DriverConfig, record["driver"], "control record driver") if "driver" in record else None
    prompt = config_from_dict(PromptConfig, record["prompt"], "control record prompt") if "prompt" in record else None
    driver, prompt = driver or DriverConfig(), prompt or PromptConfig()
    if cfg.identifier:
        prompt = dataclasses.replace(prompt, token=cfg.identifier)
    return {"hint": kind, "reason": reason, "driver": driver, "prompt": prompt,
            "only_mid_control": bool(record.get("only_mid_control")), "record": record}


def load_sources(cfg: SynthesizeConfig, check_images: bool = True) -> tuple[dict, dict]:
    """(defect-free COCO, annotated COCO); every image decoded when `check_images`."""
    try:
        free_path = Path(cfg.free)
        free = (import_image_folder(free_path, progress=False) if free_path.is_dir()
                else load_coco(free_path, check_images=check_images, progress=False))
    except (CocoError, DatasetImportError, ImageReadError, FileNotFoundError) as err:
        raise SynthesisError(f"sample.synthesize: --free {cfg.free}: {err}") from err
    try:
        annotated = load_coco(cfg.masks, check_images=check_images, progress=False)
    except (CocoError, ImageReadError) as err:
        raise SynthesisError(f"sample.synthesize: --masks {cfg.masks}: {err}") from err
    if not free["images"]:
        raise SynthesisError(f"sample.synthesize: --free {cfg.free} holds no images")
    if not annotated["annotations"]:
        raise SynthesisError(f"sample.synthesize: --masks {cfg.masks} holds no annotations to draw masks from")
    too_high = sorted({c["id"] for c in annotated["categories"]} - set(range(1, len(PALETTE))))
    if too_high:
        raise SynthesisError(f"sample.synthesize: --masks {cfg.masks}: category ids {too_high} have no driver colour "
                             f"(ids 1..{len(PALETTE) - 1})")
    return free, annotated


def load_models(cfg: SynthesizeConfig, device: torch.device, dtype: torch.dtype,
                only_mid_control: bool = False) -> tuple[StableDiffusion, nn.Module]:
    """The tuned model and its control, in `dtype` on `device` (errors name the file)."""
    prediction_type = None if cfg.prediction_type == "auto" else cfg.prediction_type
    try:
        if cfg.random_weights:
            overrides = {} if prediction_type is None else {"prediction_type": prediction_type}
            sd = random_pipeline(cfg.preset, cfg.seed, **overrides).to(device=device, dtype=dtype)
        else:
            sd = load_pipeline(cfg.ckpt, device=device, dtype=dtype, prediction_type=prediction_type)
    except (CheckpointError, OSError) as err:
        raise SynthesisError(f"sample.synthesize: --ckpt {cfg.ckpt}: {err}") from err
    if cfg.control:
        try:
            control = load_control(cfg.control, unet=sd.unet)
        except (CheckpointError, OSError) as err:
            raise SynthesisError(f"sample.synthesize: --control {cfg.control} does not fit --ckpt "
                                 f"{cfg.ckpt or cfg.preset}: {err}") from err
    else:
        control = ControlNet.from_unet(sd.unet).to(device=device, dtype=dtype)  # zero convs: no effect
    control = compile_module(control.eval(), cfg.compile)
    compile_module(sd.unet, cfg.compile)
    return sd.eval(), (MidOnlyControl(control) if only_mid_control else control)


def model_identity(cfg: SynthesizeConfig, cache: dict) -> dict[str, str]:
    """sha256 of the model files (or what stands for them with --random-weights)."""
    ckpt = f"random:{cfg.preset}:seed={cfg.seed}" if cfg.random_weights else model_sha256(Path(cfg.ckpt), cache)
    control = model_sha256(Path(cfg.control), cache) if cfg.control else "zero-initialised control"
    return {"ckpt": ckpt, "control": control}


# ---------------------------------------------------------------------------------------------
# Pairs -> generator inputs -> images
# ---------------------------------------------------------------------------------------------

@dataclass
class PairInputs:
    pair_id: int
    prompt: str
    hint: torch.Tensor               # float32 (3, H, W) in [0, 1]
    annotations: list[dict]          # COCO annotations without ids (RLE, exact area and box)
    meta: dict[str, Any]             # source image, variant, mask sources
    driver: torch.Tensor | None = None   # float32 (3, H, W) in [0, 1]: the topological driver (adherence gate)
    instances: list | None = None        # (uint8 (H, W) mask, category id) painted into the driver


class PairInputsBuilder:
    """Pair p -> its generator inputs; keeps the last few (consecutive batches share pairs)."""

    def __init__(self, pairs: SadfPairs, hint_kind: str, annotated: dict, keep: int = 8):
        self.pairs, self.hint_kind, self.keep = pairs, hint_kind, keep
        images = {img["id"]: img["file_name"] for img in annotated["images"]}
        self.sources = {a["id"]: {"annotation_id": a["id"], "image_id": a["image_id"],
                                  "file_name": images[a["image_id"]]} for a in annotated["annotations"]}
        self.cache: OrderedDict[int, PairInputs] = OrderedDict()

    def __call__(self, pair_id: int) -> PairInputs:
        if pair_id in self.cache:
            self.cache.move_to_end(pair_id)
            return self.cache[pair_id]
        pair = self.pairs.build(pair_id)
        hint = pair.driver if self.hint_kind == "driver" else build_hint(
            self.hint_kind, pair.image, pair.instances, self.pairs.config.driver)
        annotations = []
        for ann, source in zip(pair.annotations(1, 1), pair.source_annotations):
            annotations.append({k: ann[k] for k in ("category_id", "segmentation", "area", "bbox", "iscrowd")}
                               | {"source_annotation_id": source})
        variants = max(self.pairs.config.variants, 1)
        free = self.pairs.free_images[(pair_id // variants) % len(self.pairs.free_images)]
        meta = {"source_image": pair.source_file, "free_image_id": free["id"], "variant": pair.variant,
                "mask_sources": [self.sources[a] for a in pair.source_annotations]}
        self.cache[pair_id] = PairInputs(pair_id, pair.prompt, hint, annotations, meta, pair.driver, pair.instances)
        while len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return self.cache[pair_id]


class PromptContexts:
    """prompt -> (1, 77, D) text context, each encoded alone (so its bits never depend on a batch)."""

    def __init__(self, sd: StableDiffusion):
        self.sd, self.cache = sd, {}

    def __call__(self, prompt: str) -> torch.Tensor:
        if prompt not in self.cache:
            self.cache[prompt] = self.sd.encode_prompts([prompt])
        return self.cache[prompt]


def generate_rows(sd: StableDiffusion, control: nn.Module, contexts: PromptContexts, rows: list[PairInputs],
                  seeds: list[int], cfg: "SynthesizeConfig", size: int) -> torch.Tensor:
    """One generate() call: row i from rows[i]'s prompt and hint with seeds[i]. Returns float32
    (B, 3, H, W) in [0, 1] (NaN where the model produced NaN) on the model's device."""
    cond = torch.cat([contexts(r.prompt) for r in rows])  # B x (1, 77, D) -> (B, 77, D)
    uncond = contexts(cfg.negative_prompt) if cfg.guidance != 1.0 else None
    hints = torch.stack([r.hint for r in rows])  # B x (3, H, W) -> (B, 3, H, W)
    return generate(sd, seeds=seeds, cond=cond, uncond=uncond, sampler=cfg.sampler, steps=cfg.steps,
                    guidance=cfg.guidance, eta=cfg.eta, height=size, width=size, control=control, hints=hints,
                    control_scale=cfg.control_scale, guess_mode=cfg.guess_mode)


def reject_reasons(images: torch.Tensor, pixels: torch.Tensor, blank_std: float) -> list[str | None]:
    """The guard, per row: "non-finite", "blank (...)" or None (accepted). images float (B, 3, H, W),
    pixels their uint8 (B, H, W, 3)."""
    finite = torch.isfinite(images).flatten(1).all(1).tolist()
    stds = pixels.float().flatten(1).std(1).tolist()
    return [None if ok and std >= blank_std else "non-finite" if not ok
            else f"blank (pixel std {std:.2f} < {blank_std})" for ok, std in zip(finite, stds)]


def adherence_scores(pixels, rows: list[PairInputs], driver_config: DriverConfig) -> list[float]:
    """Condition adherence (data/adherence.py) of each generated uint8 (H, W, 3) image to its own
    pair's driver and masks; either contrast direction counts (no class polarity)."""
    from data.adherence import adherence

    return [adherence(image, row.driver, row.instances, driver_config=driver_config).score
            for image, row in zip(pixels, rows)]


def batch_inputs(builder: PairInputsBuilder, batch: list[Job]) -> dict[int, PairInputs]:
    return {j.pair_id: builder(j.pair_id) for j in batch}


class MidOnlyControl(nn.Module):
    """A control whose skip residuals are zeros (a control trained with only_mid_control)."""

    def __init__(self, control: ControlNet):
        super().__init__()
        self.control, self.config = control, control.config

    def forward(self, *args, **kwargs) -> list[torch.Tensor]:
        residuals = self.control(*args, **kwargs)
        return [torch.zeros_like(r) for r in residuals[:-1]] + residuals[-1:]

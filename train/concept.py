"""Learn the concept (paper 4.1): DreamBooth fine-tuning with class-specific prior preservation.

    python -m train.concept --ckpt v1-5-pruned-emaonly.safetensors --data runs/demo --out runs/concept
    python -m train.concept --preset tiny --random-weights --data runs/demo --out runs/tiny --steps 20
    torchrun --nproc_per_node 2 -m train.concept ...            # data parallel, rank 0 writes

1. Class images: the frozen base model draws `--num-class-images` images of
   "an image of a <class noun>" (DDPM ancestral sampler by default), one PNG per index under
   OUT/class_images, each from the seed (run seed, index); a rerun draws only the missing ones.
2. Training: every micro-batch holds `--batch-size` instance images (the annotated defect images,
   prompt "an image of a sks") followed by as many class images (the class prompt);
   loss = MSE(instance half) + prior_loss_weight * MSE(class half), each half its own mean.
3. Output: OUT/concept.safetensors (LDM single file, via weights.save_ldm), optionally a diffusers
   folder and the EMA weights; checkpoints under OUT/checkpoints (see train/checkpoint.py),
   metrics in OUT/metrics.jsonl, sample grids in OUT/samples.

Randomness is explicit: data order from two seeded index streams, and every latent sample,
timestep and noise tensor from one generator per rank; their states are in each checkpoint, so
`--resume latest` continues bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from data.coco import load_coco
from data.datasets import ConceptDataset
from data.files import write_image_atomic, write_json_atomic
from data.images import list_images, tensor_to_image
from data.seeding import derive_seed
from defectsynth.errors import UserError, command
from defectsynth.runconfig import config_from_args, parser_from_dataclass, save_config_json
from model.stable_diffusion import StableDiffusion, preset
from sample.pipeline import SAMPLERS, generate
from sample.runtime import compile_module
from weights import load_pipeline, save_diffusers, save_ldm
from train.checkpoint import (archive_previous_run, checkpoint_name, refuse_to_overwrite, resolve_resume, strip_prefix,
                              with_prefix)
from train.data_order import IndexStream
from train.diffusion import diffusion_target, encode_posterior, sample_latents, sample_noise, sample_timesteps
from train.distributed import DistInfo, all_reduce_mean, any_rank, barrier, distributed_session, grad_sync, wrap_ddp
from train.ema import EMA
from train.monitor import MetricsLog, StopSignal, check_finite, progress_bar, save_image_grid, window_mean
from train.plot import plot_metrics
from train.optim import build_adamw, lr_multiplier, optimizer_step, param_group
from train.precision import autocast, frozen_copy, make_grad_scaler, precision_dtype, resolve_precision
from train.options import RESUMABLE_CHANGES as FINE_TUNE_RESUMABLE, FineTuneOptions
from train.state import restore_training_state, save_training_state

# Fields that may change between a run and its resumption (they do not change what is trained).
TERMS = ("loss", "instance_loss", "prior_loss")  # the logged loss terms, in dreambooth_loss order
RESUMABLE_CHANGES = FINE_TUNE_RESUMABLE | {"num_validation_images", "class_batch_size", "validation_prompt"}


@dataclass(frozen=True)
class ConceptConfig(FineTuneOptions):
    """Learn the concept: DreamBooth fine-tuning of SD with prior preservation (paper 4.1).
    The model, optimiser and run fields it shares with train.condition are in train/options.py."""

    data: str = field(default="", metadata={"help": "instance images: a COCO folder holding annotations.json, "
                                                    "the COCO JSON itself, or a plain folder of images"})
    steps: int = field(default=800, metadata={
        "help": "optimizer steps (ours, in the range of diffusers' DreamBooth example; this paper states none)"})
    seed: int = field(default=0, metadata={"help": "run seed (class images, data order, noise)"})
    # ---- prompts
    identifier: str = field(default="sks", metadata={"help": "rare single-token identifier [V]"})
    class_noun: str = field(default="metal surface", metadata={
        "help": "what the images show in general words; the class prompt of prior preservation"})
    prompt_template: str = field(default="an image of a {}", metadata={
        "help": "prompt with {} for the identifier (instance) or the class noun (class images)"})
    # ---- prior preservation
    with_prior: bool = field(default=True, metadata={"help": "use class images and the prior loss"})
    prior_loss_weight: float = field(default=1.0, metadata={"help": "weight of the class-image MSE"})
    num_class_images: int = field(default=200, metadata={
        "help": "class images to generate and use (within the 100-200 of the DreamBooth paper and diffusers' "
                "example; this paper states none)"})
    class_dir: str = field(default="", metadata={"help": "class image folder (default OUT/class_images)"})
    class_sampler: str = field(default="ddpm", metadata={"help": "sampler for class images",
                                                         "choices": sorted(SAMPLERS)})
    class_steps: int = field(default=50, metadata={"help": "sampler steps per class image"})
    class_guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    class_batch_size: int = field(default=4, metadata={"help": "class images generated per batch"})
    # ---- optimisation
    batch_size: int = field(default=1, metadata={
        "help": "instance images per micro-batch and rank (plus as many class images)"})
    lr: float | None = field(default=None, metadata={
        "help": "UNet learning rate (none: 5e-6, or 2e-6 with --train-text-encoder: diffusers' DreamBooth example)"})
    train_text_encoder: bool = field(default=False, metadata={"help": "fine-tune the text encoder too"})
    text_encoder_lr: float | None = field(default=None, metadata={"help": "text encoder lr (none: --lr)"})
    cache_latents: bool = field(default=True, metadata={"help": "encode every image once (VAE mean/std)"})
    cache_text_embeddings: bool = field(default=True, metadata={
        "help": "encode the two prompts once (ignored with --train-text-encoder)"})
    instance_prompt: str = field(default="", metadata={
        "help": "the instance prompt (empty: --prompt-template with --identifier, 'an image of a sks')"})
    class_prompt: str = field(default="", metadata={
        "help": "the class prompt (empty: --prompt-template with --class-noun, 'an image of a metal surface')"})
    # ---- validation (DDIM sample grids: the instance prompt, the class prompt, any --validation-prompt)
    validate_every: int = field(default=100, metadata={"help": "steps between sample grids (0: end only)"})
    num_validation_images: int = field(default=4, metadata={"help": "images per prompt and grid (0: no grids)"})
    validation_prompt: tuple[str, ...] = field(default=(), metadata={
        "help": "more prompts for the sample grids, one row each (the instance and class prompts are "
                "always drawn: the class row shows language drift)"})


@dataclass
class ConceptResult:
    """What `main` returns: the model (tuned UNet, on the training device), every optimizer step's
    loss terms, and the files written (rank 0; other ranks get the same history, no files)."""
    model: StableDiffusion
    history: list[dict[str, float]]
    step: int
    stopped: bool
    checkpoint: Path | None
    exported: dict[str, Path]


# ----------------------------------------------------------------------------------- helpers

def check_flags(cfg: ConceptConfig) -> None:
    """The checks that need no model: they run before anything loads or is written."""
    if not cfg.out:
        raise UserError("train.concept: --out is required")
    if not cfg.data:
        raise UserError("train.concept: --data is required (a COCO folder or JSON file, or a folder of images)")
    if cfg.export_ema and not cfg.ema:
        raise UserError("train.concept: --export-ema needs --ema")
    for name in ("batch_size", "grad_accum", "log_every", "class_batch_size", "class_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"train.concept: --{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.with_prior and cfg.num_class_images < 1:
        raise UserError("train.concept: prior preservation needs --num-class-images >= 1 (or --no-with-prior)")
    if "{}" not in cfg.prompt_template:
        raise UserError(f"train.concept: --prompt-template {cfg.prompt_template!r} needs a {{}} placeholder")


def check_instance_data(data: str) -> None:
    """--data is readable and holds images (a COCO folder or JSON, validated; or a folder of
    images): checked before the model loads or class images are drawn."""
    from data.images import list_images

    path = Path(data)
    if path.is_dir() and not (path / "annotations.json").is_file():
        if not list_images(path):
            raise UserError(f"--data {path}: a folder without annotations.json and without images "
                            f"(expected a COCO folder or a folder of .png/.jpg images)")
        return
    if not load_coco(path / "annotations.json" if path.is_dir() else path, progress=False)["images"]:
        raise UserError(f"--data {data}: the COCO file lists no images")


def resolve_config(cfg: ConceptConfig, model: StableDiffusion, device: torch.device) -> ConceptConfig:
    """Fill the "auto" / none fields with what this run actually uses (saved with checkpoints)."""
    check_flags(cfg)
    cfg = replace(cfg, instance_prompt=cfg.instance_prompt or cfg.prompt_template.format(cfg.identifier),
                  class_prompt=cfg.class_prompt or cfg.prompt_template.format(cfg.class_noun))
    precision = resolve_precision(cfg.precision, device, announce="train.concept")
    lr = cfg.lr if cfg.lr is not None else (2e-6 if cfg.train_text_encoder else 5e-6)
    return replace(
        cfg, precision=precision, lr=lr,
        text_encoder_lr=cfg.text_encoder_lr if cfg.text_encoder_lr is not None else lr,
        resolution=cfg.resolution or model.config.image_size,
        prediction_type=model.prediction_type, device=device.type,
        class_dir=cfg.class_dir or str(Path(cfg.out) / "class_images"))


def load_base_model(cfg: ConceptConfig) -> StableDiffusion:
    """The base model on the CPU in float32: a checkpoint, or random weights of a preset."""
    overrides = {} if cfg.prediction_type == "auto" else {"prediction_type": cfg.prediction_type}
    if cfg.random_weights:
        with torch.random.fork_rng(devices=[]):  # same weights on every rank, global RNG untouched
            torch.manual_seed(cfg.seed)
            return StableDiffusion(preset(cfg.preset, **overrides))
    if not cfg.ckpt:
        raise UserError("train.concept: give --ckpt BASE_MODEL, or --random-weights with --preset")
    return load_pipeline(cfg.ckpt, device="cpu", dtype=torch.float32,
                         prediction_type=overrides.get("prediction_type"))


def check_identifier(model: StableDiffusion, identifier: str) -> None:
    """DreamBooth binds the concept to ONE rare token; a multi-token identifier spreads it."""
    ids = model.tokenizer.encode(identifier)
    if len(ids) != 1:
        raise UserError(f"train.concept: --identifier {identifier!r} is {len(ids)} tokens {ids}; "
                         f"use a rare single-token word such as 'sks'")


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, num_instance: int,
                    prior_loss_weight: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DreamBooth's loss on a batch of `num_instance` instance rows followed by class rows.

    loss = MSE(instance rows) + w * MSE(class rows), each MSE its own mean; w None = no prior
    (the batch is all instance rows). Returns (loss, detached float32 [loss, instance, prior])."""
    pred, target = pred.float(), target.float()
    instance = F.mse_loss(pred[:num_instance], target[:num_instance])
    if prior_loss_weight is None:
        return instance, torch.stack([instance, instance, torch.zeros_like(instance)]).detach()
    prior = F.mse_loss(pred[num_instance:], target[num_instance:])
    loss = instance + prior_loss_weight * prior
    return loss, torch.stack([loss, instance, prior]).detach()


def generate_images(unet: nn.Module, vae: nn.Module, model: StableDiffusion, cond: torch.Tensor,
                    uncond: torch.Tensor, seeds: list[int], sampler: str, steps: int, guidance: float,
                    resolution: int, precision: str) -> torch.Tensor:
    """Text-to-image with CFG through sample.pipeline.generate: images (B, 3, H, W) in [-1, 1],
    sample i from seeds[i] alone. cond, uncond: (1, 77, D) contexts, broadcast over the batch."""
    with torch.no_grad():
        images = generate(model, seeds=seeds, cond=cond, uncond=uncond, sampler=sampler, steps=steps,
                          guidance=guidance, height=resolution, width=resolution,
                          dtype=precision_dtype(precision), unet=unet, vae=vae)
    return images * 2 - 1


CLASS_MANIFEST = "class_images.json"


def model_fingerprint(model: StableDiffusion) -> str:
    """A fingerprint of the base model's weights (UNet, VAE, text encoder): sha256 over every
    tensor's name, shape, dtype, float64 sum and sum of squares. One cheap pass of reductions, no
    copies; two different checkpoints (or a fine-tuned one) practically never share it."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not name.startswith(("unet.", "vae.", "text_encoder.")) or tensor.is_meta:
                continue
            values = tensor.detach().double() if tensor.is_floating_point() else tensor.detach().long()
            digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype} {values.sum().item():.10e} "
                          f"{(values * values).sum().item():.10e}\n".encode())
    return digest.hexdigest()


def class_image_recipe(model: StableDiffusion, cfg: ConceptConfig) -> dict:
    """What the class images depend on; written to CLASS_DIR/class_images.json beside them."""
    return {"base_model": model_fingerprint(model), "prompt": cfg.class_prompt, "negative_prompt": "",
            "sampler": cfg.class_sampler, "steps": cfg.class_steps, "guidance": cfg.class_guidance,
            "resolution": cfg.resolution, "precision": cfg.precision,
            "seeds": f"derive_seed({cfg.seed}, 'class_image', i)"}


DRAWN_NAME = re.compile(r"\d{6}\.png")  # the names this script gives the class images it draws


def class_image_paths(folder: Path, count: int) -> list[Path]:
    """The `count` class images of `folder`: images of the user's (any names; a folder without
    our manifest), in sorted order, then 000000.png-style names for what is still to be drawn.
    A folder this script filled (it has the manifest) uses its own names only."""
    own = []
    if folder.is_dir() and not (folder / CLASS_MANIFEST).is_file():
        own = [p for p in list_images(folder, recursive=False) if not DRAWN_NAME.fullmatch(p.name)][:count]
    return own + [folder / f"{i:06d}.png" for i in range(len(own), count)]


def check_class_images(folder: Path, recipe: dict, paths: list[Path], is_main: bool) -> None:
    """Class images belong to the model and settings that drew them: if the folder's manifest
    records another recipe, the images this run would use are deleted (and redrawn), saying why.
    A folder without a manifest holds the user's own images and is used as given."""
    manifest = folder / CLASS_MANIFEST
    if not manifest.is_file():
        return
    try:
        saved = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    changed = sorted(k for k in recipe if saved.get(k) != recipe[k])
    if not changed:
        return
    if is_main:
        what = ", ".join("the base model weights" if k == "base_model" else f"{k} {saved.get(k)!r} -> {recipe[k]!r}"
                         for k in changed)
        print(f"train.concept: the class images in {folder} were drawn with other settings ({what}); "
              f"drawing them again")
        for path in paths:
            path.unlink(missing_ok=True)
        manifest.unlink()
    barrier()


def refuse_blank_class_images(paths: list[Path]) -> None:
    """All-blank class images (one flat colour each) come from a broken base model; prior
    preservation on them would teach the UNet to draw nothing."""
    from data.images import read_image

    if paths and all(float(read_image(p).reshape(-1, 3).std(axis=0).max()) < 1.0 for p in paths):
        raise UserError(f"train.concept: all {len(paths)} class images in {paths[0].parent} are blank (one flat "
                        f"colour each): the base model that drew them is broken (check --ckpt with "
                        f"`defectsynth inspect`), or use --no-with-prior")


def generate_class_images(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, model: StableDiffusion,
                          cfg: ConceptConfig, info: DistInfo) -> list[Path]:
    """Draw the missing class images with the frozen base model; every rank takes every
    world_size-th missing index. Returns the paths of all `num_class_images` images.
    CLASS_DIR/class_images.json records what drew them (check_class_images)."""
    folder = Path(cfg.class_dir)
    paths = class_image_paths(folder, cfg.num_class_images)
    recipe = class_image_recipe(model, cfg)
    check_class_images(folder, recipe, paths, info.is_main)
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    mine = missing[info.rank::info.world_size]
    if mine:
        device = info.device
        with torch.no_grad():
            tokens = model.tokenizer([cfg.class_prompt, ""]).to(device)
            cond, uncond = text_encoder(tokens).float().chunk(2)  # (2, 77, D) -> 2 x (1, 77, D)
        bar = tqdm(total=len(missing), desc="class images", disable=not (cfg.progress and info.is_main))
        for start in range(0, len(mine), cfg.class_batch_size):
            batch = mine[start:start + cfg.class_batch_size]
            images = generate_images(unet, vae, model, cond, uncond,
                                     [derive_seed(cfg.seed, "class_image", i) for i in batch],
                                     cfg.class_sampler, cfg.class_steps, cfg.class_guidance,
                                     cfg.resolution, cfg.precision)
            for i, image in zip(batch, images):
                write_image_atomic(paths[i], tensor_to_image(image))
            bar.update(len(batch) * info.world_size)
        bar.close()
    barrier()
    users = any(not DRAWN_NAME.fullmatch(path.name) for path in paths)  # a folder of the user's own images
    if info.is_main and missing and not users:  # this run drew (some of) them: record what drew them
        write_json_atomic(folder / CLASS_MANIFEST, recipe, indent=2)
    refuse_blank_class_images(paths)
    return paths


@torch.no_grad()
def encode_dataset(vae: nn.Module, dataset: ConceptDataset, device: torch.device,
                   batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of every image, float32 (N, 4, h, w) on `device`."""
    means, stds = [], []
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))])
        mean, std = encode_posterior(vae, images.to(device))
        means.append(mean), stds.append(std)
    return torch.cat(means), torch.cat(stds)


def posterior_of(indices: list[int], dataset: ConceptDataset, cache: tuple[torch.Tensor, torch.Tensor] | None,
                 vae: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the images at `indices`: from the cache, or encoded now."""
    if cache is not None:
        index = torch.tensor(indices, device=cache[0].device)
        return cache[0][index], cache[1][index]
    images = torch.stack([dataset[i]["image"] for i in indices]).to(device)
    return encode_posterior(vae, images)


def prompts_of_older_checkpoint(folder: Path, cfg: ConceptConfig) -> set[str]:
    """{"instance_prompt", "class_prompt"} when `folder` predates those fields (its config.json has
    no instance_prompt: both prompts were then always the template's, which the checkpoint's
    template, identifier and class noun already pin) and this run derives them the same way."""
    saved = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    derived = (cfg.instance_prompt == cfg.prompt_template.format(cfg.identifier)
               and cfg.class_prompt == cfg.prompt_template.format(cfg.class_noun))
    return {"instance_prompt", "class_prompt"} if derived and "instance_prompt" not in saved else set()


def instance_images(data: str) -> dict | list[Path]:
    """--data: a COCO folder (annotations.json inside) or JSON file, or a plain folder of images
    (DreamBooth's instance_data_dir: every image under it, sorted, no annotations needed)."""
    path = Path(data)
    if path.is_dir() and not (path / "annotations.json").is_file():
        images = list_images(path)
        if not images:
            raise UserError(f"--data {path}: a folder without annotations.json and without images "
                            f"(expected a COCO folder or a folder of .png/.jpg images)")
        return images
    return load_coco(path / "annotations.json" if path.is_dir() else path, progress=False)


def trainable_weights(unet: nn.Module, text_encoder: nn.Module | None) -> dict[str, torch.Tensor]:
    """The trained tensors, keyed by network ("unet.", "text_encoder.")."""
    weights = with_prefix("unet.", unet.state_dict())
    if text_encoder is not None:
        weights.update(with_prefix("text_encoder.", text_encoder.state_dict()))
    return weights


def render_samples(unet: nn.Module, vae: nn.Module, contexts: torch.Tensor, uncond: torch.Tensor,
                   model: StableDiffusion, cfg: ConceptConfig, step: int) -> Path:
    """A PNG grid, one row per prompt (instance, class, then each --validation-prompt; contexts
    (P, 77, D) in that order), the same fixed seeds in every row and at every step."""
    seeds = [derive_seed(cfg.seed, "validation", i) for i in range(cfg.num_validation_images)]
    rows = [generate_images(unet, vae, model, contexts[p:p + 1], uncond, seeds, "ddim", cfg.validation_sampler_steps,
                            cfg.validation_guidance, cfg.resolution, cfg.precision) for p in range(len(contexts))]
    return save_image_grid(torch.cat(rows), Path(cfg.out) / "samples" / f"step_{step:08d}.png",
                           nrow=cfg.num_validation_images)


def export_model(model: StableDiffusion, cfg: ConceptConfig, ema: EMA | None,
                 params: list[nn.Parameter]) -> dict[str, Path]:
    """Write the tuned model: single file (+ diffusers folder) (+ the same with EMA weights)."""
    out = Path(cfg.out)
    written = {"ldm": out / "concept.safetensors"}
    save_ldm(model, written["ldm"], dtype=cfg.save_dtype)
    if cfg.save_diffusers:
        written["diffusers"] = out / "diffusers"
        save_diffusers(model, written["diffusers"], dtype=cfg.save_dtype)
    if cfg.export_ema and ema is not None:
        with ema.applied(params):
            written["ldm_ema"] = out / "concept_ema.safetensors"
            save_ldm(model, written["ldm_ema"], dtype=cfg.save_dtype)
            if cfg.save_diffusers:
                written["diffusers_ema"] = out / "diffusers_ema"
                save_diffusers(model, written["diffusers_ema"], dtype=cfg.save_dtype)
    return written


# --------------------------------------------------------------------------------------- main

def main(cfg: ConceptConfig) -> ConceptResult:
    with distributed_session(cfg.device) as info:
        device = info.device
        # The checks that need no model run first (flags, the run in --out, the data), and nothing
        # in OUT changes until every check passed: config.json is written after them.
        check_flags(cfg)
        refuse_to_overwrite(cfg.out, cfg.resume, cfg.overwrite)
        check_instance_data(cfg.data)
        barrier()  # every rank has checked --out before rank 0 writes into it
        model = load_base_model(cfg)
        cfg = resolve_config(cfg, model, device)
        check_identifier(model, cfg.identifier)
        out, ckpt_root = Path(cfg.out), Path(cfg.out) / "checkpoints"
        resume_from = resolve_resume(ckpt_root, cfg.resume)
        if info.is_main:
            archive_previous_run(out, cfg.resume, cfg.overwrite, keep=("class_images",))
            save_config_json(cfg, out / "config.json", provenance=True)

        # Networks: the UNet (and optionally the text encoder) train in float32; the rest is frozen
        # in the low dtype. `model` keeps float32 originals of the frozen parts for the export.
        low = precision_dtype(cfg.precision)
        unet = model.unet.to(device).train().requires_grad_(True)
        vae = frozen_copy(model.vae, low, device)
        if cfg.train_text_encoder:
            text_encoder = model.text_encoder.to(device).train().requires_grad_(True)
        else:
            text_encoder = frozen_copy(model.text_encoder, low, device)

        # Class images first, drawn by the still untouched base model.
        class_paths = generate_class_images(unet, vae, text_encoder, model, cfg, info) if cfg.with_prior else []

        # Data: instance images (COCO) and class images; VAE posteriors and prompts cached if asked.
        instance_data = ConceptDataset(instance_images(cfg.data), cfg.resolution, prompt=cfg.instance_prompt)
        class_data = ConceptDataset(class_paths, cfg.resolution, prompt=cfg.class_prompt) if cfg.with_prior else None
        instance_cache = encode_dataset(vae, instance_data, device) if cfg.cache_latents else None
        class_cache = encode_dataset(vae, class_data, device) if cfg.cache_latents and class_data else None
        tokens = model.tokenizer([cfg.instance_prompt, cfg.class_prompt, ""]).to(device)  # (3, 77)
        with torch.no_grad():
            uncond_context = text_encoder(tokens[2:]).float()  # (1, 77, D), for the sample grids
            cache_text = cfg.cache_text_embeddings and not cfg.train_text_encoder
            text_cache = text_encoder(tokens[:2]).float() if cache_text else None  # (2, 77, D)

        # Optimizer, loss scaler, EMA, data order and the noise generator.
        groups = [param_group("unet", unet.parameters(), lr=cfg.lr)]
        if cfg.train_text_encoder:
            groups.append(param_group("text_encoder", text_encoder.parameters(), lr=cfg.text_encoder_lr))
        params = [p for g in groups for p in g["params"]]
        optimizer = build_adamw(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay)
        scaler = make_grad_scaler(cfg.precision, device)
        ema = EMA(params, cfg.ema_decay) if cfg.ema else None
        instance_order = IndexStream(len(instance_data), derive_seed(cfg.seed, "instance_order"))
        class_order = IndexStream(len(class_data), derive_seed(cfg.seed, "class_order")) if class_data else None
        noise_gen = torch.Generator(device).manual_seed(derive_seed(cfg.seed, "noise", info.rank))
        torch.manual_seed(derive_seed(cfg.seed, "global", info.rank))

        start_step = 0
        if resume_from is not None:
            weights, state = restore_training_state(resume_from, cfg, info, optimizer, scaler, ema,
                                                    {"noise": noise_gen},
                                                    RESUMABLE_CHANGES | prompts_of_older_checkpoint(resume_from, cfg))
            unet.load_state_dict(strip_prefix(weights, "unet."), strict=True)
            if cfg.train_text_encoder:
                text_encoder.load_state_dict(strip_prefix(weights, "text_encoder."), strict=True)
            instance_order.load_state_dict(state["data"]["instance"])
            if class_order is not None:
                class_order.load_state_dict(state["data"]["class"])
            start_step = state["step"]
            if info.is_main:
                print(f"resumed from {resume_from} at step {start_step}")

        unet.set_gradient_checkpointing(cfg.gradient_checkpointing)
        compile_module(unet, cfg.compile)
        unet_ddp = wrap_ddp(unet, info)
        # The SD 2.x text encoder stops at its penultimate layer: the last one gets no gradient.
        text_ddp = wrap_ddp(text_encoder, info, find_unused_parameters=True) if cfg.train_text_encoder else text_encoder
        synced = [unet_ddp, text_ddp] if cfg.train_text_encoder else [unet_ddp]
        prior_weight = cfg.prior_loss_weight if cfg.with_prior else None
        batch = cfg.batch_size

        def instance_context() -> torch.Tensor:
            with torch.no_grad():
                return text_cache[0:1] if text_cache is not None else text_encoder(tokens[0:1]).float()

        def validation_contexts() -> torch.Tensor:
            """(P, 77, D): instance, class and every --validation-prompt, from the current text encoder."""
            with torch.no_grad():
                others = text_encoder(model.tokenizer([cfg.class_prompt, *cfg.validation_prompt]).to(device)).float()
            return torch.cat([instance_context(), others])

        def save(step: int) -> Path | None:
            """All ranks (the replicas are checked, RNG states gathered); rank 0 writes."""
            weights = trainable_weights(unet, text_encoder if cfg.train_text_encoder else None)
            data = {"instance": instance_order.state_dict(),
                    "class": class_order.state_dict() if class_order else None}
            return save_training_state(ckpt_root, step, weights, cfg, info, params, optimizer, scaler, ema,
                                       {"noise": noise_gen}, data, cfg.keep_last)

        metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step, enabled=info.is_main,
                             report_to=cfg.report_to)
        bar = progress_bar(cfg.steps, start_step, enabled=cfg.progress and info.is_main, desc="concept")
        history: list[dict[str, float]] = []
        stopped, last_saved, started = False, None, time.perf_counter()
        with StopSignal() as stop:
            for step in range(start_step, cfg.steps):
                terms = torch.zeros(3, device=device)  # loss, instance, prior: mean over micro-batches
                for micro in range(cfg.grad_accum):
                    # Batch: instance rows then class rows, this rank's slice of the global batch.
                    mean, std = posterior_of(instance_order.take_for_rank(batch, info.rank, info.world_size),
                                             instance_data, instance_cache, vae, device)
                    if class_order is not None:
                        class_idx = class_order.take_for_rank(batch, info.rank, info.world_size)
                        class_mean, class_std = posterior_of(class_idx, class_data, class_cache, vae, device)
                        mean, std = torch.cat([mean, class_mean]), torch.cat([std, class_std])
                    # Encode -> noise, t (train/diffusion.py).
                    z0 = sample_latents(mean, std, model.latent_scale, noise_gen)
                    noise = sample_noise(z0, noise_gen)
                    t = sample_timesteps(z0.shape[0], noise_gen, model.schedule.num_train_timesteps).to(device)
                    z_t = model.schedule.q_sample(z0, t, noise)
                    target = diffusion_target(model.schedule, model.prediction_type, z0, noise, t)

                    # Model -> loss -> backward; DDP syncs gradients on the last micro-batch only.
                    with grad_sync(synced, sync=micro == cfg.grad_accum - 1):
                        with autocast(device, cfg.precision):
                            with torch.set_grad_enabled(cfg.train_text_encoder):
                                prompts = text_cache if text_cache is not None else text_ddp(tokens[:2])
                            # (2, 77, D) -> (B_inst + B_class, 77, D): one prompt per half.
                            context = torch.cat([prompts[0:1].expand(batch, -1, -1),
                                                 prompts[1:2].expand(z0.shape[0] - batch, -1, -1)])
                            pred = unet_ddp(z_t, t, context)
                        loss, micro_terms = dreambooth_loss(pred, target, batch, prior_weight)
                        micro_terms = all_reduce_mean(micro_terms)
                        check_finite(step + 1, dict(zip(TERMS, micro_terms.tolist())))
                        scaler.scale(loss / cfg.grad_accum).backward()
                    terms += micro_terms / cfg.grad_accum

                # Unscale -> clip -> step -> zero_grad -> EMA, at this step's learning rate.
                lr_scale = lr_multiplier(step, cfg.lr_warmup_steps, cfg.steps, cfg.lr_schedule)
                grad_norm = optimizer_step(optimizer, scaler, params, cfg.max_grad_norm, ema, lr_scale)
                done = step + 1
                record = dict(zip(TERMS if cfg.with_prior else TERMS[:2], terms.tolist()))
                history.append({"step": done, **record})
                bar.update(1)

                # Log / checkpoint / sample.
                if done % cfg.log_every == 0 or done == cfg.steps:
                    lr = optimizer.param_groups[0]["lr"]
                    # the loss terms averaged over the logging window (train/monitor.py: window_mean)
                    metrics.write({"step": done, **window_mean(history, done, cfg.log_every), "lr": lr,
                                   "grad_norm": grad_norm.item(),
                                   "steps_per_s": (done - start_step) / (time.perf_counter() - started)})
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                stopped = any_rank(stop.requested, device)
                if stopped or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                    save(done)
                    last_saved = done
                if stopped:
                    if info.is_main:
                        bar.write(f"stopped by signal: saved step {done} under {ckpt_root}; "
                                  f"continue with --resume latest")
                    break
                if (cfg.validate_every and cfg.num_validation_images and done % cfg.validate_every == 0
                        and done < cfg.steps and info.is_main):
                    render_samples(unet, vae, validation_contexts(), uncond_context, model, cfg, done)
        bar.close()
        metrics.close()

        # The end: last checkpoint, a final sample grid, the exported model.
        step = history[-1]["step"] if history else start_step
        checkpoint, exported = None, {}
        if not stopped:
            if last_saved != step:
                save(step)
            checkpoint = ckpt_root / checkpoint_name(step)
            if info.is_main:
                if cfg.num_validation_images:
                    render_samples(unet, vae, validation_contexts(), uncond_context, model, cfg, step)
                exported = export_model(model, cfg, ema, params)
        if info.is_main:  # OUT/curves.png: the loss terms of the whole run, from metrics.jsonl
            plot_metrics(out / "metrics.jsonl", TERMS if cfg.with_prior else TERMS[:2], out / "curves.png")
        barrier()
        return ConceptResult(model, history, step, stopped, checkpoint, exported)


# ---------------------------------------------------------------------------------------- CLI

def get_args_parser():
    return parser_from_dataclass(ConceptConfig, prog="python -m train.concept")


@command("concept")
def cli(argv: list[str] | None = None) -> int:
    result = main(config_from_args(ConceptConfig, get_args_parser().parse_args(argv)))
    return 1 if result.stopped else 0  # a stop (SIGINT/SIGTERM) is not a finished run


if __name__ == "__main__":
    sys.exit(cli())

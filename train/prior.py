"""The tiny prior: a small text-to-image model of our own architecture, trained by our own code,
that stands in for Stable Diffusion's general prior when no SD weights are on disk.

    python -m train.prior --data runs/demo/data/prior_surfaces/free.json --out runs/prior
    python -m train.prior --data my_surface_images/ --out runs/prior --vae-steps 2000 --unet-steps 5000

The paper starts from SD's internet-scale prior and teaches it the defects (concept phase). The
embedded demo cannot download SD, so it first trains a prior of the `tiny` preset (SD's own
architecture, ~1.3M VAE + ~1.4M UNet parameters, model/stable_diffusion.py) on generic surfaces.
Use images WITHOUT the annotated defect set's specifics (the demo uses extra defect-free surfaces
from another seed): like SD, the prior knows "a metal surface" but has never seen our defects, so
the concept phase has something to teach. Two phases, each with its loop written out below:

1. The VAE, as an autoencoder on random crops (`--vae-crop`; it is convolutional, so crops teach it
   the whole image at a fraction of the cost, as SD's VAE was trained at 256 px and runs at 512):

       z ~ q(z | x) = N(mean, std^2)            posterior sample (reparameterised)
       loss = mean|x - D(z)|                                  L1 reconstruction
            + edge_weight * mean|grad x - grad D(z)|          finite-difference edges (keeps the
                                                              texture's fine lines; no perceptual net)
            + kl_weight * mean KL(q(z | x) || N(0, I))        per latent element

   LDM trains with L1 + LPIPS + a patch GAN; we have no pretrained LPIPS net offline, so the edge
   term stands in for the sharpening those give. The KL term is small: it keeps the posterior
   variance sane, not the latents' scale, which is then normalised as in LDM's `scale_by_std`:
   scaling_factor = 1 / std(posterior means of the training images), stored in the model's config.

2. The UNet, as a text-to-image diffusion model (eps-prediction, SD's schedule, train/diffusion.py)
   on the frozen VAE's latents of the same images (and their mirror images), with ONE generic
   caption (`--caption`, default "an image of a metal surface", the concept phase's class prompt)
   replaced by "" with probability `--caption-dropout` (0.1, as SD), so classifier-free guidance has
   an unconditional model to push against. The text encoder stays at its seeded random init,
   frozen: a random CLIP still maps different prompts to different contexts (the causal
   transformer mixes distinct token embeddings), which is all conditioning needs, so "an image of
   a sks" later reads differently from the caption and the concept phase can bind it.
   An EMA of the UNet weights (`--ema-decay`) is what gets exported.

Outputs (OUT):
    config.json                       the resolved run config
    checkpoints/vae/, checkpoints/unet/   training checkpoints per phase (train/checkpoint.py)
    vae_metrics.jsonl, unet_metrics.jsonl, curves.png
    reconstructions.png               rows of (original, reconstruction) pairs; PSNR in prior.json
    samples/unet_step_*.png           sample grids of the caption (DDIM, CFG) from fixed seeds
    prior.json                        PSNR of the VAE, latent scale, steps, seconds, the objective
    prior.safetensors                 the model (weights.save_ldm), written LAST: the completion marker

`python -m train.concept --ckpt OUT/prior.safetensors ...` (and every other stage) loads it with
`weights.load_pipeline`. Resumable (`--resume latest`, bit-exact per phase), seeded, single process.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.adherence import adherence
from data.coco import annotations_by_image, decode_instances, load_coco
from data.drivers import topological_driver
from data.files import write_json_atomic
from data.images import list_images, read_image, tensor_to_image
from data.resize import check_resolution, resize_and_crop
from data.seeding import derive_seed
from defectsynth.errors import UserError, command
from defectsynth.runconfig import config_from_args, parser_from_dataclass, save_config_json
from model.stable_diffusion import PRESETS, StableDiffusion, preset
from sample.pipeline import generate
from sample.runtime import compile_module
from train.checkpoint import (archive_previous_run, check_resume_config, list_checkpoints, load_checkpoint,
                              refuse_to_overwrite, resolve_resume, strip_prefix, with_prefix)
from train.data_order import IndexStream
from train.diffusion import diffusion_target, encode_posterior, sample_latents, sample_noise, sample_timesteps
from train.distributed import DistInfo, pick_device
from train.ema import EMA
from train.monitor import MetricsLog, StopSignal, check_finite, progress_bar, save_image_grid, window_mean
from train.optim import build_adamw, lr_multiplier, optimizer_step, param_group
from train.plot import Curve, plot_curves
from train.precision import PRECISIONS, autocast, make_grad_scaler, resolve_precision
from train.state import restore_training_state, save_training_state
from weights import save_ldm

VAE_TERMS = ("loss", "l1", "edge", "kl")
# Fields that may change when a phase resumes (bookkeeping); each phase adds what does not affect it.
BOOKKEEPING = frozenset({"resume", "overwrite", "progress", "log_every", "checkpoint_every", "keep_last", "device",
                         "num_samples", "sample_steps", "sample_guidance", "sample_every", "eval_data"})
UNET_FIELDS = frozenset({"caption", "caption_dropout", "unet_steps", "unet_batch_size", "unet_lr",
                         "unet_warmup_steps", "ema_decay"})
VAE_MAY_CHANGE = BOOKKEEPING | UNET_FIELDS | {"vae_steps"}
UNET_MAY_CHANGE = BOOKKEEPING | {"unet_steps"}


@dataclass(frozen=True)
class PriorConfig:
    """Train the tiny prior (VAE, then text-to-image UNet) that stands in for SD's general prior."""

    data: str = field(default="", metadata={"help": "training images: a COCO JSON file or a folder of images "
                                                    "(generic surfaces, not the annotated defect set)"})
    out: str = field(default="", metadata={"help": "output folder (required)"})
    preset: str = field(default="tiny", metadata={"help": "architecture", "choices": sorted(PRESETS)})
    resolution: int = field(default=0, metadata={"help": "image side in pixels, a multiple of 64 "
                                                         "(0: the preset's native size); stored as the model's size"})
    caption: str = field(default="an image of a metal surface", metadata={
        "help": "the one generic caption (use the concept phase's class prompt)"})
    caption_dropout: float = field(default=0.1, metadata={"help": "fraction of captions replaced by \"\""})
    eval_data: str = field(default="", metadata={
        "help": "more images (COCO JSON or folder) whose VAE reconstruction PSNR is reported, e.g. the defect set"})
    # ---- phase 1: the VAE
    vae_steps: int = field(default=300, metadata={"help": "VAE optimizer steps"})
    vae_batch_size: int = field(default=8, metadata={"help": "VAE crops per step"})
    vae_crop: int = field(default=64, metadata={"help": "VAE training crop side, a multiple of 8 (0: whole images)"})
    vae_lr: float = field(default=2e-3, metadata={"help": "VAE learning rate (AdamW, cosine decay)"})
    kl_weight: float = field(default=1e-6, metadata={"help": "weight of the per-element KL term"})
    logvar_init: float = field(default=-6.0, metadata={
        "help": "initial posterior log-variance (bias of the logvar half of quant_conv); -6: std 0.05"})
    edge_weight: float = field(default=0.5, metadata={"help": "weight of the finite-difference edge L1 term"})
    # ---- phase 2: the UNet
    unet_steps: int = field(default=800, metadata={"help": "UNet optimizer steps"})
    unet_batch_size: int = field(default=16, metadata={"help": "latents per step"})
    unet_lr: float = field(default=1e-3, metadata={"help": "UNet learning rate (AdamW, warmup then cosine)"})
    unet_warmup_steps: int = field(default=50, metadata={"help": "UNet linear warmup steps"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the UNet weights, exported (0: none)"})
    # ---- shared optimisation
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: none)"})
    precision: str = field(default="auto", metadata={
        "help": "auto: bf16 on CUDA and on CPUs with native bf16 (AMX / AVX-512 BF16), else fp32; trainable weights stay float32", "choices": ["auto", *PRECISIONS]})
    # ---- run
    seed: int = field(default=0, metadata={"help": "weights init (text encoder included), data order, noise"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})
    log_every: int = field(default=10, metadata={
        "help": "optimizer steps between metric records; each holds the mean of the losses over those steps"})
    checkpoint_every: int = field(default=200, metadata={"help": "steps between checkpoints (0: end of a phase only)"})
    keep_last: int = field(default=1, metadata={"help": "checkpoints kept per phase (0: all)"})
    resume: str = field(default="", metadata={"help": "'latest': continue each phase from its newest checkpoint"})
    overwrite: bool = field(default=False, metadata={
        "help": "start over in an --out that holds a run: move that run to OUT/previous_runs/<time>/ first "
                "(without it, such an --out is refused unless --resume latest is given)"})
    num_samples: int = field(default=16, metadata={"help": "images per sample grid (0: none)"})
    sample_steps: int = field(default=25, metadata={"help": "DDIM steps of the sample grids"})
    sample_guidance: float = field(default=3.0, metadata={"help": "CFG scale of the sample grids"})
    sample_every: int = field(default=0, metadata={"help": "UNet steps between sample grids (0: end only)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the UNet (pays on long runs; the first steps compile)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


@dataclass
class PriorResult:
    """What `main` returns: the model (EMA UNet, scaled VAE), per-step loss records of both phases,
    the VAE's reconstruction PSNR, and the exported file (None when a stop signal ended the run)."""
    model: StableDiffusion
    vae_history: list[dict[str, float]]
    unet_history: list[dict[str, float]]
    psnr: dict[str, float]
    stopped: bool
    exported: Path | None


# ----------------------------------------------------------------------------------- helpers

def resolve_config(cfg: PriorConfig, device: torch.device) -> PriorConfig:
    """Check the flags; fill resolution, precision and device with what this run uses."""
    if not cfg.out:
        raise UserError("train.prior: --out is required")
    if not cfg.data:
        raise UserError("train.prior: --data is required (a COCO JSON file or a folder of images)")
    resolution = cfg.resolution or PRESETS[cfg.preset].image_size
    check_resolution(resolution)
    for name in ("vae_steps", "unet_steps", "vae_batch_size", "unet_batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"train.prior: --{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.vae_crop and (cfg.vae_crop % 8 or cfg.vae_crop > resolution):
        raise UserError(f"train.prior: --vae-crop {cfg.vae_crop} must be a multiple of 8 and at most the "
                         f"resolution {resolution} (0: whole images)")
    if not 0.0 <= cfg.caption_dropout <= 1.0:
        raise UserError(f"train.prior: --caption-dropout must be in [0, 1], got {cfg.caption_dropout}")
    if cfg.resume not in ("", "latest"):
        raise UserError(f"train.prior: --resume must be '' or 'latest' (each phase resumes from its own "
                         f"newest checkpoint), got {cfg.resume!r}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise UserError(f"train.prior: --ema-decay must be in [0, 1), got {cfg.ema_decay}")
    return replace(cfg, resolution=resolution, precision=resolve_precision(cfg.precision, device, announce="train.prior"),
                   device=device.type)


def image_paths(source: str) -> list[str]:
    """The image files of a COCO JSON (every image it lists) or of a folder (recursive)."""
    path = Path(source)
    if path.is_dir():
        paths = [str(p) for p in list_images(path)]
    elif path.is_file():
        paths = [img["file_name"] for img in load_coco(path, progress=False)["images"]]
    else:
        raise UserError(f"train.prior: {source}: expected a COCO JSON file or a folder of images")
    if not paths:
        raise UserError(f"train.prior: {source} holds no images")
    return paths


def load_images(paths: list[str], resolution: int) -> torch.Tensor:
    """Every image scaled to cover `resolution` and centre-cropped: uint8 (N, 3, R, R) on the CPU
    (a few MB for a few hundred small images; decoded once, cropped per step)."""
    images = [resize_and_crop(read_image(p), (resolution, resolution))[0] for p in paths]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, R, R, 3) -> (N, 3, R, R)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


def random_crops(images: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """A random `crop` x `crop` window of each image, mirrored with probability 0.5; all draws from
    `generator` (3 numbers per image). uint8 (B, 3, H, W) -> uint8 (B, 3, crop, crop)."""
    height, width = images.shape[-2:]
    out = []
    for image in images:
        y = int(torch.randint(0, height - crop + 1, (), generator=generator))
        x = int(torch.randint(0, width - crop + 1, (), generator=generator))
        window = image[:, y:y + crop, x:x + crop]
        out.append(window.flip(-1) if torch.rand((), generator=generator) < 0.5 else window)
    return torch.stack(out)


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical finite differences of (B, C, H, W): (B, C, H, W-1), (B, C, H-1, W)."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             edge_weight: float, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The autoencoder objective (module docstring). Returns (loss, detached [loss, l1, edge, kl])."""
    x, recon = x.float(), recon.float()
    l1 = (recon - x).abs().mean()
    (rx, ry), (tx, ty) = image_gradients(recon), image_gradients(x)
    edge = 0.5 * ((rx - tx).abs().mean() + (ry - ty).abs().mean())
    # KL(N(mean, var) || N(0, 1)) per latent element, averaged.
    kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1.0 - logvar.float()).mean()
    loss = l1 + edge_weight * edge + kl_weight * kl
    return loss, torch.stack([loss, l1, edge, kl]).detach()


@torch.no_grad()
def vae_adherence(vae: nn.Module, source: str, resolution: int, device: torch.device,
                  limit: int = 32) -> dict[str, float] | None:
    """Condition adherence (data/adherence.py) of the VAE's reconstructions of the first `limit`
    annotated images of `source` (a COCO JSON; images already at `resolution`), each scored against
    the topological driver of its original with its own masks: the ceiling of every generated
    image's adherence downstream, since every image the model makes goes through this decoder.
    "originals" scores the originals the same way (1.0 when every defect stands out). None when
    `source` has no such images."""
    path = Path(source)
    if not path.is_file():
        return None
    data = load_coco(path, progress=False)
    by_image = annotations_by_image(data)
    records = [im for im in data["images"]
               if by_image.get(im["id"]) and (im["height"], im["width"]) == (resolution, resolution)][:limit]
    if not records:
        return None
    originals = [read_image(im["file_name"]) for im in records]
    instances = [decode_instances(im, by_image[im["id"]]) for im in records]
    batch = torch.from_numpy(np.stack(originals)).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)
    recon = reconstruct(vae, batch, device)
    drivers = [topological_driver(image, inst) for image, inst in zip(originals, instances)]
    scores = [adherence(tensor_to_image(r), d, inst) for r, d, inst in zip(recon, drivers, instances)]
    placements = [s.placement for s in scores if s.placement is not None]
    return {"reconstructions": float(np.mean([s.score for s in scores])),
            "reconstructions_topology": float(np.mean([s.topology for s in scores])),
            "reconstructions_placement": float(np.mean(placements)) if placements else float("nan"),
            "originals": float(np.mean([adherence(o, d, inst).score
                                        for o, d, inst in zip(originals, drivers, instances)])),
            "images": len(records)}


def reconstruct(vae: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 16) -> torch.Tensor:
    """Decode(posterior mean) of uint8 (N, 3, H, W) images: float32 (N, 3, H, W) in [-1, 1]."""
    out = []
    for start in range(0, len(images), batch_size):
        x = to_unit_range(images[start:start + batch_size]).to(device)
        out.append(vae.decode(vae.encode(x).mean).float().clamp(-1, 1).cpu())
    return torch.cat(out)


def flat_images(images: torch.Tensor) -> torch.Tensor:
    """Each uint8 image replaced by its mean colour, in [-1, 1]: the PSNR a VAE must beat."""
    return (images.float().mean((2, 3), keepdim=True) / 127.5 - 1).expand(images.shape).contiguous()


def psnr(images: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE) on the [0, 1] scale (uint8 originals vs [-1, 1] recon)."""
    target = images.float() / 255.0
    mse = ((recon + 1) / 2 - target).square().flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def phase_done(root: Path, steps: int) -> Path | None:
    """The newest complete checkpoint of a phase if it reached `steps`, else None."""
    found = list_checkpoints(root)
    if found and int(found[-1].name.split("_")[1]) >= steps:
        return found[-1]
    return None


def with_latent_scale(model: StableDiffusion, scale: float) -> StableDiffusion:
    """Store the VAE scaling factor in the config (module and bundle agree, as save_ldm checks)."""
    vae_config = replace(model.config.vae, scaling_factor=float(scale))
    model.vae.config = vae_config
    model.config = replace(model.config, vae=vae_config)
    return model


def plot_prior_curves(out: Path) -> Path:
    """OUT/curves.png: VAE loss and UNet loss over steps (from the two metrics files)."""
    curves = []
    for phase in ("vae", "unet"):
        path = out / f"{phase}_metrics.jsonl"
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip()] if path.is_file() else []
        curves.append(Curve(f"{phase.upper()} loss", [r["step"] for r in records], [r["loss"] for r in records]))
    return plot_curves(curves, out / "curves.png")


@dataclass
class PhaseState:
    """What one phase's checkpoints hold: the network's weights (keys prefixed "<name>."), the
    optimizer, loss scaler, EMA, generators and data order. Both phases resume and save through it."""
    name: str
    label: str  # for messages
    network: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    generators: dict[str, torch.Generator]
    order: IndexStream
    root: Path
    may_change: frozenset[str]

    def resume(self, cfg: PriorConfig, info: DistInfo) -> int:
        """Restore the checkpoint --resume names (if any); returns the step to continue from."""
        resume_from = resolve_resume(self.root, cfg.resume)
        if resume_from is None:
            return 0
        weights, state = restore_training_state(resume_from, cfg, info, self.optimizer, self.scaler, self.ema,
                                                self.generators, self.may_change)
        self.network.load_state_dict(strip_prefix(weights, f"{self.name}."), strict=True)
        self.order.load_state_dict(state["data"]["order"])
        print(f"train.prior: {self.label} resumed from {resume_from} at step {state['step']}")
        return state["step"]

    def checkpoint(self, cfg: PriorConfig, info: DistInfo, done: int, last: int, stopped: bool, bar) -> bool:
        """After optimizer step `done`: save when a signal stopped the run, at the phase's last step
        and every --checkpoint-every steps. Returns whether the loop must stop."""
        if stopped or done == last or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            self.save(cfg, info, done)
        if stopped:
            bar.write(f"stopped by signal: saved {self.label} step {done} under {self.root}; "
                      f"continue with --resume latest")
        return stopped

    def save(self, cfg: PriorConfig, info: DistInfo, step: int) -> None:
        save_training_state(self.root, step, with_prefix(f"{self.name}.", self.network.state_dict()), cfg, info,
                            self.params, self.optimizer, self.scaler, self.ema, self.generators,
                            {"order": self.order.state_dict()}, cfg.keep_last)


# ------------------------------------------------------------------------------ phase 1: VAE

def train_vae(model: StableDiffusion, images: torch.Tensor, cfg: PriorConfig, info: DistInfo
              ) -> tuple[list[dict[str, float]], bool]:
    """Train model.vae as an autoencoder on random crops (or continue / skip a finished phase).
    Returns (per-step records of this call, stopped by a signal)."""
    device, out = info.device, Path(cfg.out)
    root = out / "checkpoints" / "vae"
    vae = model.vae.to(device).train().requires_grad_(True)
    params = list(vae.parameters())
    optimizer = build_adamw([param_group("vae", params, lr=cfg.vae_lr)], weight_decay=cfg.weight_decay)
    scaler = make_grad_scaler(cfg.precision, device)
    order = IndexStream(len(images), derive_seed(cfg.seed, "vae_order"))
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "vae_noise"))  # crops, flips, posterior noise
    generators = {"noise": gen}

    phase = PhaseState("vae", "VAE", vae, params, optimizer, scaler, None, generators, order, root, VAE_MAY_CHANGE)
    start = phase.resume(cfg, info)

    crop = cfg.vae_crop or cfg.resolution
    metrics = MetricsLog(out / "vae_metrics.jsonl", resume_step=start)
    bar = progress_bar(cfg.vae_steps, start, enabled=cfg.progress, desc="prior VAE")
    history, stopped = [], False
    with StopSignal() as stop:
        for step in range(start, cfg.vae_steps):
            # Batch -> encode -> sample z -> decode -> loss -> backward -> clip -> step.
            x = to_unit_range(random_crops(images[order.take(cfg.vae_batch_size)], crop, gen)).to(device)
            with autocast(device, cfg.precision):
                posterior = vae.encode(x)
                noise = torch.randn(posterior.mean.shape, generator=gen).to(device)
                recon = vae.decode(posterior.mean + posterior.std * noise)
            loss, terms = vae_loss(x, recon, posterior.mean, posterior.logvar, cfg.edge_weight, cfg.kl_weight)
            record = dict(zip(VAE_TERMS, terms.tolist()))
            check_finite(step + 1, record)
            scaler.scale(loss).backward()
            grad_norm = optimizer_step(optimizer, scaler, params, cfg.max_grad_norm, None,
                                       lr_multiplier(step, 0, cfg.vae_steps, "cosine"))
            done = step + 1
            history.append({"step": done, **record})
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.vae_steps:
                metrics.write({"step": done, **window_mean(history, done, cfg.log_every),  # window means
                               "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm.item()})
                bar.set_postfix(l1=f"{record['l1']:.4f}")
            stopped = stop.requested
            if phase.checkpoint(cfg, info, done, cfg.vae_steps, stopped, bar):
                break
    bar.close()
    metrics.close()
    vae.requires_grad_(False).eval()
    return history, stopped


# ----------------------------------------------------------------------------- phase 2: UNet

@torch.no_grad()
def encode_images(vae: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 16
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of every image and of its mirror image: float32 (2N, c, h, w) on `device`."""
    means, stds = [], []
    for flipped in (False, True):
        for start in range(0, len(images), batch_size):
            x = to_unit_range(images[start:start + batch_size])
            mean, std = encode_posterior(vae, (x.flip(-1) if flipped else x).to(device))
            means.append(mean), stds.append(std)
    return torch.cat(means), torch.cat(stds)


def render_samples(model: StableDiffusion, unet: nn.Module, cfg: PriorConfig, step: int) -> Path | None:
    """A grid of the caption from fixed seeds (DDIM, CFG), at `step`."""
    if not cfg.num_samples:
        return None
    seeds = [derive_seed(cfg.seed, "sample", i) for i in range(cfg.num_samples)]
    images = generate(model, cfg.caption, seeds=seeds, sampler="ddim", steps=cfg.sample_steps,
                      guidance=cfg.sample_guidance, height=cfg.resolution, width=cfg.resolution, unet=unet)
    return save_image_grid(images * 2 - 1, Path(cfg.out) / "samples" / f"unet_step_{step:08d}.png")


def train_unet(model: StableDiffusion, latents: tuple[torch.Tensor, torch.Tensor], cfg: PriorConfig,
               info: DistInfo) -> tuple[list[dict[str, float]], bool, EMA | None]:
    """Train model.unet as a text-to-image model on cached latents (or continue / skip a finished
    phase). Returns (per-step records of this call, stopped by a signal, the EMA)."""
    device, out = info.device, Path(cfg.out)
    root = out / "checkpoints" / "unet"
    unet = compile_module(model.unet.to(device).train().requires_grad_(True), cfg.compile)
    params = list(unet.parameters())
    optimizer = build_adamw([param_group("unet", params, lr=cfg.unet_lr)], weight_decay=cfg.weight_decay)
    scaler = make_grad_scaler(cfg.precision, device)
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    order = IndexStream(len(latents[0]), derive_seed(cfg.seed, "unet_order"))
    noise_gen = torch.Generator(device).manual_seed(derive_seed(cfg.seed, "unet_noise"))
    caption_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "caption_dropout"))
    generators = {"noise": noise_gen, "caption": caption_gen}
    with torch.no_grad():  # (2, 77, D): the caption and "" through the frozen random text encoder
        contexts = model.text_encoder.to(device)(model.tokenizer([cfg.caption, ""]).to(device)).float()

    phase = PhaseState("unet", "UNet", unet, params, optimizer, scaler, ema, generators, order, root, UNET_MAY_CHANGE)
    start = phase.resume(cfg, info)

    metrics = MetricsLog(out / "unet_metrics.jsonl", resume_step=start)
    bar = progress_bar(cfg.unet_steps, start, enabled=cfg.progress, desc="prior UNet")
    history, stopped = [], False
    with StopSignal() as stop:
        for step in range(start, cfg.unet_steps):
            # Batch -> z0, noise, t -> caption or "" -> UNet -> MSE -> backward -> clip -> step -> EMA.
            index = torch.tensor(order.take(cfg.unet_batch_size), device=latents[0].device)
            z0 = sample_latents(latents[0][index], latents[1][index], model.latent_scale, noise_gen)
            noise = sample_noise(z0, noise_gen)
            t = sample_timesteps(z0.shape[0], noise_gen, model.schedule.num_train_timesteps).to(device)
            z_t = model.schedule.q_sample(z0, t, noise)
            target = diffusion_target(model.schedule, model.prediction_type, z0, noise, t)
            dropped = (torch.rand(z0.shape[0], generator=caption_gen) < cfg.caption_dropout).to(device)
            context = contexts[dropped.long()]  # row 0 = caption, row 1 = "": (B, 77, D)
            with autocast(device, cfg.precision):
                pred = unet(z_t, t, context)
            loss = F.mse_loss(pred.float(), target.float())
            check_finite(step + 1, {"loss": loss.item()})
            scaler.scale(loss).backward()
            lr_scale = lr_multiplier(step, cfg.unet_warmup_steps, cfg.unet_steps, "cosine")
            grad_norm = optimizer_step(optimizer, scaler, params, cfg.max_grad_norm, ema, lr_scale)
            done = step + 1
            history.append({"step": done, "loss": loss.item()})
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.unet_steps:
                metrics.write({"step": done, **window_mean(history, done, cfg.log_every),  # window means
                               "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm.item()})
                bar.set_postfix(loss=f"{loss.item():.4f}")
            stopped = stop.requested
            if phase.checkpoint(cfg, info, done, cfg.unet_steps, stopped, bar):
                break
            if cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.unet_steps:
                unet.eval()
                with ema.applied(params) if ema is not None else torch.no_grad():
                    render_samples(model, unet, cfg, done)
                unet.train()
    bar.close()
    metrics.close()
    return history, stopped, ema


# --------------------------------------------------------------------------------------- main

def measure_vae(model: StableDiffusion, vae: nn.Module, images: torch.Tensor, cfg: PriorConfig,
                device: torch.device, out: Path) -> tuple[dict, dict, dict | None, torch.Tensor, float]:
    """After the VAE phase: reconstruction PSNR (training images and --eval-data, each against a flat
    mean-colour image), reconstructions.png, the latents of every training image and their std,
    which sets the model's latent scale (LDM's scale_by_std), and the VAE adherence ceiling.
    Returns (psnr, flat psnr, ceiling or None, latents, latent std)."""
    check = images[:32]
    recon = reconstruct(vae, check, device)
    scores, flat = {"train": psnr(check, recon)}, {"train": psnr(check, flat_images(check))}
    rows = [check[:8].float() / 127.5 - 1, recon[:8]]
    if cfg.eval_data:
        extra = load_images(image_paths(cfg.eval_data)[:32], cfg.resolution)
        extra_recon = reconstruct(vae, extra, device)
        scores["eval"], flat["eval"] = psnr(extra, extra_recon), psnr(extra, flat_images(extra))
        rows += [extra[:8].float() / 127.5 - 1, extra_recon[:8]]
    save_image_grid(torch.cat(rows), out / "reconstructions.png", nrow=8)
    latents = encode_images(vae, images, device)
    latent_std = float(latents[0].double().std())
    with_latent_scale(model, 1.0 / latent_std)
    print(f"train.prior: VAE reconstruction PSNR {', '.join(f'{k} {v:.2f} dB' for k, v in scores.items())} "
          f"(mean-colour images: {', '.join(f'{k} {v:.2f} dB' for k, v in flat.items())}); "
          f"latent std {latent_std:.4f} -> scaling factor {model.latent_scale:.5f}")
    ceiling = vae_adherence(vae, cfg.eval_data, cfg.resolution, device) if cfg.eval_data else None
    if ceiling is not None:
        print(f"train.prior: condition adherence of the VAE's reconstructions of {ceiling['images']} --eval-data "
              f"images {ceiling['reconstructions']:.3f} (the originals {ceiling['originals']:.3f}): the ceiling "
              f"of every generated image's adherence")
    return scores, flat, ceiling, latents, latent_std


def main(cfg: PriorConfig) -> PriorResult:
    device = pick_device(cfg.device)
    info = DistInfo(device=device)  # one process: the shared checkpoint helpers take a DistInfo
    cfg = resolve_config(cfg, device)
    # Nothing in OUT changes before the flags, the run already in --out and --data are checked.
    refuse_to_overwrite(cfg.out, cfg.resume, cfg.overwrite)
    image_paths(cfg.data)
    out = Path(cfg.out)
    archive_previous_run(out, cfg.resume, cfg.overwrite)
    save_config_json(cfg, out / "config.json", provenance=True)
    started = time.perf_counter()

    # The untrained model, seeded: the text encoder keeps exactly these random weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = StableDiffusion(replace(preset(cfg.preset), image_size=cfg.resolution))
    model.text_encoder.requires_grad_(False).eval()
    # Start with a nearly deterministic posterior: at SD's init its std is ~1, which drowns the small
    # initial means in noise, and with a tiny KL weight the std stays there for hundreds of steps
    # (measured), so the decoder learns to ignore its input and the latents stay noisy.
    with torch.no_grad():
        model.vae.quant_conv.bias[model.config.vae.latent_channels:] = cfg.logvar_init
    torch.manual_seed(derive_seed(cfg.seed, "global"))
    images = load_images(image_paths(cfg.data), cfg.resolution)
    print(f"train.prior: {len(images)} images at {cfg.resolution} px from {cfg.data}")

    # Phase 1: the VAE. A finished phase is loaded from its final checkpoint instead of retrained.
    vae_final = phase_done(out / "checkpoints" / "vae", cfg.vae_steps) if cfg.resume else None
    if vae_final is None:
        vae_history, stopped = train_vae(model, images, cfg, info)
        if stopped:
            return PriorResult(model, vae_history, [], {}, True, None)
    else:
        vae_history = []
        weights, state = load_checkpoint(vae_final)
        check_resume_config(state["config"], cfg, vae_final, VAE_MAY_CHANGE)  # the VAE it trained is this one
        model.vae.load_state_dict(strip_prefix(weights, "vae."), strict=True)
    vae = model.vae.to(device).requires_grad_(False).eval()

    scores, flat, ceiling, latents, latent_std = measure_vae(model, vae, images, cfg, device, out)

    # Phase 2: the text-to-image UNet on the cached latents.
    unet_history, stopped, ema = train_unet(model, latents, cfg, info)
    if stopped:
        return PriorResult(model, vae_history, unet_history, scores, True, None)
    unet = model.unet.eval().requires_grad_(False)
    if ema is not None:
        ema.copy_to(list(unet.parameters()))  # export the EMA weights
    render_samples(model, unet, cfg, cfg.unet_steps)
    plot_prior_curves(out)

    summary = {"psnr_db": scores, "psnr_flat_db": flat,
               "psnr_definition": "mean over images of 10 log10(1 / MSE), RGB in [0, 1], decode(posterior mean) "
                                  "at the training resolution; 'train': first 32 training images, 'eval': the "
                                  "first 32 of --eval-data; psnr_flat_db: each image replaced by its mean colour",
               "vae_adherence": ceiling,
               "vae_adherence_definition": "data/adherence.py score of decode(posterior mean) of the first 32 "
                                           "annotated --eval-data images against their originals' drivers",
               "latent_std": latent_std, "scaling_factor": model.latent_scale, "resolution": cfg.resolution,
               "images": len(images), "vae_steps": cfg.vae_steps, "unet_steps": cfg.unet_steps,
               "final_vae_l1": vae_history[-1]["l1"] if vae_history else None,
               "final_unet_loss": unet_history[-1]["loss"] if unet_history else None,
               "ema_exported": ema is not None, "seconds_this_call": time.perf_counter() - started,
               "objective": {"vae": f"L1 + {cfg.edge_weight} * edge L1 + {cfg.kl_weight} * KL (per element)",
                             "unet": f"eps MSE, caption {cfg.caption!r} dropped to '' with p={cfg.caption_dropout}"}}
    write_json_atomic(out / "prior.json", summary, indent=2)
    model.to("cpu")
    exported = save_ldm(model, out / "prior.safetensors")  # the completion marker: written last
    print(f"train.prior: wrote {exported}")
    return PriorResult(model, vae_history, unet_history, scores, False, exported)


# ---------------------------------------------------------------------------------------- CLI

def get_args_parser():
    return parser_from_dataclass(PriorConfig, prog="python -m train.prior")


@command("prior")
def cli(argv: list[str] | None = None) -> int:
    result = main(config_from_args(PriorConfig, get_args_parser().parse_args(argv)))
    return 0 if not result.stopped else 1


if __name__ == "__main__":
    sys.exit(cli())

"""Text-to-image and driver-to-image generation from the command line.

    python -m sample.generate --ckpt weights/checkpoints/v1-5-pruned-emaonly.safetensors \\
        --prompt "an image of a sks" --num 8 --batch-size 4 --out runs/generate
    python -m sample.generate --ckpt runs/concept/concept.safetensors --prompt "an image of a sks with a crack" \\
        --control runs/condition/control.safetensors --hint driver.png --control-scale 1.0 --out runs/driven
    python -m sample.generate --preset tiny --random-weights --prompt "test" --out /tmp/smoke   # no checkpoint

Writes, in OUT:
    000000.png, 000001.png, ...   one image per sample (`--num`), written atomically
    grid.png                      the contact sheet of all samples (`--no-grid` to skip)
    generate.json                 the resolved run config, every sample's seed and the provenance

Sample i is drawn from the seed derive_seed(--seed, "sample", i) with its own generator, so its
randomness is the same whatever `--batch-size` is. The networks' kernels still depend on the batch size
in the last float bits (a rare pixel may move by one level); `--batch-invariant` runs the networks
one sample at a time so every image is bit-identical for any `--batch-size`. The model runs on `--device` in `--dtype`
(auto: bf16 on CUDA and on CPUs with native bf16, else fp32); the sampler maths stays float32.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import torch
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from data.files import encode_image, write_bytes_atomic, write_image_atomic, write_json_atomic
from data.images import read_image
from data.seeding import derive_seed
from defectsynth.errors import UserError, command
from defectsynth.provenance import provenance
from defectsynth.runconfig import config_from_args, config_to_dict, parser_from_dataclass
from model.stable_diffusion import PRESETS
from sample.pipeline import SAMPLERS, generate, random_pipeline
from sample.png_info import A1111_SAMPLER_NAMES, a1111_parameters, add_text_chunk, model_hash
from sample.runtime import DTYPES, dtype_name, resolve_device, resolve_dtype, to_uint8
from weights import load_control, load_pipeline


@dataclass(frozen=True)
class GenerateConfig:
    """Generate images from a prompt, optionally driven by a ControlNet and a hint image."""

    # ---- model
    ckpt: str = field(default="", metadata={"help": "SD checkpoint: single .safetensors/.ckpt file or diffusers folder"})
    preset: str = field(default="tiny", metadata={"help": "architecture for --random-weights",
                                                  "choices": sorted(PRESETS)})
    random_weights: bool = field(default=False, metadata={
        "help": "random weights of --preset instead of --ckpt (smoke tests, CPU demos)"})
    prediction_type: str = field(default="auto", metadata={
        "help": "override the model's prediction type", "choices": ["auto", "epsilon", "v_prediction"]})
    # ---- what to draw
    prompt: str = field(default="", metadata={"help": "text prompt"})
    negative_prompt: str = field(default="", metadata={"help": "unconditional prompt of classifier-free guidance"})
    num: int = field(default=4, metadata={"help": "images to generate"})
    batch: int = field(default=4, metadata={"help": "images per forward pass", "flag": "batch_size",
                                            "formerly": ("batch",)})
    batch_invariant: bool = field(default=False, metadata={
        "help": "run the networks one sample at a time: bit-identical images for any --batch-size (slower)"})
    seed: int = field(default=0, metadata={"help": "run seed; sample i uses derive_seed(seed, 'sample', i)"})
    seeds: tuple[int, ...] = field(default=(), metadata={
        "help": "explicit seeds, one image each (replaces --num and the derivation from --seed): --seeds 1 2 3"})
    height: int = field(default=0, metadata={"help": "image height in pixels, a multiple of 64 "
                                                     "(0: the hint's, else the model's native size)"})
    width: int = field(default=0, metadata={"help": "image width in pixels (0: as --height)"})
    # ---- sampler
    sampler: str = field(default="ddim", metadata={"help": "sampler", "choices": sorted(SAMPLERS)})
    steps: int = field(default=20, metadata={"help": "sampler steps"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance scale (1: none)"})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta (0: deterministic)"})
    # ---- control
    control: str = field(default="", metadata={"help": "ControlNet file or diffusers ControlNetModel folder"})
    hint: str = field(default="", metadata={"help": "hint image (the driver) for --control"})
    control_scale: float = field(default=1.0, metadata={"help": "multiplies the control residuals"})
    control_start: float = field(default=0.0, metadata={
        "help": "fraction of the steps after which the control starts acting (diffusers' control_guidance_start)"})
    control_end: float = field(default=1.0, metadata={
        "help": "fraction of the steps after which the control stops acting (diffusers' control_guidance_end)"})
    guess_mode: bool = field(default=False, metadata={"help": "ControlNet guess mode (residual ramp, "
                                                              "no control on the unconditional half)"})
    # ---- run
    dtype: str = field(default="auto", metadata={"help": "model dtype (auto: bf16 on CUDA and on CPUs with native bf16 (AMX / AVX-512 BF16), else fp32)",
                                                 "choices": ["auto", *DTYPES]})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    out: str = field(default="", metadata={"help": "output folder (required)"})
    grid: bool = field(default=True, metadata={"help": "also write grid.png"})
    png_info: bool = field(default=True, metadata={
        "help": "write the settings into each PNG as A1111's 'parameters' text (prompt, steps, sampler, CFG, "
                "seed, size, model hash), which A1111's PNG Info, ComfyUI and civitai read"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


@dataclass
class GenerateResult:
    images: Sequence[Path]     # lazy: nothing of size --num is held in memory
    grid: Path | None
    seeds: Sequence[int]
    usable: int = 0            # images that are finite and not one flat colour


class Lazy(Sequence):
    """Item i computed on demand (paths and seeds of a --num too large to list)."""

    def __init__(self, n: int, item: Callable[[int], object]):
        self._n, self._item = n, item

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(self._n))]
        if not -self._n <= index < self._n:
            raise IndexError(index)
        return self._item(index % self._n)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))


GRID_MAX = 64        # grid.png shows the first 64 images: the sheet stays bounded for any --num
SEEDS_LISTED = 1000  # generate.json lists the seeds up to this --num (the rule always)


def image_usable(image: torch.Tensor) -> bool:
    """(3, H, W) in [0, 1]: finite and not one flat colour (what a broken model or an fp16
    overflow produces: NaN decodes to black)."""
    return bool(torch.isfinite(image).all()) and float(image.float().flatten(1).std(dim=1).max()) * 255 >= 1.0


def check_size_before_loading(cfg: GenerateConfig) -> tuple[int, int] | None:
    """The checks that need no weights: the hint is readable and the image size fits the model
    (H and W multiples of the VAE's times the UNet's downsampling: 64 for SD), read from the
    preset or the checkpoint's header (meta tensors). Returns the hint's (h, w), if any."""
    hint_size = read_image(cfg.hint).shape[:2] if cfg.hint else None
    if cfg.control and not Path(cfg.control).exists():
        raise UserError(f"--control {cfg.control}: no such file or folder")
    if cfg.random_weights:
        config = PRESETS[cfg.preset]
        multiple = config.vae.downsample_factor * config.unet.downsample_factor
    else:
        from weights.load import inspect_checkpoint

        info = inspect_checkpoint(cfg.ckpt)
        unet, vae = info.components.get("unet"), info.components.get("vae")
        if unet is None or vae is None or unet.config is None or vae.config is None:
            return hint_size  # load_pipeline names what is missing
        multiple = vae.config.downsample_factor * unet.config.downsample_factor
    size = (cfg.height or cfg.width, cfg.width or cfg.height) if (cfg.height or cfg.width) else hint_size
    if size is not None and (size[0] % multiple or size[1] % multiple):
        source = "--height/--width" if (cfg.height or cfg.width) else f"the hint {cfg.hint}"
        raise UserError(f"{source}: {size[0]}x{size[1]} (h x w) pixels, but this model needs multiples of "
                        f"{multiple} (the VAE's times the UNet's downsampling: 64 for SD 1.x/2.x); "
                        f"pass --height/--width multiples of {multiple}")
    return hint_size


def read_hint(path: str, height: int, width: int) -> torch.Tensor:
    """The hint image as float32 (1, 3, H, W) in [0, 1]; resized (nearest: drivers are label maps
    painted in class colours, which interpolation would blend) when its size differs, with a
    warning when that changes its aspect ratio (the driver is stretched)."""
    image = read_image(path)  # uint8 (h, w, 3) RGB
    if image.shape[:2] != (height, width):
        h, w = image.shape[:2]
        if abs(h * width - w * height) > 0.01 * h * width:
            print(f"sample.generate: warning: the hint {path} is {w}x{h} (w x h) and is stretched to the "
                  f"{width}x{height} image (another aspect ratio); resize or crop it to match", file=sys.stderr)
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_NEAREST)
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0  # (H, W, 3) -> (1, 3, H, W)


def image_size(cfg: GenerateConfig, native: int) -> tuple[int, int]:
    """(height, width): the flags, else the hint's size, else the model's native size."""
    if cfg.height or cfg.width:
        return cfg.height or cfg.width, cfg.width or cfg.height
    if cfg.hint:
        h, w = read_image(cfg.hint).shape[:2]
        return h, w
    return native, native


def main(cfg: GenerateConfig) -> GenerateResult:
    if not cfg.out:
        raise UserError("sample.generate: --out is required")
    if not cfg.random_weights and not cfg.ckpt:
        raise UserError("sample.generate: give --ckpt (or --random-weights with --preset)")
    if bool(cfg.control) != bool(cfg.hint):
        raise UserError("sample.generate: --control and --hint go together")
    for name in ("num", "batch", "steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"sample.generate: --{name} must be at least 1, got {getattr(cfg, name)}")
    check_size_before_loading(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, announce="sample.generate")
    prediction_type = None if cfg.prediction_type == "auto" else cfg.prediction_type

    if cfg.random_weights:
        overrides = {} if prediction_type is None else {"prediction_type": prediction_type}
        sd = random_pipeline(cfg.preset, cfg.seed, **overrides).to(device=device, dtype=dtype)
    else:
        sd, info = load_pipeline(cfg.ckpt, device=device, dtype=dtype, prediction_type=prediction_type,
                                 return_info=True)
        print(f"loaded {cfg.ckpt}: {info.family}, prediction type {info.prediction_type} ({info.prediction_reason})")
    height, width = image_size(cfg, sd.config.image_size)
    control, hint = None, None
    if cfg.control:
        control = load_control(cfg.control, unet=sd.unet).eval()
        hint = read_hint(cfg.hint, height, width)
    cfg = replace(cfg, height=height, width=width, dtype=dtype_name(dtype), device=str(device),
                  prediction_type=sd.prediction_type)

    out = Path(cfg.out)
    if cfg.seeds:
        cfg = replace(cfg, num=len(cfg.seeds))
    # Seeds and paths are computed per batch: memory does not grow with --num, and every image is
    # on disk before the next batch starts (only the first GRID_MAX are kept, for grid.png).
    base_seed, given = cfg.seed, tuple(cfg.seeds)
    seeds = Lazy(cfg.num, lambda i: given[i] if given else derive_seed(base_seed, "sample", i))
    paths = Lazy(cfg.num, lambda i: out / f"{i:06d}.png")
    parameters = png_parameters(cfg) if cfg.png_info else None
    record = {"config": config_to_dict(cfg), "seed_rule": "--seeds" if given else "derive_seed(seed, 'sample', i)",
              "provenance": provenance(device)}  # package version, git commit, torch, device
    if cfg.num <= SEEDS_LISTED:
        record["seeds"] = list(seeds)
    write_json_atomic(out / "generate.json", record, indent=2)
    images, usable = [], 0
    bar = tqdm(total=cfg.num * cfg.steps, desc="denoising steps", disable=not cfg.progress)
    for start in range(0, cfg.num, cfg.batch):
        batch_seeds = seeds[start:start + cfg.batch]
        batch = generate(sd, cfg.prompt, seeds=batch_seeds, negative_prompts=cfg.negative_prompt,
                         sampler=cfg.sampler, steps=cfg.steps, guidance=cfg.guidance, eta=cfg.eta,
                         height=height, width=width, control=control, hints=hint,
                         control_scale=cfg.control_scale, guess_mode=cfg.guess_mode,
                         control_start=cfg.control_start, control_end=cfg.control_end,
                         batch_invariant=cfg.batch_invariant,
                         on_step=lambda n=1 if cfg.batch_invariant else len(batch_seeds): bar.update(n))
        for path, image, seed in zip(paths[start:start + cfg.batch], batch, batch_seeds):
            if parameters is None:
                write_image_atomic(path, to_uint8(image))
            else:  # the PNG with its settings, as A1111 writes them (sample/png_info.py)
                write_bytes_atomic(path, add_text_chunk(encode_image(to_uint8(image)), parameters(seed)))
            usable += image_usable(image)
        if cfg.grid and start < GRID_MAX:
            images.append(batch[:GRID_MAX - start].cpu())
        del batch
    bar.close()
    grid_path = None
    if cfg.grid:
        grid_path = out / "grid.png"
        images_all = torch.cat(images)  # (min(N, GRID_MAX), 3, H, W)
        shown = images_all.shape[0]
        nrow = min(shown, max(1, round(shown ** 0.5)))
        write_image_atomic(grid_path, to_uint8(make_grid(images_all, nrow=nrow, padding=2, pad_value=1.0)))
    if not usable:
        raise UserError(f"none of the {cfg.num} images written to {out} is usable (each is NaN or one flat "
                        f"colour): check the model with `defectsynth inspect {cfg.ckpt or '--preset ' + cfg.preset}`"
                        f"{' or use --dtype fp32' if cfg.dtype in ('fp16', 'bf16') else ''}")
    print(f"wrote {len(paths)} images ({usable} usable){' and grid.png' if grid_path else ''} to {out}")
    return GenerateResult(paths, grid_path, seeds, usable)


def png_parameters(cfg: GenerateConfig):
    """seed -> the A1111 `parameters` text of one image of this (resolved) config."""
    settings: dict[str, object] = {"Steps": cfg.steps, "Sampler": A1111_SAMPLER_NAMES.get(cfg.sampler, cfg.sampler),
                                   "CFG scale": cfg.guidance, "Seed": None, "Size": f"{cfg.width}x{cfg.height}"}
    if cfg.ckpt and not cfg.random_weights:
        settings["Model hash"] = model_hash(cfg.ckpt)
        settings["Model"] = Path(cfg.ckpt).stem if Path(cfg.ckpt).is_file() else Path(cfg.ckpt).name
    else:
        settings["Model"] = f"random-{cfg.preset}"
    if cfg.eta:
        settings["Eta"] = cfg.eta
    if cfg.control:  # the sd-webui-controlnet extension's entry
        settings["ControlNet 0"] = (f"Module: none, Model: {Path(cfg.control).stem} [{model_hash(cfg.control)}], "
                                    f"Weight: {cfg.control_scale}, Guidance Start: {cfg.control_start}, "
                                    f"Guidance End: {cfg.control_end}")

    def text(seed: int) -> str:
        return a1111_parameters(cfg.prompt, cfg.negative_prompt, {**settings, "Seed": seed})
    return text


def get_args_parser():
    return parser_from_dataclass(GenerateConfig, prog="python -m sample.generate")


@command("generate")
def cli(argv: list[str] | None = None) -> int:
    main(config_from_args(GenerateConfig, get_args_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

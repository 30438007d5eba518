"""Text-to-image and driver-to-image generation: one function the scripts share.

    images = generate(sd, ["an image of a sks"] * 4, seeds=[0, 1, 2, 3])                   # text-to-image
    images = generate(sd, prompts, seeds=seeds, control=control, hints=drivers)            # driver-to-image

It composes the pieces of sample/ and nothing more (see sample/guidance.py for the wrappers):

    model_fn = unet, run in its weights' dtype, output float32
    model_fn = ControlledModel(model_fn, control, hints, scale, guess_mode)   when a control is given
    denoiser = as_eps_denoiser(ClassifierFreeGuidance(model_fn, cond, uncond, guidance), ...)
    x_T      = randn_per_sample(shape, generators_from_seeds(seeds))          one CPU generator per sample
    latents  = sampler(denoiser, x_T, schedule, timesteps(steps))
    images   = (vae.decode(latents / 0.18215) + 1) / 2

Sample i's randomness depends only on seeds[i] (and the prompt, hint and settings), never on the
batch it was drawn in. The networks' float results do depend on the batch size in the last bits
(CPU and GPU libraries pick kernels by shape: a batch-1 Linear is a GEMV, convolutions are blocked
by batch), which can move a rare PNG pixel by one level. `batch_invariant=True` runs the networks
one sample at a time, so a sample is bit-identical whatever batch it was asked for in. The sampler maths (latents, guidance,
eps/v conversion) runs in float32 whatever the networks' dtype.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from defectsynth.errors import UserError
from model.stable_diffusion import StableDiffusion, preset
from sample.ddim import sample_ddim
from sample.ddpm import sample_ddpm
from sample.dpm_solver import karras_timesteps, sample_dpm_solver, sample_dpm_solver_karras
from sample.euler_ancestral import euler_timesteps, sample_euler_ancestral
from sample.guidance import ClassifierFreeGuidance, ControlledModel, as_eps_denoiser
from sample.noise import generators_from_seeds, randn_per_sample
from sample.timesteps import ddim_timesteps, ddpm_timesteps, dpm_solver_timesteps
from sample.unipc import sample_unipc

# name -> (sampler, its reference timestep spacing); see sample/timesteps.py
# (the Karras and Euler samplers derive their noise levels from the number of timesteps given).
SAMPLERS = {"ddpm": (sample_ddpm, ddpm_timesteps), "ddim": (sample_ddim, ddim_timesteps),
            "dpmpp": (sample_dpm_solver, dpm_solver_timesteps),
            "dpmpp_karras": (sample_dpm_solver_karras, karras_timesteps),
            "euler_a": (sample_euler_ancestral, euler_timesteps),
            "unipc": (sample_unipc, dpm_solver_timesteps)}


def random_pipeline(preset_name: str = "tiny", seed: int = 0, **overrides) -> StableDiffusion:
    """A StableDiffusion of a preset with every weight random, for smoke tests and CPU demos.

    The layers the reference zero-initialises (the UNet's output conv, residual-branch convs,
    transformer proj_out) get PyTorch's default init as well: with them at zero the UNet would
    predict eps = 0 for every input, and nothing downstream (guidance, control) could show an
    effect. The global RNG is left untouched; `seed` alone fixes the weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StableDiffusion(preset(preset_name, **overrides))
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.any():
                module.reset_parameters()
    return model.eval()


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _rows(values: Sequence[str] | str | None, n: int, name: str) -> list[str] | None:
    """One string per sample: a single string (or a 1-list) is repeated n times."""
    if values is None:
        return None
    values = [values] if isinstance(values, str) else list(values)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"generate: {name} has {len(values)} entries for {n} seeds (give 1 or {n})")
    return values


def _batch_rows(tensor: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """A (1, ...) tensor broadcast to n rows, or an (n, ...) tensor as is."""
    if tensor.shape[0] == n:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(n, *tensor.shape[1:])  # (1, ...) -> (n, ...)
    raise ValueError(f"generate: {name} has batch {tensor.shape[0]}, expected 1 or {n} (one per seed)")


def _row(values, i: int):
    """Sample i's entry of a per-sample argument of `generate` (shared entries are kept whole)."""
    if values is None or isinstance(values, str):
        return values
    if len(values) == 1:
        return values
    return values[i:i + 1] if isinstance(values, torch.Tensor) else [values[i]]


@torch.no_grad()
def generate(sd: StableDiffusion, prompts: Sequence[str] | str | None = None, *, seeds: Sequence[int],
             negative_prompts: Sequence[str] | str | None = None,
             cond: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
             sampler: str = "ddim", steps: int = 20, guidance: float = 7.5, eta: float = 0.0,
             height: int | None = None, width: int | None = None,
             control: nn.Module | None = None, hints: torch.Tensor | None = None,
             control_scale: float = 1.0, guess_mode: bool = False,
             control_start: float = 0.0, control_end: float = 1.0,
             dtype: torch.dtype | None = None, unet: nn.Module | None = None, vae: nn.Module | None = None,
             on_step: Callable[[], None] | None = None, progress: bool = False,
             batch_invariant: bool = False) -> torch.Tensor:
    """Generate one image per seed. Returns float32 (B, 3, H, W) in [0, 1] on the UNet's device.

    sd: the model (config, tokenizer, text encoder, schedule, prediction type; its unet and vae
        unless `unet` / `vae` are given, e.g. frozen low-precision copies during training).
    prompts: one per seed, or one for all. Or pass `cond` (and `uncond`) text contexts directly:
        (B or 1, 77, D) tensors, e.g. cached embeddings.
    negative_prompts: the unconditional prompt(s) of classifier-free guidance (default "").
    seeds: one int per sample; sample i is drawn from a CPU torch.Generator seeded with seeds[i].
    sampler: "ddpm" (ancestral), "ddim" (eta: 0 deterministic), "dpmpp" (DPM-Solver++(2M)),
        "dpmpp_karras" (the same on Karras sigmas), "euler_a" (Euler ancestral), "unipc" (UniPC bh2),
        each with the spacing of its diffusers scheduler; steps: sampler steps; guidance: CFG scale (1 = none).
    height, width: image size in pixels (default the model's native size), multiples of the VAE
        factor times the UNet's (64 for SD).
    control: a ControlNet (model/controlnet.py) and hints (B or 1, 3, H, W) drivers in [0, 1] at the
        image size; control_scale multiplies its residuals; control_start / control_end: the
        fraction of the steps the control acts on (step i of S is controlled when
        i / S >= start and (i + 1) / S <= end, as diffusers' control_guidance_start / _end);
        guess_mode uses the original's
        0.825 ** (12 - i) ramp and gives the unconditional half of CFG no control.
    dtype: None runs each network in its weights' dtype (load the model in bf16/fp16 for half
        precision); a different dtype runs them under torch.autocast (mixed precision).
    on_step: called after every denoising step (progress bars across batches); progress: the
        sampler's own tqdm bar.
    batch_invariant: run each sample through the networks on its own (bit-identical results for
        any batch size, at the cost of batching's throughput).
    """
    if batch_invariant and len(seeds) > 1:
        return torch.cat([generate(
            sd, _row(prompts, i), seeds=[seed], negative_prompts=_row(negative_prompts, i),
            cond=_row(cond, i), uncond=_row(uncond, i), sampler=sampler, steps=steps, guidance=guidance,
            eta=eta, height=height, width=width, control=control, hints=_row(hints, i),
            control_scale=control_scale, guess_mode=guess_mode, control_start=control_start,
            control_end=control_end, dtype=dtype, unet=unet, vae=vae,
            on_step=on_step, progress=progress) for i, seed in enumerate(seeds)])
    unet = sd.unet if unet is None else unet
    vae = sd.vae if vae is None else vae
    n = len(seeds)
    if n < 1:
        raise ValueError("generate: give at least one seed")
    if sampler not in SAMPLERS:
        raise ValueError(f"generate: sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"generate: eta={eta} applies to the ddim sampler only (got sampler {sampler!r})")
    height = height or sd.config.image_size
    width = width or sd.config.image_size
    vae_factor = sd.config.vae.downsample_factor
    multiple = vae_factor * sd.config.unet.downsample_factor
    if height % multiple or width % multiple:
        raise UserError(f"generate: height {height} and width {width} must be multiples of {multiple} "
                         f"(the {vae_factor}x VAE times the UNet's {sd.config.unet.downsample_factor}x)")
    device = next(unet.parameters()).device
    weights_dtype = _dtype_of(unet)
    mixed = dtype is not None and dtype != weights_dtype
    precision = torch.autocast(device_type=device.type, dtype=dtype) if mixed else contextlib.nullcontext()

    sample_fn, timesteps_fn = SAMPLERS[sampler]
    timesteps = timesteps_fn(steps)
    step_index = [0]  # denoiser calls so far = the sampler step being taken
    with precision:
        # Text contexts: (B, 77, D) rows, or (1, 77, D) shared by every sample.
        if cond is None:
            rows = _rows(prompts, n, "prompts")
            if rows is None:
                raise ValueError("generate: give prompts or a cond context")
            cond = sd.encode_prompts(rows) if len(set(rows)) > 1 else sd.encode_prompts(rows[:1])
        cond = _batch_rows(cond.to(device), n, "cond")
        if guidance != 1.0 and uncond is None:
            negatives = _rows(negative_prompts, n, "negative_prompts") or [""]
            uncond = sd.encode_prompts(negatives) if len(set(negatives)) > 1 else sd.encode_prompts(negatives[:1])
        if uncond is not None:
            uncond = uncond.to(device)

        def model_fn(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                     control: list[torch.Tensor] | None = None) -> torch.Tensor:
            if control is not None and not mixed:
                control = [r.to(weights_dtype) for r in control]
            x_in, context_in = (x, context) if mixed else (x.to(weights_dtype), context.to(weights_dtype))
            return unet(x_in, t, context_in, control=control).float()  # sampler maths in float32

        if control is not None:
            if hints is None:
                raise ValueError("generate: a control needs hints (B or 1, 3, H, W) in [0, 1]")
            if control.config.downsample_factor != vae_factor:
                raise ValueError(f"generate: the control's hint encoder downsamples {control.config.downsample_factor}x "
                                 f"but the VAE {vae_factor}x")
            if tuple(hints.shape[-2:]) != (height, width):
                raise ValueError(f"generate: hints are {tuple(hints.shape[-2:])} pixels but the images "
                                 f"{(height, width)}; resize the drivers to the image size")
            control_dtype = _dtype_of(control)
            control_net = control

            def control_fn(x, t, context, hint, **kwargs):
                if mixed:
                    return control_net(x, t, context, hint, **kwargs)
                return control_net(x.to(control_dtype), t, context.to(control_dtype), hint.to(control_dtype), **kwargs)

            hints = _batch_rows(hints.to(device=device, dtype=torch.float32), n, "hints")
            if not 0.0 <= control_start < control_end <= 1.0:
                raise ValueError(f"generate: need 0 <= control_start < control_end <= 1, got "
                                 f"{control_start} and {control_end}")

            def control_active() -> bool:  # every sampler calls the denoiser once per step
                i, total = step_index[0], len(timesteps)
                return i / total >= control_start and (i + 1) / total <= control_end

            model_fn = ControlledModel(model_fn, control_fn, hints, cond_only=guess_mode,
                                       active=None if (control_start, control_end) == (0.0, 1.0) else control_active,
                                       scale=control_scale, guess_mode=guess_mode)
        elif hints is not None:
            raise ValueError("generate: hints given without a control")

        denoiser = as_eps_denoiser(ClassifierFreeGuidance(model_fn, cond, uncond, guidance), sd.schedule,
                                   sd.prediction_type)
        inner = denoiser

        def denoiser(x: torch.Tensor, t: torch.Tensor, **level) -> torch.Tensor:
            eps = inner(x, t, **level)  # level: alpha_bar of the samplers off the table (sample/sigmas.py)
            step_index[0] += 1  # the step the control window (control_start / control_end) counts
            if on_step is not None:
                on_step()
            return eps

        generators = generators_from_seeds(seeds)  # CPU generators: the same image on every machine
        latent_shape = (n, sd.config.unet.in_channels, height // vae_factor, width // vae_factor)
        x = randn_per_sample(latent_shape, generators, device=device)  # float32 x_T
        extra = {"eta": eta} if sampler == "ddim" else {}
        latents = sample_fn(denoiser, x, sd.schedule, timesteps, generators=generators,
                            progress=progress, **extra)
        z = latents / sd.latent_scale
        images = vae.decode(z if mixed else z.to(_dtype_of(vae))).float()  # (B, 3, H, W) in [-1, 1]-ish
    return ((images + 1) / 2).clamp(0, 1)

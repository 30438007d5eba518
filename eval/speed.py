"""Speed benchmarks: our modules against the reference implementation, same weights, same process.

    python -m eval.speed unet --device cpu --dtype fp32 --batch 1 --latent 64 --repeats 3

Each benchmark is a function `bench(cfg) -> dict` registered in BENCHMARKS under a name; it
prints one line and returns its numbers (times in milliseconds, medians over `repeats` timed runs
after `warmup` untimed ones; ours and the reference alternate, so load on a shared machine hits
both alike). The reference (diffusers) is a test-only dependency: import it inside the benchmark
function, never at module level.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from defectsynth.runconfig import add_dataclass_arguments, config_from_args

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SpeedOptions:
    """Options shared by every benchmark (the flags of `python -m eval.speed <benchmark>`)."""

    device: str = field(default="cpu", metadata={"help": "where to run", "choices": ["cpu", "cuda"]})
    dtype: str = field(default="fp32", metadata={"help": "weights and activations dtype",
                                                  "choices": list(DTYPES)})
    batch: int = field(default=1, metadata={"help": "batch size"})
    latent: int = field(default=64, metadata={"help": "latent side (64 = 512 px images)"})
    repeats: int = field(default=3, metadata={"help": "timed runs per implementation (median reported)"})
    warmup: int = field(default=1, metadata={"help": "untimed runs first (allocator, kernel selection)"})
    seed: int = field(default=0, metadata={"help": "seed for the random weights and inputs"})
    clock: str = field(default="wall", metadata={
        "help": "wall: elapsed time; process: CPU time of this process (steadier on a shared CPU "
                "machine, meaningless for CUDA)", "choices": ["wall", "process"]})


@dataclass(frozen=True)
class SpeedConfig(SpeedOptions):
    benchmark: str = "unet"  # positional on the command line: one of BENCHMARKS


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(runs: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int,
              clock: str = "wall") -> dict[str, float]:
    """Median time in ms of each zero-argument callable, run in turns after warm-up.
    clock "wall" is elapsed time, "process" the CPU time of this process (all its threads)."""
    now = time.perf_counter if clock == "wall" else time.process_time
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        # Reverse the order every other repeat, so a drift in machine load does not favour one.
        order = list(runs.items()) if repeat % 2 == 0 else list(runs.items())[::-1]
        for name, fn in order:
            synchronize(device)
            start = now()
            fn()
            synchronize(device)
            times[name].append((now() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------

def bench_unet(cfg: SpeedConfig) -> dict:
    """One SD 1.5 UNet forward (random weights, 77-token context): ours vs diffusers'
    UNet2DConditionModel with the same weights (saved by diffusers, loaded by our loader)."""
    from diffusers import UNet2DConditionModel

    from model.unet import UNetConfig
    from weights import load_unet

    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    # The SD 1.5 unet/config.json values (the diffusers defaults plus these three).
    reference = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = load_unet(folder).eval()
    if ours.config != UNetConfig.sd15():
        raise RuntimeError(f"eval.speed unet: the loaded UNet is not SD 1.5: {ours.config}")
    if (device.type, dtype) != ("cpu", torch.float32):  # diffusers warns on any .to(dtype)
        reference.to(device, dtype)
        ours.to(device, dtype)

    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.batch, 4, cfg.latent, cfg.latent, generator=g).to(device, dtype)
    t = torch.full((cfg.batch,), 500, device=device)
    context = torch.randn(cfg.batch, 77, 768, generator=g).to(device, dtype)

    with torch.inference_mode():
        diff = (ours(x, t, context).float() - reference(x, t, context).sample.float()).abs().max().item()
        ms = median_ms({"ours": lambda: ours(x, t, context),
                        "reference": lambda: reference(x, t, context)},
                       cfg.device, cfg.warmup, cfg.repeats, cfg.clock)
    result = {"benchmark": "unet", "device": cfg.device, "dtype": cfg.dtype, "batch": cfg.batch,
              "latent": cfg.latent, "clock": cfg.clock, "ours_ms": ms["ours"], "reference_ms": ms["reference"],
              "ratio": ms["ours"] / ms["reference"], "max_abs_diff": diff}
    print(f"unet sd15 {cfg.device} {cfg.dtype} batch {cfg.batch} latent {cfg.latent}: "
          f"ours {ms['ours']:.1f} ms, diffusers {ms['reference']:.1f} ms, "
          f"ours/diffusers {result['ratio']:.3f} ({cfg.clock} time, median of {cfg.repeats}; "
          f"max |diff| {diff:.2e})")
    return result


# name -> (benchmark, one-line summary)
BENCHMARKS: dict[str, tuple[Callable[[SpeedConfig], dict], str]] = {
    "unet": (bench_unet, "SD 1.5 UNet forward, ours vs diffusers (same weights)"),
}


# ----------------------------------------------------------------------------------------------
# t2i: whole text-to-image generation (sample.pipeline.generate vs diffusers' StableDiffusionPipeline)
# ----------------------------------------------------------------------------------------------

T2I_STEPS, T2I_GUIDANCE, T2I_PROMPT = 20, 7.5, "an image of a sks metal surface with a crack"


def bench_t2i(cfg: SpeedConfig) -> dict:
    """Text-to-image, per image: ours (sample.pipeline.generate) vs diffusers' StableDiffusionPipeline,
    both from the same random weights: our model is written with weights.save_diffusers and diffusers
    loads that folder (its DDIM scheduler config: "leading" spacing, steps_offset 1 = our ddim_timesteps).
    DDIM, 20 steps, CFG 7.5, the same prompt, batch and per-sample CPU generators (so the same x_T).

    CPU: the tiny preset (the SD 1.5 pipeline needs minutes per image on a few cores), e.g.
        python -m eval.speed t2i --latent 8 --batch 4 --clock process
    CUDA: the SD 1.5 architecture at --latent * 8 pixels, e.g. the reference setting
        python -m eval.speed t2i --device cuda --dtype bf16 --batch 8 --latent 64 --repeats 3
    """
    from diffusers import StableDiffusionPipeline

    from sample.pipeline import generate, random_pipeline
    from weights import save_diffusers

    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
    preset_name = "sd15" if device.type == "cuda" else "tiny"
    size = cfg.latent * 8
    ours = random_pipeline(preset_name, seed=cfg.seed)  # every weight random, zero-init layers included
    with tempfile.TemporaryDirectory() as folder:
        save_diffusers(ours, folder, dtype=dtype)
        reference = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                            feature_extractor=None)
    ours.to(device=device, dtype=dtype)
    reference.to(device)
    reference.set_progress_bar_config(disable=True)
    seeds = [cfg.seed * 1000 + i for i in range(cfg.batch)]

    def run_ours() -> torch.Tensor:
        return generate(ours, T2I_PROMPT, seeds=seeds, sampler="ddim", steps=T2I_STEPS, guidance=T2I_GUIDANCE,
                        height=size, width=size)

    def run_reference() -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in seeds]  # CPU, one per sample, as ours
        return reference([T2I_PROMPT] * cfg.batch, height=size, width=size, num_inference_steps=T2I_STEPS,
                         guidance_scale=T2I_GUIDANCE, generator=generators, output_type="pt").images

    with torch.inference_mode():
        diff = (run_ours().float() - run_reference().float()).abs().max().item()  # images in [0, 1]
        ms = median_ms({"ours": run_ours, "reference": run_reference}, cfg.device, cfg.warmup, cfg.repeats,
                       cfg.clock)
    per_image = {name: value / cfg.batch for name, value in ms.items()}
    result = {"benchmark": "t2i", "preset": preset_name, "device": cfg.device, "dtype": cfg.dtype,
              "batch": cfg.batch, "size": size, "steps": T2I_STEPS, "sampler": "ddim", "clock": cfg.clock,
              "ours_ms_per_image": per_image["ours"], "reference_ms_per_image": per_image["reference"],
              "ratio": ms["ours"] / ms["reference"], "max_abs_image_diff": diff}
    print(f"t2i {preset_name} {cfg.device} {cfg.dtype} {size}x{size} batch {cfg.batch}, DDIM {T2I_STEPS} steps, "
          f"CFG {T2I_GUIDANCE}: ours {per_image['ours']:.1f} ms/image, diffusers {per_image['reference']:.1f} "
          f"ms/image, ours/diffusers {result['ratio']:.3f} ({cfg.clock} time, median of {cfg.repeats}; "
          f"max |image diff| {diff:.2e})")
    return result


BENCHMARKS["t2i"] = (bench_t2i, "text-to-image per image (tiny on CPU, SD 1.5 on CUDA), ours vs diffusers' "
                                "StableDiffusionPipeline (same weights, DDIM 20 steps, CFG 7.5)")


# ----------------------------------------------------------------------------------------------
# train-step: one training step of the UNet (train/ owns this section)
# ----------------------------------------------------------------------------------------------

# benchmark name -> (SD preset of the UNet, gradient checkpointing)
TRAIN_STEP_VARIANTS: dict[str, tuple[str, bool]] = {
    "train-step": ("sd15", False),
    "train-step-tiny": ("tiny", False),
    "train-step-ckpt": ("sd15", True),
}


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _warm_process(device: torch.device) -> None:
    """One step of a toy network with the same kinds of layers and optimizer, so that lazily
    loaded code (torch._dynamo, which the first AdamW step imports, oneDNN kernels, ...) is in
    the baseline of both implementations rather than charged to whichever loads it first."""
    from train.optim import build_adamw, optimizer_step, param_group
    from train.precision import autocast, make_grad_scaler

    conv, norm, linear = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 8)
    toy = torch.nn.ModuleList([conv, norm, linear]).to(device)
    optimizer = build_adamw([param_group("toy", toy.parameters(), lr=1e-6)])
    scaler = make_grad_scaler(SpeedConfig.dtype, device)
    with autocast(device, "fp32"):
        h = norm(conv(torch.randn(1, 4, 8, 8, device=device))).flatten(2).transpose(1, 2)  # (1, 64, 8)
        q = linear(h)[:, None]  # (1, 1, 64, 8): one head
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    scaler.scale(out.square().mean()).backward()
    optimizer_step(optimizer, scaler, list(toy.parameters()), max_grad_norm=1.0)


def train_step_child(implementation: str, preset_name: str, checkpointing: bool, options: dict) -> dict:
    """One implementation's training steps, run in a fresh process (see `bench_train_step`).

    A step: autocast forward of the UNet on (x_t, t, context), float32 MSE against the noise,
    (scaled) backward, then train.optim.optimizer_step: unscale, clip to 1.0, fused AdamW, zero_grad.
    Trainable weights are float32; cfg.dtype is the autocast precision. Returns the median step
    time and the peak memory the run added: on CUDA torch.cuda.max_memory_allocated minus what
    was allocated before the model was built; on CPU the process's peak RSS (getrusage
    ru_maxrss, which sees every allocator, torch's included) minus its RSS right before the model
    was built, i.e. after every import.
    """
    import resource

    import torch.nn.functional as F

    from model.stable_diffusion import preset
    from model.unet import UNet
    from train.optim import build_adamw, optimizer_step, param_group
    from train.precision import autocast, make_grad_scaler

    cfg = SpeedConfig(**options)
    device = torch.device(cfg.device)
    unet_config = preset(preset_name).unet
    if implementation == "reference":
        from diffusers import UNet2DConditionModel

        from weights.configs import unet_config_to_diffusers
        reference_config = {k: v for k, v in unet_config_to_diffusers(unet_config, cfg.latent).items()
                            if not k.startswith("_")}
    _warm_process(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else _rss_bytes()

    torch.manual_seed(cfg.seed)
    if implementation == "ours":
        net = UNet(unet_config).to(device).train()
        net.set_gradient_checkpointing(checkpointing)
        forward = net
    else:
        net = UNet2DConditionModel(**reference_config).to(device).train()
        if checkpointing:
            net.enable_gradient_checkpointing()
        forward = lambda x, t, context: net(x, t, encoder_hidden_states=context).sample  # noqa: E731
    params = list(net.parameters())
    optimizer = build_adamw([param_group("unet", params, lr=1e-6)])
    scaler = make_grad_scaler(cfg.dtype, device)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.batch, 4, cfg.latent, cfg.latent, generator=g).to(device)
    target = torch.randn(cfg.batch, 4, cfg.latent, cfg.latent, generator=g).to(device)
    t = torch.randint(0, 1000, (cfg.batch,), generator=g).to(device)
    context = torch.randn(cfg.batch, 77, unet_config.context_dim, generator=g).to(device)

    def step() -> None:
        with autocast(device, cfg.dtype):
            pred = forward(x, t, context)
        loss = F.mse_loss(pred.float(), target)
        scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler, params, max_grad_norm=1.0)

    ms = median_ms({"step": step}, cfg.device, cfg.warmup, cfg.repeats, cfg.clock)["step"]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss is KiB on Linux
    return {"ms": ms, "peak_bytes": peak, "params": sum(p.numel() for p in params)}


def bench_train_step(cfg: SpeedConfig, name: str = "train-step") -> dict:
    """One training step (forward, backward, clip, AdamW) of our UNet vs diffusers'
    UNet2DConditionModel at the same config, batch, latent size and precision (--dtype is the
    autocast precision; trainable weights are float32 in both, as in train/).

        python -m eval.speed train-step-tiny --batch 2 --latent 8 --repeats 20 --clock process
        python -m eval.speed train-step --batch 1 --latent 32 --repeats 3 --clock process   # ~14 GB RAM each
        python -m eval.speed train-step-ckpt --device cuda --dtype bf16 --batch 2 --latent 64 --repeats 10 --warmup 3

    Each implementation runs in its own fresh Python process, so its peak memory is its own;
    the order is ours, diffusers, diffusers, ours (medians over both runs) so that load on a
    shared machine hits both alike. A toy warm-up step runs before each baseline so that lazily
    imported code is not counted as training memory (see `_warm_process`).
    """
    import json
    import os
    import subprocess

    preset_name, checkpointing = TRAIN_STEP_VARIANTS[name]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs: dict[str, list[dict]] = {"ours": [], "reference": []}
    for implementation in ("ours", "reference", "reference", "ours"):
        code = (f"import json, sys; sys.path.insert(0, {root!r}); from eval.speed import train_step_child; "
                f"print(json.dumps(train_step_child({implementation!r}, {preset_name!r}, {checkpointing!r}, "
                f"{dict(vars(cfg))!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
        if proc.returncode != 0:
            raise RuntimeError(f"eval.speed {name}: the {implementation} process failed:\n{proc.stderr[-3000:]}")
        runs[implementation].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ours_ms = statistics.median(r["ms"] for r in runs["ours"])
    reference_ms = statistics.median(r["ms"] for r in runs["reference"])
    ours_mem = max(r["peak_bytes"] for r in runs["ours"])
    reference_mem = max(r["peak_bytes"] for r in runs["reference"])
    result = {"benchmark": name, "model": preset_name, "gradient_checkpointing": checkpointing,
              "device": cfg.device, "dtype": cfg.dtype, "batch": cfg.batch, "latent": cfg.latent,
              "params": runs["ours"][0]["params"], "reference_params": runs["reference"][0]["params"],
              "ours_ms": ours_ms, "reference_ms": reference_ms, "time_ratio": ours_ms / reference_ms,
              "ours_peak_mib": ours_mem / 2 ** 20, "reference_peak_mib": reference_mem / 2 ** 20,
              "memory_ratio": ours_mem / reference_mem}
    result["clock"] = cfg.clock
    print(f"{name} {preset_name}{' +checkpointing' if checkpointing else ''} {cfg.device} {cfg.dtype} "
          f"batch {cfg.batch} latent {cfg.latent}: ours {ours_ms:.1f} ms, diffusers {reference_ms:.1f} ms, "
          f"time ours/diffusers {result['time_ratio']:.3f} ({cfg.clock} time); peak memory ours "
          f"{result['ours_peak_mib']:.0f} MiB, diffusers {result['reference_peak_mib']:.0f} MiB, "
          f"ours/diffusers {result['memory_ratio']:.3f}")
    return result


for _name, (_preset, _checkpointing) in TRAIN_STEP_VARIANTS.items():
    BENCHMARKS[_name] = (lambda cfg, name=_name: bench_train_step(cfg, name),
                         f"one training step (forward, backward, clip, AdamW) of the {_preset} UNet"
                         f"{' with gradient checkpointing' if _checkpointing else ''}, ours vs diffusers: "
                         f"time and peak memory, each in a fresh process")


# ----------------------------------------------------------------------------------------------
# control-step: one ControlNet training step (train.condition's) vs diffusers ControlNetModel + UNet
# ----------------------------------------------------------------------------------------------

# benchmark name -> (SD preset of the UNet and its control copy, gradient checkpointing)
CONTROL_STEP_VARIANTS: dict[str, tuple[str, bool]] = {
    "control-step": ("sd15", False),
    "control-step-tiny": ("tiny", False),
    "control-step-ckpt": ("sd15", True),
}


def control_step_child(implementation: str, preset_name: str, checkpointing: bool, options: dict) -> dict:
    """One implementation's control training steps, run in a fresh process (see `bench_control_step`).

    A step, as train.condition runs it: autocast forward of the control copy on (x_t, t, context,
    hint), the frozen UNet with its residuals, float32 MSE, (scaled) backward, then
    train.optim.optimizer_step on the control's parameters (unscale, clip to 1.0, fused AdamW,
    zero_grad). The control trains in float32; the frozen UNet is stored in cfg.dtype, which is also
    the autocast precision (train.condition's --precision; diffusers' train_controlnet.py does the
    same with its weight_dtype). Memory is measured as in `train_step_child`: peak RSS (CPU) or
    peak allocated CUDA memory minus what was in use before the networks were built.
    """
    import resource

    import torch.nn.functional as F

    from model.controlnet import ControlNet, hint_widths_for
    from model.stable_diffusion import preset
    from model.unet import UNet
    from train.condition import controlled_output
    from train.optim import build_adamw, optimizer_step, param_group
    from train.precision import autocast, make_grad_scaler, precision_dtype

    cfg = SpeedConfig(**options)
    device, dtype = torch.device(cfg.device), precision_dtype(cfg.dtype)
    unet_config = preset(preset_name).unet
    if implementation == "reference":
        from diffusers import ControlNetModel, UNet2DConditionModel

        from weights.configs import unet_config_to_diffusers
        reference_config = {k: v for k, v in unet_config_to_diffusers(unet_config, cfg.latent).items()
                            if not k.startswith("_")}
    _warm_process(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else _rss_bytes()

    torch.manual_seed(cfg.seed)
    if implementation == "ours":
        unet = UNet(unet_config).to(device)
        control = ControlNet.from_unet(unet)
        unet.set_gradient_checkpointing(checkpointing)
        control.set_gradient_checkpointing(checkpointing)
        forward = lambda x, t, context, hint: controlled_output(unet, control, x, t, context, hint)  # noqa: E731
    else:
        unet = UNet2DConditionModel(**reference_config).to(device)
        control = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_widths_for(
            unet_config.model_channels)).to(device)  # from_unet builds on the CPU
        if checkpointing:
            unet.enable_gradient_checkpointing()
            control.enable_gradient_checkpointing()

        def forward(x, t, context, hint):
            down, mid = control(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
            return unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
    unet.requires_grad_(False).train()  # train(): the reference checkpoints only in training mode
    if dtype != torch.float32:
        unet.to(dtype)
    control.requires_grad_(True).train()
    params = list(control.parameters())
    optimizer = build_adamw([param_group("control", params, lr=1e-5)])
    scaler = make_grad_scaler(cfg.dtype, device)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.batch, 4, cfg.latent, cfg.latent, generator=g).to(device)
    target = torch.randn(cfg.batch, 4, cfg.latent, cfg.latent, generator=g).to(device)
    t = torch.randint(0, 1000, (cfg.batch,), generator=g).to(device)
    context = torch.randn(cfg.batch, 77, unet_config.context_dim, generator=g).to(device)
    hint = torch.rand(cfg.batch, 3, 8 * cfg.latent, 8 * cfg.latent, generator=g).to(device)

    def step() -> None:
        with autocast(device, cfg.dtype):
            pred = forward(x, t, context, hint)
        loss = F.mse_loss(pred.float(), target)
        scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler, params, max_grad_norm=1.0)

    ms = median_ms({"step": step}, cfg.device, cfg.warmup, cfg.repeats, cfg.clock)["step"]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss is KiB on Linux
    return {"ms": ms, "peak_bytes": peak, "params": sum(p.numel() for p in params)}


def bench_control_step(cfg: SpeedConfig, name: str = "control-step") -> dict:
    """One control training step (control forward, frozen UNet with the residuals, backward, clip,
    AdamW on the control) of ours (model/controlnet.py + model/unet.py, train.condition's
    `controlled_output`) vs diffusers' ControlNetModel + UNet2DConditionModel at the same config,
    batch, latent size and precision (--dtype: the frozen UNet's dtype and the autocast precision;
    the control trains in float32 in both).

        OMP_NUM_THREADS=1 python -m eval.speed control-step-tiny --batch 2 --latent 8 --repeats 20 --clock process
        OMP_NUM_THREADS=1 python -m eval.speed control-step --batch 1 --latent 32 --repeats 3 --clock process  # ~10 GB
        python -m eval.speed control-step-ckpt --device cuda --dtype bf16 --batch 4 --latent 64 --repeats 10 --warmup 3

    As `bench_train_step`: each implementation in its own fresh process (order ours, diffusers,
    diffusers, ours; medians of the times, the larger peak memory of the two runs). On a CPU machine
    that others share, one thread: with two, CPU time includes OpenMP threads spinning while their
    sibling waits for a core, and repeated runs of the same step differed by up to 5x.
    """
    import json
    import os
    import subprocess

    preset_name, checkpointing = CONTROL_STEP_VARIANTS[name]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs: dict[str, list[dict]] = {"ours": [], "reference": []}
    for implementation in ("ours", "reference", "reference", "ours"):
        code = (f"import json, sys; sys.path.insert(0, {root!r}); from eval.speed import control_step_child; "
                f"print(json.dumps(control_step_child({implementation!r}, {preset_name!r}, {checkpointing!r}, "
                f"{dict(vars(cfg))!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
        if proc.returncode != 0:
            raise RuntimeError(f"eval.speed {name}: the {implementation} process failed:\n{proc.stderr[-3000:]}")
        runs[implementation].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ours_ms = statistics.median(r["ms"] for r in runs["ours"])
    reference_ms = statistics.median(r["ms"] for r in runs["reference"])
    ours_mem = max(r["peak_bytes"] for r in runs["ours"])
    reference_mem = max(r["peak_bytes"] for r in runs["reference"])
    result = {"benchmark": name, "model": preset_name, "gradient_checkpointing": checkpointing,
              "device": cfg.device, "dtype": cfg.dtype, "batch": cfg.batch, "latent": cfg.latent,
              "control_params": runs["ours"][0]["params"], "reference_control_params": runs["reference"][0]["params"],
              "ours_ms": ours_ms, "reference_ms": reference_ms, "time_ratio": ours_ms / reference_ms,
              "ours_peak_mib": ours_mem / 2 ** 20, "reference_peak_mib": reference_mem / 2 ** 20,
              "memory_ratio": ours_mem / reference_mem, "clock": cfg.clock}
    print(f"{name} {preset_name}{' +checkpointing' if checkpointing else ''} {cfg.device} {cfg.dtype} "
          f"batch {cfg.batch} latent {cfg.latent}: ours {ours_ms:.1f} ms, diffusers {reference_ms:.1f} ms, "
          f"time ours/diffusers {result['time_ratio']:.3f} ({cfg.clock} time); peak memory ours "
          f"{result['ours_peak_mib']:.0f} MiB, diffusers {result['reference_peak_mib']:.0f} MiB, "
          f"ours/diffusers {result['memory_ratio']:.3f}")
    return result


for _name, (_preset, _checkpointing) in CONTROL_STEP_VARIANTS.items():
    BENCHMARKS[_name] = (lambda cfg, name=_name: bench_control_step(cfg, name),
                         f"one ControlNet training step (control copy + frozen {_preset} UNet, backward, clip, "
                         f"AdamW){' with gradient checkpointing' if _checkpointing else ''}, ours vs diffusers: "
                         f"time and peak memory, each in a fresh process")


# ----------------------------------------------------------------------------------------------
# synth: SADF synthesis throughput (sample.synthesize) vs diffusers' StableDiffusionControlNetPipeline
# ----------------------------------------------------------------------------------------------

SYNTH_STEPS, SYNTH_GUIDANCE, SYNTH_BATCHES = 20, 7.5, 2


def bench_synth(cfg: SpeedConfig) -> dict:
    """Images per second of SADF synthesis: ours end to end (sample.synthesize's shard loop: pairs
    built, hints rendered, sampled, guarded, PNGs and records written, all on a fresh output folder)
    and ours generate-only, vs diffusers' StableDiffusionControlNetPipeline on the same prompts,
    hints and per-sample CPU generators, with the hints already made and no files written. Both from
    the same random weights: our model and control (residual convs randomised, so the control acts)
    written with weights.save_diffusers / save_control(layout="diffusers") and loaded by diffusers.
    DPM-Solver++(2M) (diffusers' DPMSolverMultistepScheduler, "linspace" = our spacing), 20 steps,
    CFG 7.5, control scale 1; SYNTH_BATCHES batches of --batch images per timed run, on the procedural
    demo data at the image size.

    CPU: the tiny preset, e.g. python -m eval.speed synth --latent 8 --batch 4 --clock process
    CUDA: SD 1.5 at --latent * 8 pixels, e.g. the reference setting
        python -m eval.speed synth --device cuda --dtype bf16 --batch 8 --latent 64 --repeats 3
    """
    import contextlib
    import io
    from pathlib import Path

    from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline

    from data.demo import DemoConfig, make_demo_dataset
    from model.controlnet import ControlNet
    from sample.pipeline import random_pipeline
    from sample.sadf_inputs import generate_rows
    from sample.sadf_jobs import job_seed, shard_batches
    from sample.synthesize import SynthesizeConfig, prepare, synthesize_shard
    from weights import save_control, save_diffusers

    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
    preset_name = "sd15" if device.type == "cuda" else "tiny"
    size, count = cfg.latent * 8, SYNTH_BATCHES * cfg.batch
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        sd = random_pipeline(preset_name, seed=cfg.seed)
        control = ControlNet.from_unet(sd.unet)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.no_grad():  # a "trained" control: non-zero residual convs
            for m in [*control.zero_convs, control.middle_block_out, control.input_hint_block[-1]]:
                for p in m.parameters():
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        save_diffusers(sd, folder / "sd", dtype=dtype)
        save_control(control, folder / "controlnet", layout="diffusers", dtype=dtype)
        save_control(control, folder / "control.safetensors", dtype=dtype)
        del sd, control  # both implementations load from the files
        make_demo_dataset(DemoConfig(out=str(folder / "demo"), size=size, num_defective=4, num_free=2,
                                     seed=cfg.seed), progress=False)
        synth = SynthesizeConfig(ckpt=str(folder / "sd"), control=str(folder / "control.safetensors"),
                                 free=str(folder / "demo" / "free.json"),
                                 masks=str(folder / "demo" / "annotations.json"),
                                 variants=2, samples_per_driver=cfg.batch, resolution=size, steps=SYNTH_STEPS,
                                 guidance=SYNTH_GUIDANCE, batch=cfg.batch, seed=cfg.seed, dtype=cfg.dtype,
                                 device=cfg.device, max_images=count, progress=False)
        run = prepare(synth, device, dtype)
        run.run_file["models"] = {"ckpt": "bench", "control": "bench"}
        reference = StableDiffusionControlNetPipeline.from_pretrained(
            folder / "sd", controlnet=ControlNetModel.from_pretrained(folder / "controlnet", torch_dtype=dtype),
            torch_dtype=dtype, safety_checker=None, feature_extractor=None)
        reference.scheduler = DPMSolverMultistepScheduler.from_config(
            reference.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace",
            steps_offset=0)
        reference.to(device)
        reference.set_progress_bar_config(disable=True)

        batches = shard_batches(run.num_jobs, cfg.batch, samples_per_driver=cfg.batch)[:SYNTH_BATCHES]
        inputs = [[run.builder(j.pair_id) for j in batch] for batch in batches]
        seeds = [[job_seed(cfg.seed, j.pair_id, j.sample_index) for j in batch] for batch in batches]
        runs_done = [0]

        def run_ours() -> None:
            runs_done[0] += 1
            synthesize_shard(run, folder / f"out{runs_done[0]}", 0, 1, progress=False)

        def run_generate(b: int = -1) -> list[torch.Tensor]:
            chosen = range(len(batches)) if b < 0 else [b]
            return [generate_rows(run.sd, run.control, run.contexts, inputs[i], seeds[i], run.cfg, size)
                    for i in chosen]

        def run_reference(b: int = -1, output_type: str = "pil") -> list:
            chosen = range(len(batches)) if b < 0 else [b]
            out = []
            for i in chosen:
                hints = torch.stack([r.hint for r in inputs[i]])  # (B, 3, H, W) in [0, 1]
                out.append(reference([r.prompt for r in inputs[i]], image=hints.to(device, dtype), height=size,
                                     width=size, num_inference_steps=SYNTH_STEPS, guidance_scale=SYNTH_GUIDANCE,
                                     controlnet_conditioning_scale=1.0,
                                     generator=[torch.Generator().manual_seed(s) for s in seeds[i]],
                                     output_type=output_type).images)
            return out

        with torch.inference_mode(), contextlib.redirect_stdout(io.StringIO()):  # the shard loop prints a summary
            diff = (run_generate(0)[0].float().cpu() - run_reference(0, "pt")[0].float().cpu()).abs().max().item()
            ms = median_ms({"ours": run_ours, "ours_generate": run_generate, "reference": run_reference},
                           cfg.device, cfg.warmup, cfg.repeats, cfg.clock)
    per_s = {name: count / (value / 1000.0) for name, value in ms.items()}
    result = {"benchmark": "synth", "preset": preset_name, "device": cfg.device, "dtype": cfg.dtype,
              "batch": cfg.batch, "size": size, "steps": SYNTH_STEPS, "sampler": "dpmpp", "clock": cfg.clock,
              "images_per_run": count, "ours_images_per_s": per_s["ours"],
              "ours_generate_images_per_s": per_s["ours_generate"], "reference_images_per_s": per_s["reference"],
              "throughput_ratio": per_s["ours"] / per_s["reference"], "max_abs_image_diff": diff}
    print(f"synth {preset_name} {cfg.device} {cfg.dtype} {size}x{size} batch {cfg.batch}, DPM-Solver++ {SYNTH_STEPS} "
          f"steps, CFG {SYNTH_GUIDANCE}: ours {per_s['ours']:.2f} images/s end to end ({per_s['ours_generate']:.2f} "
          f"generate-only), diffusers ControlNet pipeline {per_s['reference']:.2f} images/s; ours/diffusers "
          f"throughput {result['throughput_ratio']:.3f} ({cfg.clock} time, median of {cfg.repeats} runs of {count} "
          f"images; max |image diff| {diff:.2e})")
    return result


BENCHMARKS["synth"] = (bench_synth, "SADF synthesis images/s (tiny on CPU, SD 1.5 on CUDA): sample.synthesize end "
                                    "to end vs diffusers' StableDiffusionControlNetPipeline (same weights, "
                                    "DPM-Solver++ 20 steps, CFG 7.5)")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    summary = "; ".join(f"{name}: {text}" for name, (_, text) in BENCHMARKS.items())
    parser = argparse.ArgumentParser(prog="python -m eval.speed",
                                     description=f"Speed benchmarks, ours vs the reference. {summary}")
    parser.add_argument("benchmark", choices=list(BENCHMARKS), help="which benchmark to run")
    return add_dataclass_arguments(parser, SpeedOptions)


def main(cfg: SpeedConfig) -> dict:
    if cfg.benchmark not in BENCHMARKS:
        raise ValueError(f"eval.speed: unknown benchmark {cfg.benchmark!r}; expected one of {sorted(BENCHMARKS)}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("eval.speed: --device cuda but torch.cuda.is_available() is False")
    if cfg.clock == "process" and cfg.device == "cuda":
        raise ValueError("eval.speed: --clock process measures CPU time; use --clock wall with --device cuda")
    if cfg.repeats < 1:
        raise ValueError(f"eval.speed: --repeats must be at least 1, got {cfg.repeats}")
    bench, _ = BENCHMARKS[cfg.benchmark]
    return bench(cfg)


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    main(config_from_args(SpeedConfig, args))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

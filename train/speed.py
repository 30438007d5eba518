"""Speed benchmarks of one training step: ours against diffusers, time and peak memory.

    OMP_NUM_THREADS=1 python -m train.speed train-step-tiny --batch 2 --latent 8 --repeats 20 --clock process
    OMP_NUM_THREADS=1 python -m train.speed train-step --batch 1 --latent 32 --repeats 3 --clock process   # ~14 GB RAM each
    python -m train.speed train-step-ckpt --device cuda --dtype bf16 --batch 2 --latent 64 --repeats 10 --warmup 3
    OMP_NUM_THREADS=1 python -m train.speed control-step-tiny --batch 2 --latent 8 --repeats 20 --clock process
    OMP_NUM_THREADS=1 python -m train.speed control-step --batch 1 --latent 32 --repeats 3 --clock process  # ~10 GB
    python -m train.speed control-step-ckpt --device cuda --dtype bf16 --batch 4 --latent 64 --repeats 10 --warmup 3

train-step(-tiny, -tiny-ckpt, -ckpt): one training step of the UNet (forward, backward, clip, AdamW),
ours (model/unet.py) vs diffusers' UNet2DConditionModel at the same config. control-step(-tiny,
-ckpt): one control training step (control forward, frozen UNet with the residuals, backward, clip,
AdamW on the control), ours (model/controlnet.py + model/unet.py, train.condition's
`controlled_output`) vs diffusers' ControlNetModel + UNet2DConditionModel. Same batch, latent size
and precision in both; --dtype is the autocast precision, trainable weights are float32 in both (as
in train/), and the frozen UNet of control-step is stored in --dtype.

Each implementation runs in its own fresh Python process (defectsynth.benchmark.run_in_fresh_processes),
so its peak memory is its own; the order is ours, diffusers, diffusers, ours (medians of the times,
the larger peak memory of the two runs) so that load on a shared machine hits both alike. A toy
warm-up step runs before each baseline so that lazily imported code is not counted as training
memory. On a CPU machine that others share, use one thread (OMP_NUM_THREADS=1, inherited by the
processes): with two, CPU time includes OpenMP threads spinning while their sibling waits for a
core, and repeated runs of the same step differed by up to 5x. `--results FILE` appends the result
to FILE as one JSON line. The inference benchmarks are in eval/speed.py.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from defectsynth.errors import command
from defectsynth.benchmark import (Benchmarks, SpeedConfig, benchmark_parser, compare_dtypes, config_from_argv,
                                   median_ms, memory_baseline, peak_memory_since, run_benchmark, run_in_fresh_processes,
                                   saved_activation_bytes, small_unet_config, warm_process)
from model.stable_diffusion import preset
from model.unet import UNet, UNetConfig
from sample.runtime import compile_module
from train.optim import build_adamw, optimizer_step, param_group
from train.precision import autocast, make_grad_scaler, precision_dtype

# benchmark name -> (what trains: the UNet or the control copy, SD preset of the UNet, gradient checkpointing)
STEP_VARIANTS: dict[str, tuple[str, str, bool]] = {
    "train-step": ("unet", "sd15", False),
    "train-step-tiny": ("unet", "tiny", False),
    "train-step-tiny-ckpt": ("unet", "tiny", True),
    "train-step-ckpt": ("unet", "sd15", True),
    "control-step": ("control", "sd15", False),
    "control-step-tiny": ("control", "tiny", False),
    "control-step-ckpt": ("control", "sd15", True),
}
# what trains -> (its param group's name, lr); the lr is irrelevant to speed, kept as it was measured
TRAINED: dict[str, tuple[str, float]] = {"unet": ("unet", 1e-6), "control": ("control", 1e-5)}
# A step's forward: (x_t, t, context, hint) -> the UNet's output; hint is None when only the UNet trains.
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _train_toy(toy: nn.Module, loss: torch.Tensor) -> None:
    """The warm-up's step with the benchmarks' own optimizer path (see defectsynth.benchmark.warm_process)."""
    optimizer = build_adamw([param_group("toy", toy.parameters(), lr=1e-6)])
    scaler = make_grad_scaler("fp32", loss.device)
    scaler.scale(loss).backward()
    optimizer_step(optimizer, scaler, list(toy.parameters()), max_grad_norm=1.0)


def _builder(implementation: str, trained: str, unet_config: UNetConfig, checkpointing: bool,
             cfg: SpeedConfig) -> Callable[[], tuple[list[nn.Parameter], Forward]]:
    """Import what `implementation` needs now (before the memory baseline) and return the function
    that builds its networks on cfg.device: () -> (trained parameters, forward). The networks are
    built, then checkpointing is switched on, then the UNet is frozen when the control trains."""
    device, dtype = torch.device(cfg.device), precision_dtype(cfg.dtype)
    if implementation == "ours":
        if trained == "control":
            from model.controlnet import ControlNet
            from train.condition import controlled_output

        def build() -> tuple[list[nn.Parameter], Forward]:
            unet = UNet(unet_config).to(device)
            if trained == "unet":
                unet.train().set_gradient_checkpointing(checkpointing)
                compile_module(unet, cfg.compile)
                return list(unet.parameters()), lambda x, t, context, hint: unet(x, t, context)
            control = ControlNet.from_unet(unet)
            unet.set_gradient_checkpointing(checkpointing)
            control.set_gradient_checkpointing(checkpointing)
            return _freeze_unet(unet, control, dtype), \
                lambda x, t, context, hint: controlled_output(unet, control, x, t, context, hint)
        return build

    from diffusers import UNet2DConditionModel

    from weights.configs import unet_config_to_diffusers
    if trained == "control":
        from diffusers import ControlNetModel

        from model.controlnet import hint_widths_for
    reference_config = {k: v for k, v in unet_config_to_diffusers(unet_config, cfg.latent).items()
                        if not k.startswith("_")}

    def build_reference() -> tuple[list[nn.Parameter], Forward]:
        unet = UNet2DConditionModel(**reference_config).to(device)
        if trained == "unet":
            unet.train()
            if checkpointing:
                unet.enable_gradient_checkpointing()
            compile_module(unet, cfg.compile)
            return list(unet.parameters()), \
                lambda x, t, context, hint: unet(x, t, encoder_hidden_states=context).sample
        control = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_widths_for(
            unet_config.model_channels)).to(device)  # from_unet builds on the CPU
        if checkpointing:
            unet.enable_gradient_checkpointing()
            control.enable_gradient_checkpointing()

        def forward(x, t, context, hint):
            down, mid = control(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
            return unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
        return _freeze_unet(unet, control, dtype), forward
    return build_reference


def _freeze_unet(unet: nn.Module, control: nn.Module, dtype: torch.dtype) -> list[nn.Parameter]:
    """Freeze the UNet in `dtype` (train mode: the reference checkpoints only in training mode) and
    return the control's parameters, which train in float32."""
    unet.requires_grad_(False).train()
    if dtype != torch.float32:
        unet.to(dtype)
    control.requires_grad_(True).train()
    return list(control.parameters())


def step_child(implementation: str, trained: str, preset_name: str, checkpointing: bool, options: dict) -> dict:
    """One implementation's training steps, run in a fresh process (see `bench_step`).

    A step, as train.concept / train.condition run it: autocast forward on (x_t, t, context[, hint]),
    float32 MSE against the noise, (scaled) backward, then train.optim.optimizer_step on the trained
    parameters (unscale, clip to 1.0, fused AdamW, zero_grad). Returns the median step time, the
    peak memory the run added (defectsynth.benchmark.peak_memory_since: CUDA allocations, or peak
    RSS on CPU, over what was in use right before the networks were built, i.e. after every import
    and the warm-up) and the number of trained parameters.
    """
    cfg = SpeedConfig(**options)
    device = torch.device(cfg.device)
    unet_config = preset(preset_name).unet
    build = _builder(implementation, trained, unet_config, checkpointing, cfg)
    warm_process(device, _train_toy)
    before = memory_baseline(device)
    step, params, forward, inputs = make_step(build, trained, unet_config, cfg)
    ms = median_ms({"step": step}, cfg.device, cfg.warmup, cfg.repeats, cfg.clock)["step"]
    peak = peak_memory_since(device, before)
    with autocast(device, cfg.dtype):  # after the peak was read: one more forward, its graph dropped
        saved = saved_activation_bytes(lambda: forward(*inputs), params)
    return {"ms": ms, "peak_bytes": peak, "saved_bytes": saved, "params": sum(p.numel() for p in params)}


def make_step(build: Callable[[], tuple[list[nn.Parameter], Forward]], trained: str, unet_config: UNetConfig,
              cfg: SpeedConfig) -> tuple[Callable[[], None], list[nn.Parameter], Forward, tuple]:
    """Build the networks (seeded) and the step's inputs; returns (step, trained parameters,
    forward, (x_t, t, context, hint)). A step, as train.concept / train.condition run it: autocast
    forward in cfg.dtype, float32 MSE against the noise, (scaled) backward, then
    train.optim.optimizer_step (unscale, clip to 1.0, fused AdamW, zero_grad)."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    params, forward = build()
    group, lr = TRAINED[trained]
    optimizer = build_adamw([param_group(group, params, lr=lr)])
    scaler = make_grad_scaler(cfg.dtype, device)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.batch, 4, cfg.latent, cfg.latent, generator=g).to(device)
    target = torch.randn(cfg.batch, 4, cfg.latent, cfg.latent, generator=g).to(device)
    t = torch.randint(0, 1000, (cfg.batch,), generator=g).to(device)
    context = torch.randn(cfg.batch, 77, unet_config.context_dim, generator=g).to(device)
    hint = None
    if trained == "control":  # drawn last, so x, target, t and context are those of train-step
        hint = torch.rand(cfg.batch, 3, 8 * cfg.latent, 8 * cfg.latent, generator=g).to(device)

    def step() -> None:
        with autocast(device, cfg.dtype):
            pred = forward(x, t, context, hint)
        loss = F.mse_loss(pred.float(), target)
        scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler, params, max_grad_norm=1.0)
    return step, params, forward, (x, t, context, hint)


def bench_step(cfg: SpeedConfig, name: str) -> dict:
    """The training step `name` of STEP_VARIANTS, ours vs diffusers, each in fresh processes (see the
    module docstring): prints one line and returns times, peak memory and their ratios."""
    trained, preset_name, checkpointing = STEP_VARIANTS[name]
    measured = run_in_fresh_processes(step_child, (trained, preset_name, checkpointing, dict(vars(cfg))),
                                      f"train.speed {name}")
    params_key = "params" if trained == "unet" else "control_params"
    ours_ms, reference_ms = measured.ours_ms, measured.reference_ms
    ours_mem, reference_mem = measured.ours_peak_bytes, measured.reference_peak_bytes
    result = {"benchmark": name, "model": preset_name, "gradient_checkpointing": checkpointing,
              "device": cfg.device, "dtype": cfg.dtype, "batch": cfg.batch, "latent": cfg.latent,
              params_key: measured.runs["ours"][0]["params"],
              f"reference_{params_key}": measured.runs["reference"][0]["params"],
              "ours_ms": ours_ms, "reference_ms": reference_ms, "time_ratio": ours_ms / reference_ms,
              "ours_peak_mib": ours_mem / 2 ** 20, "reference_peak_mib": reference_mem / 2 ** 20,
              "memory_ratio": ours_mem / reference_mem, "clock": cfg.clock, "compile": cfg.compile}
    ours_saved, reference_saved = (measured.runs[side][0]["saved_bytes"] for side in ("ours", "reference"))
    result.update({"ours_saved_mib": ours_saved / 2 ** 20, "reference_saved_mib": reference_saved / 2 ** 20,
                   "saved_ratio": ours_saved / reference_saved})
    print(f"{name} {preset_name}{' +checkpointing' if checkpointing else ''} {cfg.device} {cfg.dtype} "
          f"batch {cfg.batch} latent {cfg.latent}: ours {ours_ms:.1f} ms, diffusers {reference_ms:.1f} ms, "
          f"time ours/diffusers {result['time_ratio']:.3f} ({cfg.clock} time); peak memory ours "
          f"{result['ours_peak_mib']:.0f} MiB, diffusers {result['reference_peak_mib']:.0f} MiB, "
          f"ours/diffusers {result['memory_ratio']:.3f}; saved for backward ours {result['ours_saved_mib']:.1f} "
          f"MiB, diffusers {result['reference_saved_mib']:.1f} MiB, ours/diffusers {result['saved_ratio']:.3f}")
    return result


def bench_step_dtypes(cfg: SpeedConfig, trained: str) -> dict:
    """One training step of the benchmarks' small UNet (defectsynth.benchmark.small_unet_config) or of
    its control copy, ours and diffusers in every dtype of --dtypes (autocast; trainable weights
    float32, the control's frozen UNet stored in the dtype, as train/ runs them), all built in this
    process and interleaved, so load hits every variant alike (no memory figures: they share the
    process). E.g. on a CPU:
        OMP_NUM_THREADS=1 python -m train.speed train-step-dtypes --batch 4 --latent 16 --repeats 5 --clock process"""
    from dataclasses import replace

    unet_config = small_unet_config()
    runs, params = {}, {}
    for dtype in cfg.dtypes:
        side = replace(cfg, dtype=dtype)
        for impl in ("ours", "reference"):
            build = _builder(impl, trained, unet_config, False, side)
            runs[impl, dtype], trained_params, _, _ = make_step(build, trained, unet_config, side)
            params[impl] = sum(p.numel() for p in trained_params)
    name = f"{'train' if trained == 'unet' else 'control'}-step-dtypes"
    result = compare_dtypes(runs, cfg, f"{name} small UNet {cfg.device} batch {cfg.batch} latent {cfg.latent}")
    result.update({"benchmark": name, "device": cfg.device, "batch": cfg.batch, "latent": cfg.latent,
                   "params": params["ours"], "reference_params": params["reference"]})
    return result


def _summary(trained: str, preset_name: str, checkpointing: bool) -> str:
    what = (f"one training step (forward, backward, clip, AdamW) of the {preset_name} UNet" if trained == "unet" else
            f"one ControlNet training step (control copy + frozen {preset_name} UNet, backward, clip, AdamW)")
    return (f"{what}{' with gradient checkpointing' if checkpointing else ''}, ours vs diffusers: "
            f"time and peak memory, each in a fresh process")


BENCHMARKS: Benchmarks = {name: (lambda cfg, name=name: bench_step(cfg, name), _summary(*variant))
                          for name, variant in STEP_VARIANTS.items()}
BENCHMARKS["train-step-dtypes"] = (lambda cfg: bench_step_dtypes(cfg, "unet"),
                                  "small-UNet training step, ours vs diffusers in each of --dtypes, one process")
BENCHMARKS["control-step-dtypes"] = (lambda cfg: bench_step_dtypes(cfg, "control"),
                                    "small-UNet control training step, ours vs diffusers in each of --dtypes, one process")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    return benchmark_parser("train.speed", "Speed benchmarks of one training step, ours vs the reference "
                                           "(inference: python -m eval.speed).", BENCHMARKS)


def main(cfg: SpeedConfig) -> dict:
    return run_benchmark(cfg, BENCHMARKS, "train.speed")


@command("train.speed")
def cli(argv: list[str] | None = None) -> int:
    main(config_from_argv(get_args_parser(), argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

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


@dataclass(frozen=True)
class SpeedConfig(SpeedOptions):
    benchmark: str = "unet"  # positional on the command line: one of BENCHMARKS


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(runs: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time in ms of each zero-argument callable, run alternately after warm-up."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1000.0)
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
                       cfg.device, cfg.warmup, cfg.repeats)
    result = {"benchmark": "unet", "device": cfg.device, "dtype": cfg.dtype, "batch": cfg.batch,
              "latent": cfg.latent, "ours_ms": ms["ours"], "reference_ms": ms["reference"],
              "ratio": ms["ours"] / ms["reference"], "max_abs_diff": diff}
    print(f"unet sd15 {cfg.device} {cfg.dtype} batch {cfg.batch} latent {cfg.latent}: "
          f"ours {ms['ours']:.1f} ms, diffusers {ms['reference']:.1f} ms, "
          f"ours/diffusers {result['ratio']:.3f} (median of {cfg.repeats}; max |diff| {diff:.2e})")
    return result


# name -> (benchmark, one-line summary)
BENCHMARKS: dict[str, tuple[Callable[[SpeedConfig], dict], str]] = {
    "unet": (bench_unet, "SD 1.5 UNet forward, ours vs diffusers (same weights)"),
}


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

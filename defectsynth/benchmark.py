"""What the speed benchmarks share: options, timing, memory, fresh processes, the command line.

Two scripts hold the benchmarks, each on its side of the one-way imports (DESIGN.md):
`python -m eval.speed` (UNet forward, text-to-image, synthesis) and `python -m train.speed` (one
training step of the UNet or of the control copy). Both import this module, which imports neither.

A benchmark is a function `bench(cfg: SpeedConfig) -> dict` registered by name in its script's
BENCHMARKS table; it prints one line and returns its numbers (times in milliseconds, medians over
`repeats` timed runs after `warmup` untimed ones). `--results FILE` appends each result to FILE as
one JSON line, so that a batch of benchmarks (.ci/gpu) can be collected. The reference (diffusers)
is a test-only dependency: benchmarks import it inside their functions, never at module level.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from defectsynth.runconfig import add_dataclass_arguments, config_from_args

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROOT = Path(__file__).resolve().parents[1]  # the repository root: fresh processes import from here


@dataclass(frozen=True)
class SpeedOptions:
    """Options shared by every benchmark (the flags of `python -m eval.speed|train.speed <benchmark>`)."""

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
    results: str | None = field(default=None, metadata={
        "help": "append the result to this file as one JSON line (a batch of benchmarks collects there)"})
    compile: bool = field(default=False, metadata={
        "help": "unet, train-step*: torch.compile both implementations' UNet (nn.Module.compile); the warm-up runs "
                "compile, so give --warmup 2 or more"})
    dtypes: tuple[str, ...] = field(default=("fp32", "bf16"), metadata={
        "help": "the *-dtypes benchmarks: ours and diffusers in each of these dtypes, interleaved in one process "
                "(replaces --dtype)", "choices": list(DTYPES)})


@dataclass(frozen=True)
class SpeedConfig(SpeedOptions):
    benchmark: str = "unet"  # positional on the command line: one of the script's BENCHMARKS


# name -> (benchmark, one-line summary)
Benchmarks = dict[str, tuple[Callable[[SpeedConfig], dict], str]]


def small_unet_config():
    """The *-dtypes benchmarks' UNet (~11M parameters), between `tiny` (1.4M, bound by per-op overhead
    on a CPU) and SD 1.5 (860M, tens of seconds and ~14 GB per training step on a CPU), so that four
    of them (ours and diffusers, two dtypes) train side by side in one process within minutes: SD's
    block types (res blocks, cross-attention transformers, GEGLU) at 64 channels, three levels,
    attention at the lower two, 4 heads, context 32 (the tiny text encoder's width)."""
    from model.unet import UNetConfig

    return UNetConfig(model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2),
                      num_heads=4, context_dim=32, norm_groups=32)


# ----------------------------------------------------------------------------------------------
# Time and memory
# ----------------------------------------------------------------------------------------------

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


def compare_dtypes(runs: dict[tuple[str, str], Callable[[], object]], cfg: "SpeedConfig", label: str,
                   unit: str = "ms", per: float = 1.0) -> dict:
    """Time every (implementation, dtype) callable of `runs` ("ours" / "reference" x cfg.dtypes), all
    interleaved in this process (median_ms), and return {"<impl>_<dtype>_ms", "ratio_<dtype>" (ours
    / diffusers time at the same dtype), "<impl>_<low>_speedup" (fp32 time / low-dtype time),
    "load_average"}; prints one line. `per` divides the times (e.g. images per run)."""
    ms = median_ms({f"{impl}_{dtype}": fn for (impl, dtype), fn in runs.items()}, cfg.device, cfg.warmup,
                   cfg.repeats, cfg.clock)
    result: dict = {"clock": cfg.clock, "dtypes": list(cfg.dtypes), "threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()[0]}
    result.update({f"{name}_ms": value / per for name, value in ms.items()})
    parts = []
    for dtype in cfg.dtypes:
        if ("ours", dtype) in runs and ("reference", dtype) in runs:
            result[f"ratio_{dtype}"] = ms[f"ours_{dtype}"] / ms[f"reference_{dtype}"]
            parts.append(f"{dtype}: ours {ms[f'ours_{dtype}'] / per:.1f} {unit}, diffusers "
                         f"{ms[f'reference_{dtype}'] / per:.1f} {unit}, ours/diffusers {result[f'ratio_{dtype}']:.3f}")
    for impl in ("ours", "reference"):
        for dtype in cfg.dtypes:
            if dtype != "fp32" and (impl, "fp32") in runs and (impl, dtype) in runs:
                result[f"{impl}_{dtype}_speedup"] = ms[f"{impl}_fp32"] / ms[f"{impl}_{dtype}"]
                parts.append(f"{'ours' if impl == 'ours' else 'diffusers'} {dtype} speed-up "
                             f"{result[f'{impl}_{dtype}_speedup']:.2f}x")
    print(f"{label}: " + "; ".join(parts) + f" ({cfg.clock} time, median of {cfg.repeats}, "
          f"{result['threads']} thread(s), load average {result['load_average']:.1f})")
    return result


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_baseline(device: torch.device) -> int:
    """Bytes in use now, the baseline of `peak_memory_since`: allocated CUDA memory (the peak
    statistics are reset here) or this process's RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return rss_bytes()


def peak_memory_since(device: torch.device, before: int) -> int:
    """Peak bytes added since `memory_baseline` returned `before`: torch.cuda.max_memory_allocated
    on CUDA; on CPU the process's peak RSS (getrusage ru_maxrss, which sees every allocator,
    torch's included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - before
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss is KiB on Linux


def saved_activation_bytes(run: Callable[[], object], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `run()` builds its graph,
    leaving out `exclude` (the trained parameters). This is a training step's activation memory,
    exact and independent of the allocator (peak RSS on a CPU also counts allocator slack). Inside
    gradient-checkpointed regions torch's own hooks take over, so there it counts only what the
    checkpoints keep."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    del out
    return sum(saved.values())


def warm_process(device: torch.device, train_toy: Callable[[nn.Module, torch.Tensor], None]) -> None:
    """One step of a toy network with the kinds of layers the SD networks use (conv, GroupNorm,
    linear, attention), trained by `train_toy(toy, loss)` with the benchmark's own backward and
    optimizer, so that lazily loaded code (torch._dynamo, which the first AdamW step imports,
    oneDNN kernels, ...) is in the memory baseline of both implementations rather than charged to
    whichever loads it first."""
    conv, norm, linear = nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Linear(8, 8)
    toy = nn.ModuleList([conv, norm, linear]).to(device)
    h = norm(conv(torch.randn(1, 4, 8, 8, device=device))).flatten(2).transpose(1, 2)  # (1, 8, 8, 8) -> (1, 64, 8)
    q = linear(h)[:, None]  # (1, 1, 64, 8): one head
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    train_toy(toy, out.square().mean())


# ----------------------------------------------------------------------------------------------
# Each implementation in its own fresh process
# ----------------------------------------------------------------------------------------------

# ours, reference, reference, ours: load drift on a shared machine hits both alike.
PROCESS_ORDER = ("ours", "reference", "reference", "ours")


@dataclass(frozen=True)
class FreshProcessRuns:
    """What `run_in_fresh_processes` measured: medians of the runs' times, maxima of their peak
    memory, and every run's own dict (in the order each implementation ran)."""

    ours_ms: float
    reference_ms: float
    ours_peak_bytes: int
    reference_peak_bytes: int
    runs: dict[str, list[dict]]


def _importable_name(fn: Callable) -> tuple[str, str]:
    """(module, name) under which a fresh process imports `fn`; a script run as `python -m pkg.mod`
    has the module name `__main__`, and its spec has the real one."""
    module = fn.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise ValueError(f"{fn.__name__} is defined in a script run by path; run it as python -m <module>")
        module = spec.name
    return module, fn.__qualname__


def run_in_fresh_processes(child: Callable[..., dict], args: tuple, label: str) -> FreshProcessRuns:
    """Run `child(implementation, *args)` once per entry of PROCESS_ORDER, each time in a fresh
    Python process, so that an implementation's peak memory is its own and neither inherits the
    other's allocator state or loaded code.

    `child` is a module-level function returning a JSON-ready dict with at least "ms" (its step
    time) and "peak_bytes" (its peak memory); `args` are Python literals (str, int, bool, None,
    dicts of them). The process runs in the repository root with this environment (so
    OMP_NUM_THREADS and CUDA_VISIBLE_DEVICES apply); its last stdout line is the dict. A failing
    process raises RuntimeError naming `label` and the implementation, with its stderr's tail.
    """
    module, name = _importable_name(child)
    runs: dict[str, list[dict]] = {"ours": [], "reference": []}
    for implementation in PROCESS_ORDER:
        code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from {module} import {name}; "
                f"print(json.dumps({name}({implementation!r}, *{tuple(args)!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{label}: the {implementation} process failed:\n{proc.stderr[-3000:]}")
        runs[implementation].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return FreshProcessRuns(ours_ms=statistics.median(r["ms"] for r in runs["ours"]),
                            reference_ms=statistics.median(r["ms"] for r in runs["reference"]),
                            ours_peak_bytes=max(r["peak_bytes"] for r in runs["ours"]),
                            reference_peak_bytes=max(r["peak_bytes"] for r in runs["reference"]),
                            runs=runs)


# ----------------------------------------------------------------------------------------------
# Command line (both scripts)
# ----------------------------------------------------------------------------------------------

def append_result(path: str | os.PathLike, result: dict) -> None:
    """Append `result` to `path` as one JSON line (the folder is created). One write of a whole
    line, so a reader never sees half a result; a collection log, not a file replaced atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")


def benchmark_parser(prog: str, description: str, benchmarks: Benchmarks) -> argparse.ArgumentParser:
    """`prog <benchmark> [options]`: the benchmark names and summaries, then SpeedOptions' flags."""
    summary = "; ".join(f"{name}: {text}" for name, (_, text) in benchmarks.items())
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=f"{description} {summary}")
    parser.add_argument("benchmark", choices=list(benchmarks), help="which benchmark to run")
    return add_dataclass_arguments(parser, SpeedOptions)


def run_benchmark(cfg: SpeedConfig, benchmarks: Benchmarks, prog: str) -> dict:
    """Check the options, run the benchmark `cfg.benchmark` of `benchmarks`, append its result to
    `cfg.results` when set, and return it."""
    if cfg.benchmark not in benchmarks:
        raise ValueError(f"{prog}: unknown benchmark {cfg.benchmark!r}; expected one of {sorted(benchmarks)}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{prog}: --device cuda but torch.cuda.is_available() is False")
    if cfg.clock == "process" and cfg.device == "cuda":
        raise ValueError(f"{prog}: --clock process measures CPU time; use --clock wall with --device cuda")
    if cfg.repeats < 1:
        raise ValueError(f"{prog}: --repeats must be at least 1, got {cfg.repeats}")
    bench, _ = benchmarks[cfg.benchmark]
    result = bench(cfg)
    if cfg.results:
        append_result(cfg.results, result)
    return result


def config_from_argv(parser: argparse.ArgumentParser, argv: list[str] | None) -> SpeedConfig:
    return config_from_args(SpeedConfig, parser.parse_args(argv))

"""Speed benchmarks of inference: our modules against the reference implementation, same weights.

    python -m eval.speed unet --device cpu --dtype fp32 --batch 1 --latent 64 --repeats 3
    python -m eval.speed t2i --latent 8 --batch 4 --clock process --results runs/speed.jsonl

unet(-tiny): one UNet forward; t2i: text-to-image per image; synth: SADF synthesis images/s. Each
benchmark is a function `bench(cfg) -> dict` registered in BENCHMARKS under a name; it prints one
line and returns its numbers (times in milliseconds, medians over `repeats` timed runs after
`warmup` untimed ones; ours and the reference alternate, so load on a shared machine hits both
alike). `--results FILE` appends the result to FILE as one JSON line. The benchmarks of a training
step are in train/speed.py (`python -m train.speed`); the options, timing and command line both
scripts share are in defectsynth/benchmark.py. The reference (diffusers) is a test-only dependency:
import it inside the benchmark function, never at module level.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from defectsynth.errors import command
from defectsynth.benchmark import (DTYPES, Benchmarks, SpeedConfig, benchmark_parser, compare_dtypes, config_from_argv,
                                   median_ms, run_benchmark, small_unet_config)

# ----------------------------------------------------------------------------------------------
# unet: one UNet forward (ours vs diffusers' UNet2DConditionModel)
# ----------------------------------------------------------------------------------------------

# benchmark name -> SD preset of the UNet
UNET_VARIANTS: dict[str, str] = {"unet": "sd15", "unet-tiny": "tiny"}


def twin_unets(unet_config, latent: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(diffusers' UNet2DConditionModel, ours) with the same random weights: diffusers builds and
    saves its model (the config.json values of `unet_config`), our loader reads that folder back."""
    from diffusers import UNet2DConditionModel

    from weights import load_unet
    from weights.configs import unet_config_to_diffusers

    reference = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(unet_config, latent).items()
                                        if not k.startswith("_")}).eval()
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = load_unet(folder).eval()
    return reference, ours


def bench_unet(cfg: SpeedConfig, name: str = "unet") -> dict:
    """One UNet forward (random weights, 77-token context): ours vs diffusers'
    UNet2DConditionModel with the same weights (saved by diffusers, loaded by our loader).
    unet: SD 1.5; unet-tiny: the tiny preset (a parity and smoke check that runs in seconds on a CPU)."""

    from model.stable_diffusion import preset

    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
    preset_name = UNET_VARIANTS[name]
    unet_config = preset(preset_name).unet
    torch.manual_seed(cfg.seed)
    # The diffusers config.json of the preset (for sd15: SD 1.5's unet/config.json values).
    reference, ours = twin_unets(unet_config, cfg.latent)
    if ours.config != unet_config:
        raise RuntimeError(f"eval.speed {name}: the loaded UNet is not {preset_name}: {ours.config}")
    if (device.type, dtype) != ("cpu", torch.float32):  # diffusers warns on any .to(dtype)
        reference.to(device, dtype)
        ours.to(device, dtype)
    if cfg.compile:  # both sides, in place; the warm-up calls compile
        ours.compile()
        reference.compile()

    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.batch, 4, cfg.latent, cfg.latent, generator=g).to(device, dtype)
    t = torch.full((cfg.batch,), 500, device=device)
    context = torch.randn(cfg.batch, 77, unet_config.context_dim, generator=g).to(device, dtype)

    with torch.inference_mode():
        diff = (ours(x, t, context).float() - reference(x, t, context).sample.float()).abs().max().item()
        ms = median_ms({"ours": lambda: ours(x, t, context),
                        "reference": lambda: reference(x, t, context)},
                       cfg.device, cfg.warmup, cfg.repeats, cfg.clock)
    result = {"benchmark": name, "device": cfg.device, "dtype": cfg.dtype, "batch": cfg.batch,
              "latent": cfg.latent, "clock": cfg.clock, "compile": cfg.compile, "ours_ms": ms["ours"], "reference_ms": ms["reference"],
              "ratio": ms["ours"] / ms["reference"], "max_abs_diff": diff}
    print(f"unet {preset_name} {cfg.device} {cfg.dtype} batch {cfg.batch} latent {cfg.latent}: "
          f"ours {ms['ours']:.1f} ms, diffusers {ms['reference']:.1f} ms, "
          f"ours/diffusers {result['ratio']:.3f} ({cfg.clock} time, median of {cfg.repeats}; "
          f"max |diff| {diff:.2e})")
    return result


BENCHMARKS: Benchmarks = {
    _name: (lambda cfg, name=_name: bench_unet(cfg, name),
            f"{_preset} UNet forward, ours vs diffusers (same weights)")
    for _name, _preset in UNET_VARIANTS.items()}


def bench_unet_dtypes(cfg: SpeedConfig) -> dict:
    """One forward of the benchmarks' small UNet (defectsynth.benchmark.small_unet_config, random
    weights): ours and diffusers' UNet2DConditionModel with the same weights, each stored in every
    dtype of --dtypes (as sampling loads them), all interleaved in this process. E.g. on a CPU:
        python -m eval.speed unet-dtypes --batch 4 --latent 16 --repeats 5 --clock process"""
    import copy



    device = torch.device(cfg.device)
    unet_config = small_unet_config()
    torch.manual_seed(cfg.seed)
    reference, ours = twin_unets(unet_config, cfg.latent)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.batch, 4, cfg.latent, cfg.latent, generator=g).to(device)
    t = torch.full((cfg.batch,), 500, device=device)
    context = torch.randn(cfg.batch, 77, unet_config.context_dim, generator=g).to(device)
    runs = {}
    for dtype_name in cfg.dtypes:
        dtype = DTYPES[dtype_name]
        for impl, model in (("ours", ours), ("reference", reference)):
            net = copy.deepcopy(model).to(device, dtype)
            if impl == "ours":
                runs[impl, dtype_name] = lambda net=net, d=dtype: net(x.to(d), t, context.to(d))
            else:
                runs[impl, dtype_name] = lambda net=net, d=dtype: net(x.to(d), t, context.to(d)).sample
    with torch.inference_mode():
        result = compare_dtypes(runs, cfg, f"unet-dtypes small UNet {cfg.device} batch {cfg.batch} latent {cfg.latent}")
    result.update({"benchmark": "unet-dtypes", "device": cfg.device, "batch": cfg.batch, "latent": cfg.latent,
                   "params": sum(p.numel() for p in ours.parameters())})
    return result


BENCHMARKS["unet-dtypes"] = (bench_unet_dtypes, "small UNet forward, ours vs diffusers in each of --dtypes, one process")


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
        # The reference reads the folder we just wrote; local_files_only: it never goes to the network.
        reference = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                            feature_extractor=None, local_files_only=True)
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

    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
    preset_name = "sd15" if device.type == "cuda" else "tiny"
    size, count = cfg.latent * 8, SYNTH_BATCHES * cfg.batch
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        _synth_files(cfg, folder, preset_name, size, dtype)
        side = _synth_side(cfg, folder, size, dtype)
        with torch.inference_mode(), contextlib.redirect_stdout(io.StringIO()):  # the shard loop prints a summary
            diff = (side.generate(0)[0].float().cpu() - side.reference(0, "pt")[0].float().cpu()).abs().max().item()
            ms = median_ms({"ours": side.ours, "ours_generate": side.generate, "reference": side.reference},
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


class SynthSide:
    """One dtype's side of the synth benchmarks: `ours()` (sample.synthesize's shard loop end to end,
    each call into a fresh output folder), `generate(b)` (ours, the model calls only; batch b, -1:
    all) and `reference(b, output_type)` (diffusers' ControlNet pipeline on the same inputs)."""

    def __init__(self, run, pipeline, folder: Path, size: int, cfg: SpeedConfig) -> None:
        from sample.sadf_jobs import job_seed, shard_batches

        self.run, self.pipeline, self.folder, self.size, self.runs_done = run, pipeline, folder, size, 0
        batches = shard_batches(run.num_jobs, cfg.batch, samples_per_driver=cfg.batch)[:SYNTH_BATCHES]
        self.inputs = [[run.builder(j.pair_id) for j in batch] for batch in batches]
        self.seeds = [[job_seed(cfg.seed, j.pair_id, j.sample_index) for j in batch] for batch in batches]
        self.device = torch.device(cfg.device)

    def ours(self) -> None:
        from sample.synthesize import synthesize_shard

        self.runs_done += 1
        synthesize_shard(self.run, self.folder / f"out{self.runs_done}", 0, 1, progress=False)

    def generate(self, b: int = -1) -> list[torch.Tensor]:
        from sample.sadf_inputs import generate_rows

        chosen = range(len(self.inputs)) if b < 0 else [b]
        return [generate_rows(self.run.sd, self.run.control, self.run.contexts, self.inputs[i], self.seeds[i],
                              self.run.cfg, self.size) for i in chosen]

    def reference(self, b: int = -1, output_type: str = "pil") -> list:
        chosen = range(len(self.inputs)) if b < 0 else [b]
        dtype = next(self.pipeline.unet.parameters()).dtype
        out = []
        for i in chosen:
            hints = torch.stack([r.hint for r in self.inputs[i]])  # (B, 3, H, W) in [0, 1]
            out.append(self.pipeline([r.prompt for r in self.inputs[i]], image=hints.to(self.device, dtype),
                                     height=self.size, width=self.size, num_inference_steps=SYNTH_STEPS,
                                     guidance_scale=SYNTH_GUIDANCE, controlnet_conditioning_scale=1.0,
                                     generator=[torch.Generator().manual_seed(s) for s in self.seeds[i]],
                                     output_type=output_type).images)
        return out


def _synth_files(cfg: SpeedConfig, folder: Path, preset_name: str, size: int, dtype: torch.dtype,
                 **overrides) -> None:
    """Write the synth benchmarks' inputs into `folder`: a random model of the preset (with
    `overrides`) and a "trained" control (residual convs randomised, so the control acts) in our
    and diffusers' layouts, stored in `dtype`, and the procedural demo data at the image size."""
    from data.demo import DemoConfig, make_demo_dataset
    from model.controlnet import ControlNet
    from sample.pipeline import random_pipeline
    from weights import save_control, save_diffusers

    sd = random_pipeline(preset_name, seed=cfg.seed, **overrides)
    control = ControlNet.from_unet(sd.unet)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        for m in [*control.zero_convs, control.middle_block_out, control.input_hint_block[-1]]:
            for p in m.parameters():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    save_diffusers(sd, folder / "sd", dtype=dtype)
    save_control(control, folder / "controlnet", layout="diffusers", dtype=dtype)
    save_control(control, folder / "control.safetensors", dtype=dtype)
    make_demo_dataset(DemoConfig(out=str(folder / "demo"), size=size, num_defective=4, num_free=2, seed=cfg.seed),
                      progress=False)


def _synth_side(cfg: SpeedConfig, folder: Path, size: int, dtype: torch.dtype) -> SynthSide:
    """Both implementations loaded from `folder` (see _synth_files) in `dtype`."""
    from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline

    from sample.runtime import dtype_name
    from sample.synthesize import SynthesizeConfig, prepare

    device = torch.device(cfg.device)
    synth = SynthesizeConfig(ckpt=str(folder / "sd"), control=str(folder / "control.safetensors"),
                             free=str(folder / "demo" / "free.json"), masks=str(folder / "demo" / "annotations.json"),
                             variants=2, samples_per_driver=cfg.batch, resolution=size, steps=SYNTH_STEPS,
                             guidance=SYNTH_GUIDANCE, batch=cfg.batch, seed=cfg.seed, dtype=dtype_name(dtype),
                             device=cfg.device, max_images=SYNTH_BATCHES * cfg.batch, progress=False)
    run = prepare(synth, device, dtype)
    run.run_file["models"] = {"ckpt": "bench", "control": "bench"}
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(
        folder / "sd", controlnet=ControlNetModel.from_pretrained(folder / "controlnet", torch_dtype=dtype,
                                                                  local_files_only=True),
        torch_dtype=dtype, safety_checker=None, feature_extractor=None, local_files_only=True)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(
        pipeline.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace",
        steps_offset=0)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    out = folder / f"runs-{dtype_name(dtype)}"
    out.mkdir(exist_ok=True)
    return SynthSide(run, pipeline, out, size, cfg)


def bench_synth_dtypes(cfg: SpeedConfig) -> dict:
    """SADF synthesis images/s with the benchmarks' small UNet (defectsynth.benchmark.small_unet_config)
    in the tiny preset's VAE and text encoder: ours end to end (as `synth`) and diffusers' ControlNet
    pipeline, each in every dtype of --dtypes (weights stored in it, as --dtype loads them), all
    interleaved in this process. E.g. on a CPU:
        OMP_NUM_THREADS=1 python -m eval.speed synth-dtypes --batch 4 --latent 16 --repeats 3 --clock process"""
    import contextlib
    import io

    size, count = cfg.latent * 8, SYNTH_BATCHES * cfg.batch
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        _synth_files(cfg, folder, "tiny", size, torch.float32, unet=small_unet_config())
        runs = {}
        for name in cfg.dtypes:
            side = _synth_side(cfg, folder, size, DTYPES[name])
            runs["ours", name], runs["reference", name] = side.ours, side.reference
        with torch.inference_mode(), contextlib.redirect_stdout(io.StringIO()) as printed:
            result = compare_dtypes(runs, cfg, f"synth-dtypes small UNet {cfg.device} {size}x{size} batch {cfg.batch}",
                                    unit="ms/image", per=count)
        print(printed.getvalue().splitlines()[-1])
    result.update({"benchmark": "synth-dtypes", "device": cfg.device, "batch": cfg.batch, "size": size,
                   "steps": SYNTH_STEPS, "sampler": "dpmpp", "images_per_run": count})
    for key in [k for k in result if k.endswith("_ms")]:
        result[key.replace("_ms", "_images_per_s")] = 1000.0 / result[key]
    return result


BENCHMARKS["synth-dtypes"] = (bench_synth_dtypes, "small-UNet SADF synthesis images/s, ours vs diffusers' ControlNet "
                                                  "pipeline in each of --dtypes, one process")


BENCHMARKS["synth"] = (bench_synth, "SADF synthesis images/s (tiny on CPU, SD 1.5 on CUDA): sample.synthesize end "
                                    "to end vs diffusers' StableDiffusionControlNetPipeline (same weights, "
                                    "DPM-Solver++ 20 steps, CFG 7.5)")


# ----------------------------------------------------------------------------------------------
# demo-data: the procedural demo dataset (no reference to compare with)
# ----------------------------------------------------------------------------------------------

def bench_demo_data(cfg: SpeedConfig) -> dict:
    """data.demo at its default size (24 defective + 24 defect-free 512 px images and their COCO
    files): what the quick start spends before any network runs. Timed here rather than asserted in
    a test, where a loaded machine would fail it. E.g. python -m eval.speed demo-data --repeats 3"""
    from pathlib import Path

    from data.demo import DemoConfig, make_demo_dataset

    with tempfile.TemporaryDirectory() as folder:
        builds = [0]

        def build() -> None:
            builds[0] += 1
            make_demo_dataset(DemoConfig(out=str(Path(folder) / f"demo{builds[0]}"), seed=cfg.seed), progress=False)

        ms = median_ms({"demo": build}, "cpu", cfg.warmup, cfg.repeats, cfg.clock)
    result = {"benchmark": "demo-data", "clock": cfg.clock, "repeats": cfg.repeats, "demo_ms": ms["demo"]}
    print(f"demo-data: the default demo dataset (24 + 24 images, 512 px) in {ms['demo'] / 1000:.2f} s "
          f"({cfg.clock} time, median of {cfg.repeats} builds)")
    return result


BENCHMARKS["demo-data"] = (bench_demo_data, "time to build the default procedural demo dataset (data.demo)")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    return benchmark_parser("eval.speed", "Speed benchmarks of inference, ours vs the reference "
                                          "(training steps: python -m train.speed).", BENCHMARKS)


def main(cfg: SpeedConfig) -> dict:
    return run_benchmark(cfg, BENCHMARKS, "eval.speed")


@command("eval.speed")
def cli(argv: list[str] | None = None) -> int:
    main(config_from_argv(get_args_parser(), argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

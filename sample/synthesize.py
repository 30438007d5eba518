"""Synthesize the SADF dataset (paper 4.3 and 5.1): every defect-free image x N offline
augmentations, each paired with annotated masks drawn at random and perturbed, rendered as the
control's hint (the topological driver, or the inpainting hint for a control trained with
`--condition inpaint`), then k samples per hint from the tuned model + control. The masks are the
annotations, known by construction ("self-annotated defect-free", SADF).

    python -m sample.synthesize --ckpt runs/condition/base.safetensors --control runs/condition/control.safetensors \\
        --free runs/demo/free.json --masks runs/demo/annotations.json --out runs/sadf \\
        [--variants 10] [--samples-per-driver 15] [--sampler dpmpp] [--steps 20] [--guidance 7.5] [--batch-size 8]
    torchrun --nproc_per_node 4 -m sample.synthesize ...        # one shard per GPU; rank 0 writes sadf.json
    python -m sample.synthesize ... --shard 1 --num-shards 2     # manual shards (e.g. machines), then:
    python -m sample.synthesize --out runs/sadf --merge-only
    python -m sample.synthesize --out runs/sadf --regenerate 17  # image id 17 again, from its record
    python -m sample.synthesize --preset tiny --random-weights --free F --masks M --out /tmp/sadf  # smoke run

Writes, in OUT:
    synthesize.json          the run: settings that define the dataset, pairing config, hint kind, job
                             count, categories, model sha256 (a rerun with other settings is refused)
    file_hashes.json         sha256 cache of the model files (path, size, mtime)
    images/PPPPPP_SS.png     sample SS of pair PPPPPP, each written to a temporary name, then renamed
    drivers/PPPPPP.png       the hint of pair PPPPPP (--save-drivers)
    records/shard-*.jsonl    one JSON record per finished image (sample/records.py), appended per batch
    contact_sheet.png        hint | samples for the first --sheet-pairs pairs
    sadf.json                the COCO dataset, written last: masks as RLE with exact areas and boxes,
                             the annotated set's categories; every image carries condition_id (= pair
                             id), sample_index, seed, prompt, source_image and variant (eval.diversity)

The job list (sample/sadf_jobs.py) is a pure function of the settings: image id j + 1 is sample
j % k of pair j // k with seed derive_seed(seed, "synthesize", pair, sample), made in fixed batch
j // --batch-size, so shards and reruns agree and any image can be regenerated bit for bit from its
record (the record names its generate() call: rows, seeds, and its row). A rerun skips batches whose
records exist; `--max-images` stops after that many new images (whole batches) and a rerun continues.
(Recording the batch keeps batched sampling at full speed; generate(batch_invariant=True) would make
a sample independent of its batch at the cost of running the networks one sample at a time.)

"Up to k samples per driver": k = --samples-per-driver (default 15) is always attempted. A driver
has fewer only when the guard drops samples: an output that is non-finite or blank (pixel standard
deviation below --blank-std grey levels) is redrawn with a derived seed up to --retries times, then
dropped and recorded as "dropped" (counted in sadf.json's info and the summary; reruns don't retry it).

Pieces: sample/sadf_jobs.py (the job list), sample/sadf_inputs.py (condition record, datasets,
models, pair -> prompt and hint, one generate() call, the guard), sample/records.py (records,
sha256 cache, COCO assembly, contact sheet). This file: the run config, the shard loop, merging,
regeneration and the CLI.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from data.coco import save_coco
from data.files import write_image_atomic, write_json_atomic
from data.hints import HINT_KINDS
from data.images import read_image
from data.pairing import DRAW_MODES, PairingConfig, SadfPairs
from defectsynth.errors import command
from defectsynth.runconfig import config_from_args, config_from_dict, config_to_dict, parser_from_dataclass
from model.stable_diffusion import PRESETS, StableDiffusion
from sample.pipeline import SAMPLERS
from sample.records import RecordLog, assemble_coco, contact_sheet, read_records, records_path
from sample.runtime import DTYPES, batch_to_uint8, dtype_name, resolve_device, resolve_dtype
from sample.sadf_inputs import (PairInputs, PairInputsBuilder, PromptContexts, SynthesisError, batch_inputs,
                                adherence_scores, generate_rows, load_models, load_sources, model_identity,
                                reject_reasons, resolve_condition)
from sample.sadf_jobs import Job, job_seed, shard_batches

RUN_FILE, HASH_FILE, COCO_FILE, SHEET_FILE = "synthesize.json", "file_hashes.json", "sadf.json", "contact_sheet.png"


@dataclass(frozen=True)
class SynthesizeConfig:
    """Synthesize the self-annotated (SADF) COCO dataset from defect-free images and annotated masks."""

    # ---- model
    ckpt: str = field(default="", metadata={"help": "tuned SD checkpoint (single file or diffusers folder)"})
    control: str = field(default="", metadata={"help": "control (ControlNet) file or diffusers folder"})
    preset: str = field(default="tiny", metadata={"help": "architecture for --random-weights",
                                                  "choices": sorted(PRESETS)})
    random_weights: bool = field(default=False, metadata={
        "help": "random weights of --preset and a fresh zero control (smoke runs)"})
    prediction_type: str = field(default="auto", metadata={
        "help": "override the model's prediction type", "choices": ["auto", "epsilon", "v_prediction"]})
    # ---- data
    free: str = field(default="", metadata={"help": "defect-free images: a folder or a COCO json (required)"})
    masks: str = field(default="", metadata={"help": "annotated COCO json the masks are drawn from (required)"})
    out: str = field(default="", metadata={"help": "output folder (required)"})
    variants: int = field(default=10, metadata={"help": "offline augmentations per defect-free image (0: none)"})
    samples_per_driver: int = field(default=15, metadata={
        "help": "samples k per driver (fewer only when the guard drops some)"})
    resolution: int = field(default=0, metadata={
        "help": "image side in pixels, a multiple of 64 (0: the model's native size)"})
    draw: str = field(default="image", metadata={
        "help": "masks per pair: all of one annotated image, or random instances", "choices": list(DRAW_MODES)})
    instances: tuple[int, ...] = field(default=(1, 3), metadata={"help": "--draw instances: min max instances"})
    condition: str = field(default="auto", metadata={
        "help": "hint kind (auto: the control's training record, else driver)", "choices": ["auto", *HINT_KINDS]})
    identifier: str = field(default="", metadata={"help": "identifier token [V] (empty: the control's record, else sks)",
                                                  "formerly": ("token",)})
    seed: int = field(default=0, metadata={"help": "run seed (pairs, sample seeds, random weights)"})
    # ---- sampler
    sampler: str = field(default="dpmpp", metadata={"help": "sampler", "choices": sorted(SAMPLERS)})
    steps: int = field(default=20, metadata={"help": "sampler steps"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance scale (1: none)"})
    negative_prompt: str = field(default="", metadata={"help": "unconditional prompt of classifier-free guidance"})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta"})
    control_scale: float = field(default=1.0, metadata={"help": "multiplies the control residuals"})
    guess_mode: bool = field(default=False, metadata={"help": "ControlNet guess mode"})
    # ---- guard
    retries: int = field(default=2, metadata={
        "help": "redraws (derived seeds) of a non-finite or blank output before dropping it"})
    blank_std: float = field(default=2.0, metadata={
        "help": "an output whose pixel std (grey levels, 0..255) is below this is blank"})
    min_adherence: float = field(default=0.0, metadata={
        "help": "adherence gate (ours, beyond the paper): redraw (derived seeds, up to --retries) an output whose "
                "condition adherence to its own driver (data/adherence.py) is below this, then keep its best "
                "draw; every image records its score (0: off)"})
    # ---- run (these do not change the dataset)
    batch: int = field(default=8, metadata={"help": "images per generate() call", "flag": "batch_size",
                                            "formerly": ("batch",)})
    dtype: str = field(default="auto", metadata={"help": "model dtype (auto: bf16 on CUDA and on CPUs with native bf16 (AMX / AVX-512 BF16), else fp32)",
                                                 "choices": ["auto", *DTYPES]})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 (torchrun: cuda:LOCAL_RANK)"})
    save_drivers: bool = field(default=False, metadata={"help": "also write each pair's hint to OUT/drivers/"})
    shard: int = field(default=0, metadata={"help": "this process's shard (manual sharding)"})
    num_shards: int = field(default=1, metadata={"help": "manual shards (times torchrun's world size)"})
    max_images: int = field(default=0, metadata={"help": "stop after this many new images (0: all; a rerun continues)"})
    merge_only: bool = field(default=False, metadata={
        "help": "only assemble sadf.json from the records of finished shards"})
    regenerate: int = field(default=0, metadata={
        "help": "regenerate this image id from its record into OUT/regenerated/"})
    sheet_pairs: int = field(default=4, metadata={"help": "pairs (rows) in contact_sheet.png (0: none)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the UNet and the control (pays on long runs; the first batch compiles)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


# Flags that change how, not what, is made; everything else must match on a rerun.
RUN_ONLY = ("out", "batch", "device", "save_drivers", "shard", "num_shards", "max_images", "merge_only",
            "regenerate", "sheet_pairs", "compile", "progress")


@dataclass
class SynthesizeResult:
    out: Path
    coco: Path | None        # sadf.json, once every shard is finished
    generated: int = 0       # new images this process made (retries not counted)
    skipped: int = 0         # images finished by an earlier run
    retried: int = 0         # guard redraws
    dropped: int = 0         # images given up after the redraws


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a synthesis (or a regeneration) needs, resolved and validated."""
    cfg: SynthesizeConfig            # with resolution, dtype, prediction type, token resolved
    run_file: dict[str, Any]         # what synthesize.json holds
    builder: PairInputsBuilder
    num_jobs: int
    sd: StableDiffusion | None = None
    control: nn.Module | None = None
    contexts: PromptContexts | None = None


def prepare(cfg: SynthesizeConfig, device: torch.device, dtype: torch.dtype, load: bool = True,
            check_images: bool = True) -> Run:
    """Validate every input and (with `load`) load the models, before any sampling."""
    condition = resolve_condition(cfg)
    free, annotated = load_sources(cfg, check_images)
    sd, control = load_models(cfg, device, dtype, condition["only_mid_control"]) if load else (None, None)
    resolution = cfg.resolution or (sd.config.image_size if sd is not None else 0)
    try:
        pairing = PairingConfig(resolution=resolution, variants=cfg.variants, draw=cfg.draw,
                                instances=tuple(cfg.instances), driver=condition["driver"], prompt=condition["prompt"])
        pairs = SadfPairs(free, annotated, pairing, seed=cfg.seed)
    except ValueError as err:
        raise SynthesisError(f"sample.synthesize: {err}") from err
    cfg = dataclasses.replace(cfg, resolution=resolution, dtype=dtype_name(dtype),
                              identifier=condition["prompt"].token,
                              condition=condition["hint"], free=str(Path(cfg.free).resolve()),
                              masks=str(Path(cfg.masks).resolve()),
                              prediction_type=sd.prediction_type if sd is not None else cfg.prediction_type,
                              ckpt=str(Path(cfg.ckpt).resolve()) if cfg.ckpt else "",
                              control=str(Path(cfg.control).resolve()) if cfg.control else "")
    settings = {k: v for k, v in config_to_dict(cfg).items() if k not in RUN_ONLY}
    num_pairs = len(pairs)
    run_file = {"settings": settings, "pairing": config_to_dict(pairing), "hint": condition["hint"],
                "hint_reason": condition["reason"], "only_mid_control": condition["only_mid_control"],
                "num_pairs": num_pairs, "num_jobs": num_pairs * cfg.samples_per_driver,
                "categories": annotated["categories"]}
    run = Run(cfg, run_file, PairInputsBuilder(pairs, condition["hint"], annotated), run_file["num_jobs"], sd, control,
              PromptContexts(sd) if sd is not None else None)
    trained_at = (condition["record"] or {}).get("resolution")
    if load and trained_at and trained_at != resolution:
        print(f"sample.synthesize: warning: the control was trained at {trained_at} px, "
              f"synthesizing at {resolution} px")
    run.builder(0)  # one pair end to end: augmentation, perturbation, hint
    return run


def check_run_file(out: Path, run_file: dict[str, Any]) -> None:
    """Refuse an OUT made with other settings (a rerun must produce the same dataset)."""
    path = out / RUN_FILE
    if not path.exists():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    for section in ("settings", "pairing", "models", "num_jobs", "hint"):
        old, new = previous.get(section), run_file.get(section)
        if section == "settings":  # the model files are compared by content (models), not path
            old, new = ({k: v for k, v in d.items() if k not in ("ckpt", "control")} for d in (old, new))
        if old != new:
            if isinstance(old, dict) and isinstance(new, dict):
                diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
            else:
                diff = (old, new)
            raise SynthesisError(f"sample.synthesize: {out} holds a run with other {section} (was, now): {diff}; "
                                 f"use another --out, or delete it to start over")


def read_run_file(out: Path) -> dict[str, Any]:
    path = Path(out) / RUN_FILE
    if not path.is_file():
        raise SynthesisError(f"sample.synthesize: {path} not found: {out} is not a synthesis output folder")
    return json.loads(path.read_text(encoding="utf-8"))


Outcome = tuple[Job, "np.ndarray | None", dict]  # (job, uint8 (H, W, 3) image or None if dropped, record)


def run_batch(run: Run, batch: list[Job], inputs: dict[int, PairInputs]) -> tuple[list[Outcome], int]:
    """Generate one batch under the guard: rejected rows (non-finite, blank, or below the adherence
    gate --min-adherence) are redrawn together (one generate() call per attempt, each row with its
    derived seed) up to --retries times; then a row that only failed the gate keeps its best draw,
    any other is dropped. Returns the outcome of every job and the number of redraws."""
    cfg = run.cfg
    rejected: dict[int, list[dict]] = {j.index: [] for j in batch}
    done: dict[int, tuple[np.ndarray | None, dict]] = {}
    pending, attempt, redraws = list(batch), 0, 0
    best: dict[int, tuple[np.ndarray, dict]] = {}  # job -> its best draw below the adherence gate
    while pending:
        seeds = [job_seed(cfg.seed, j.pair_id, j.sample_index, attempt) for j in pending]
        images = generate_rows(run.sd, run.control, run.contexts, [inputs[j.pair_id] for j in pending], seeds, cfg,
                               cfg.resolution)
        pixels = batch_to_uint8(images)
        reasons = reject_reasons(images, pixels, cfg.blank_std)
        pixels = pixels.cpu().numpy()
        scores = adherence_scores(pixels, [inputs[j.pair_id] for j in pending], run.builder.pairs.config.driver) \
            if cfg.min_adherence > 0 else [None] * len(pending)
        call = {"rows": [[j.pair_id, j.sample_index, s] for j, s in zip(pending, seeds)]}
        still = []
        for row, (j, seed, reason, score) in enumerate(zip(pending, seeds, reasons, scores)):
            status = {"status": "ok", "seed": seed, "attempt": attempt, "call": {**call, "row": row}}
            if score is not None:
                status["adherence"] = round(score, 4)
            if reason is None and (score is None or score >= cfg.min_adherence):
                done[j.index] = (pixels[row], status)
                continue
            if reason is None:  # below the gate: remembered, the best such draw is kept if no redraw passes
                reason = f"adherence {score:.3f} < {cfg.min_adherence}"
                if j.index not in best or score > best[j.index][1]["adherence"]:
                    best[j.index] = (pixels[row], status)
            rejected[j.index].append({"seed": seed, "reason": reason})
            still.append(j)
        attempt += 1
        if still and attempt > cfg.retries:
            for j in still:
                done[j.index] = best.get(j.index, (None, {"status": "dropped"}))
            break
        redraws += len(still)
        pending = still
    sampling = {k: getattr(cfg, k) for k in ("sampler", "steps", "guidance", "eta", "negative_prompt", "control_scale",
                                             "guess_mode", "dtype", "resolution")}
    sampling["device"] = str(next(run.sd.unet.parameters()).device)
    out = []
    for j in batch:
        pixels_j, status = done[j.index]
        pair = inputs[j.pair_id]
        record = {"image_id": j.image_id, "pair_id": j.pair_id, "condition_id": j.pair_id,
                  "sample_index": j.sample_index, "prompt": pair.prompt, **pair.meta, "hint": cfg.condition,
                  "sampling": sampling, "models": run.run_file["models"], "rejected": rejected[j.index], **status}
        if pixels_j is not None:
            record.update(file_name=f"images/{j.file_stem}.png", height=cfg.resolution, width=cfg.resolution,
                          annotations=pair.annotations)
        if cfg.save_drivers:
            record["driver_file"] = f"drivers/{j.pair_id:06d}.png"
        out.append((j, pixels_j, record))
    return out, redraws


def write_batch(out: Path, log: RecordLog, results: list[Outcome], hints: dict[int, torch.Tensor]) -> None:
    """PNGs first (atomic), then the batch's records in one append: a record means a finished image."""
    for j, pixels, _ in results:
        if pixels is not None:
            write_image_atomic(out / "images" / f"{j.file_stem}.png", pixels)
    for pair_id, hint in hints.items():
        path = out / "drivers" / f"{pair_id:06d}.png"
        if not path.exists():
            write_image_atomic(path, batch_to_uint8(hint[None])[0].numpy())
    log.append([record for _, _, record in results])


def merge(out: Path, sheet_pairs: int = 4) -> Path:
    """sadf.json (and contact_sheet.png) from the records, once every image is finished."""
    out = Path(out)
    run_file = read_run_file(out)
    records = read_records(out)
    total = run_file["num_jobs"]
    missing = [i for i in range(1, total + 1) if i not in records]
    if missing:
        raise SynthesisError(f"sample.synthesize: {out}: {len(missing)} of {total} images are not finished "
                             f"(ids {missing[:5]}{' ...' if len(missing) > 5 else ''}); run the remaining shards "
                             f"(the same command), then --merge-only")
    dropped = sum(r["status"] == "dropped" for r in records.values())
    redraws = sum(len(r["rejected"]) for r in records.values())
    info = {"description": "defectsynth SADF dataset (sample.synthesize)", "images_planned": total,
            "dropped": dropped, "guard_redraws": redraws, "models": run_file["models"],
            "settings": run_file["settings"]}
    data = assemble_coco(records, run_file["categories"], out, info)
    if sheet_pairs > 0:
        write_contact_sheet(out, run_file, records, sheet_pairs)
    save_coco(data, out / COCO_FILE)
    return out / COCO_FILE


def write_contact_sheet(out: Path, run_file: dict, records: dict[int, dict], sheet_pairs: int) -> None:
    by_pair: dict[int, list[dict]] = {}
    for image_id in sorted(records):
        if records[image_id]["status"] == "ok":
            by_pair.setdefault(records[image_id]["pair_id"], []).append(records[image_id])
    chosen = sorted(by_pair)[:sheet_pairs]
    if not chosen:
        return
    cfg = config_from_dict(SynthesizeConfig, {**run_file["settings"], "out": str(out)})
    free, annotated = load_sources(cfg, check_images=False)
    pairs = SadfPairs(free, annotated, config_from_dict(PairingConfig, run_file["pairing"]), seed=cfg.seed)
    builder = PairInputsBuilder(pairs, run_file["hint"], annotated)
    columns = min(cfg.samples_per_driver, 8)
    rows = [(batch_to_uint8(builder(p).hint[None])[0].numpy(),
             [read_image(out / r["file_name"]) for r in by_pair[p][:columns]]) for p in chosen]
    write_image_atomic(out / SHEET_FILE, contact_sheet(rows, columns))


# ---------------------------------------------------------------------------------------------
# torchrun: just enough to know the rank and wait for the others (sample/ may not import train/)
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def process_group():
    """(rank, world size, local rank). Under torchrun, a gloo group used only for barriers (works
    beside any device; long timeout because shards finish at different times)."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    started = world > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", timeout=timedelta(days=1))
    try:
        yield rank, world, local
    finally:
        if started:
            dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main(cfg: SynthesizeConfig) -> SynthesizeResult | np.ndarray:
    if not cfg.out:
        raise SynthesisError("sample.synthesize: --out is required")
    out = Path(cfg.out)
    if cfg.merge_only:
        coco = merge(out, cfg.sheet_pairs)
        print(f"wrote {coco}")
        return SynthesizeResult(out, coco)
    if cfg.regenerate:
        return regenerate_cli(out, cfg.regenerate, cfg.device)
    if not cfg.random_weights and not cfg.ckpt:
        raise SynthesisError("sample.synthesize: give --ckpt (or --random-weights with --preset)")
    if not cfg.random_weights and not cfg.control:
        raise SynthesisError("sample.synthesize: give --control (a fresh zero control only with --random-weights)")
    if not cfg.free or not cfg.masks:
        raise SynthesisError("sample.synthesize: --free and --masks are required")
    for name, low in (("variants", 0), ("samples_per_driver", 1), ("batch", 1), ("steps", 1), ("retries", 0),
                      ("num_shards", 1), ("max_images", 0)):
        if getattr(cfg, name) < low:
            raise SynthesisError(f"sample.synthesize: --{name.replace('_', '-')} must be at least {low}, "
                                 f"got {getattr(cfg, name)}")
    if not 0 <= cfg.shard < cfg.num_shards:
        raise SynthesisError(f"sample.synthesize: --shard {cfg.shard} must be in 0..{cfg.num_shards - 1}")
    if not 0 <= cfg.min_adherence <= 1:
        raise SynthesisError(f"sample.synthesize: --min-adherence is an adherence score in [0, 1] (0: off), "
                             f"got {cfg.min_adherence}")
    if cfg.eta != 0.0 and cfg.sampler != "ddim":
        raise SynthesisError(f"sample.synthesize: --eta {cfg.eta} applies to --sampler ddim only")
    if len(cfg.instances) != 2:
        raise SynthesisError(f"sample.synthesize: --instances takes MIN MAX, got {list(cfg.instances)}")

    with process_group() as (rank, world, local_rank):
        device = resolve_device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        run = prepare(cfg, device, resolve_dtype(cfg.dtype, device, announce="sample.synthesize" if rank == 0 else ""))
        shard, num_shards = cfg.shard * world + rank, cfg.num_shards * world
        # Rank 0 hashes the model files (cached) and writes or checks synthesize.json; the others read it.
        if rank == 0:
            cache_path = out / HASH_FILE
            cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.exists() else {}
            run.run_file["models"] = model_identity(run.cfg, cache)
            write_json_atomic(cache_path, cache, indent=2)
            check_run_file(out, run.run_file)
            write_json_atomic(out / RUN_FILE, run.run_file, indent=2)
        barrier()
        if rank != 0:
            run.run_file["models"] = read_run_file(out)["models"]
            check_run_file(out, run.run_file)
        print(f"sample.synthesize: hint {run.run_file['hint']} ({run.run_file['hint_reason']}); "
              f"{run.run_file['num_pairs']} pairs x {cfg.samples_per_driver} samples = {run.num_jobs} images; "
              f"shard {shard} of {num_shards}")

        result = synthesize_shard(run, out, shard, num_shards, progress=cfg.progress and rank == 0)
        barrier()
        if rank == 0:
            records = read_records(out)
            finished = len(records)
            if finished == run.num_jobs and not any(r["status"] == "ok" for r in records.values()):
                # Before: a 0-image sadf.json and exit 0; the mistake surfaced in the evaluation.
                raise SynthesisError(f"sample.synthesize: all {finished} images were dropped by the guard "
                                     f"(see {out}/records): no sadf.json written; check the model and the control "
                                     f"(`defectsynth inspect`), or the guard's settings (--retries, the adherence gate)")
            if finished == run.num_jobs:
                result.coco = merge(out, cfg.sheet_pairs)
                print(f"wrote {result.coco} ({finished} images planned, {result.dropped} dropped this run)")
            else:
                print(f"{run.num_jobs - finished} images not finished yet: rerun the same command (or the other "
                      f"shards), then --merge-only")
    return result


MAX_PENDING_WRITES = 2  # finished batches waiting for the PNG writer; more waits, so memory stays bounded


def synthesize_shard(run: Run, out: Path, shard: int, num_shards: int, progress: bool = True) -> SynthesizeResult:
    """Generate this shard's unfinished batches, writing images and records as they finish."""
    cfg = run.cfg
    done = set(read_records(out))
    batches = shard_batches(run.num_jobs, cfg.batch, shard, num_shards, cfg.samples_per_driver)
    todo = [b for b in batches if any(j.image_id not in done for j in b)]
    result = SynthesizeResult(out, None, skipped=sum(j.image_id in done for b in batches for j in b))
    log = RecordLog(records_path(out, shard, num_shards))
    bar = tqdm(total=sum(j.image_id not in done for b in todo for j in b), unit="img", desc="synthesize",
               disable=not progress, dynamic_ncols=True)
    written_hints: set[int] = set()
    # Pairs for the next batch are built (CPU: augmentation, perturbation, hint) and finished images
    # are encoded and written (PNG) in two worker threads while the model samples.
    with ThreadPoolExecutor(1) as builder, ThreadPoolExecutor(1) as writer:
        next_inputs = builder.submit(batch_inputs, run.builder, todo[0]) if todo else None
        pending = []
        for n, batch in enumerate(todo):
            inputs = next_inputs.result()
            if n + 1 < len(todo):
                next_inputs = builder.submit(batch_inputs, run.builder, todo[n + 1])
            results, redraws = run_batch(run, batch, inputs)
            new = [r for r in results if r[0].image_id not in done]
            hints = {}
            if cfg.save_drivers:
                hints = {j.pair_id: inputs[j.pair_id].hint for j, _, _ in new if j.pair_id not in written_hints}
                written_hints.update(hints)
            pending.append(writer.submit(write_batch, out, log, new, hints))
            for future in [f for f in pending if f.done()]:
                future.result()  # surface write errors now
                pending.remove(future)
            while len(pending) > MAX_PENDING_WRITES:  # bounded memory: wait for the writer (a slow disk)
                pending.pop(0).result()
            result.generated += len(new)
            result.retried += redraws
            result.dropped += sum(pixels is None for _, pixels, _ in new)
            bar.update(len(new))
            bar.set_postfix(dropped=result.dropped, refresh=False)
            if cfg.max_images and result.generated >= cfg.max_images:
                break
        for future in pending:
            future.result()
    bar.close()
    print(f"shard {shard} of {num_shards}: {result.generated - result.dropped} new images written "
          f"({result.retried} guard redraws, {result.dropped} dropped), {result.skipped} already finished")
    return result


# ---------------------------------------------------------------------------------------------
# Regenerating one image
# ---------------------------------------------------------------------------------------------

def regenerate(out: str | Path, image_id: int, device: str = "auto",
               models: tuple[StableDiffusion, nn.Module] | None = None) -> np.ndarray:
    """Image `image_id` of a synthesis run made again from its record: uint8 (H, W, 3). Bit-exact on
    the machine (device, library versions) that made it: the record names its generate() call.
    `models`: (sd, control) already loaded (the run's dtype), else loaded and checked against the
    recorded sha256."""
    out = Path(out)
    run_file = read_run_file(out)
    record = read_records(out).get(int(image_id))
    if record is None:
        raise SynthesisError(f"sample.synthesize: {out} has no record of image id {image_id} "
                             f"(ids 1..{run_file['num_jobs']}; unfinished?)")
    if record["status"] != "ok":
        raise SynthesisError(f"sample.synthesize: image id {image_id} was dropped by the guard: {record['rejected']}")
    cfg = config_from_dict(SynthesizeConfig, {**run_file["settings"], "out": str(out)})
    dev = resolve_device(device)
    run = prepare(cfg, dev, DTYPES[cfg.dtype], load=models is None, check_images=False)
    if models is None:
        cache_path = out / HASH_FILE
        cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.exists() else {}
        if model_identity(cfg, cache) != run_file["models"]:
            raise SynthesisError(f"sample.synthesize: the model files changed since {out} was made "
                                 f"(sha256 {model_identity(cfg, cache)} != {run_file['models']})")
    else:
        run.sd, run.control = models
        run.contexts = PromptContexts(run.sd)
    rows = record["call"]["rows"]
    images = generate_rows(run.sd, run.control, run.contexts, [run.builder(p) for p, _, _ in rows],
                           [seed for _, _, seed in rows], run.cfg, run.cfg.resolution)
    return batch_to_uint8(images)[record["call"]["row"]].cpu().numpy()


def regenerate_cli(out: Path, image_id: int, device: str) -> np.ndarray:
    image = regenerate(out, image_id, device)
    record = read_records(out)[image_id]
    path = out / "regenerated" / Path(record["file_name"]).name
    write_image_atomic(path, image)
    stored = read_image(out / record["file_name"])
    same = np.array_equal(stored, image)
    print(f"wrote {path}: {'identical to' if same else 'differs from'} {record['file_name']}"
          + ("" if same else f" (max |diff| {np.abs(stored.astype(int) - image).max()} grey levels; another "
                             f"device or library version changes the last bits)"))
    return image


def get_args_parser():
    return parser_from_dataclass(SynthesizeConfig, prog="python -m sample.synthesize")


@command("synthesize")
def cli(argv: list[str] | None = None) -> int:
    main(config_from_args(SynthesizeConfig, get_args_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

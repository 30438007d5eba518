"""The main job, end to end: `defectsynth run` (also `python -m defectsynth.run`).

    defectsynth run                                           # the embedded demo: CPU, no downloads
    defectsynth run --ckpt weights/checkpoints/v1-5-pruned-emaonly.safetensors \\
        --data runs/mt/defects.json --free runs/mt/free.json --out runs/real
    defectsynth run --config runs/demo/run_config.json --out runs/demo2   # a saved config, new folder
    defectsynth run --print-config > my_run.json                        # the resolved config, to edit

Stages, in order (each calls the stage script's own `main(cfg)`):

    data        demo mode only: data.demo writes the annotated defect set and the defect-free images,
                and (without --ckpt) extra defect-free surfaces from another seed for the prior
    split       defectsynth.splits: the annotated set cut into train / val / test (by image, seeded,
                stratified by class) before anything trains, plus the small (10%) subset of train
                (paper sections 4, 5.1); or train / val with --test, your own test set
    prior       without --ckpt: train.prior trains the tiny prior (the stand-in for SD's general prior)
                on those surfaces (or on --free when --data is given)
    concept     train.concept: DreamBooth with prior preservation on the training split (paper 4.1)
    condition   train.condition: the control copy driven by topological drivers (paper 4.2)
    synthesize  sample.synthesize: the self-annotated SADF COCO dataset, masks from the training split
                (paper 4.3, 5.1)
    concept_small, condition_small, synthesize_small        (Tables 2, 4) the same generator and SADF
                set from the small subset of train (paper section 4: "just 120 annotated images")
    condition_inpaint, diversity_ours, diversity_inpaint    (Table 3) the inpainting-baseline control
                on the main concept, then m pairs x k samples from ours and from it, same pairs and seeds
    condition_no_concept, synthesize_no_concept             (Table 4) a control trained directly on
                the base model on the small subset (no concept phase), and its SADF set
    evaluate    eval.paper: Tables 1-4 (Mask R-CNN, diversity, FID or FD-<extractor>), every Mask R-CNN
                metric on the test split, with where each number comes from (eval/provenance.py)
    report      OUT/report.md and OUT/report.json: splits, tables with provenance, sample grids, curves,
                per-stage times (rewritten every run)
--tables picks the tables (default all four); the stages only a skipped table needs are not planned.

Modes: no --ckpt and no --data is the embedded demo (procedural data, tiny prior, settings sized
for 2 CPU cores, `demo_stage_configs`); --ckpt and --data is the real run with the stage scripts'
defaults (each script's --help says where every default comes from: this paper, the DreamBooth or
ControlNet papers, diffusers' example scripts, or our own choice). Either may be given alone:
--ckpt alone runs real SD on the demo data; --data alone trains the tiny prior on your defect-free
images.

Resuming: a stage is finished when its marker OUT/stages/<stage>.json exists (written by this
module after the stage's main returned with every output in place; it records the stage's
config and its wall time, CPU time and peak memory). A rerun of the same command skips finished
stages and calls the unfinished one again, which continues from its own progress markers
(training checkpoints with their COMPLETE marker and `--resume latest`, synthesis records and
sadf.json, Mask R-CNN phases' DONE markers). A finished stage whose config has changed since is an
error (use a new --out), never a silent mix of two runs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from data.demo import DemoConfig
from defectsynth.device import resolve_device
from defectsynth.run_report import write_report
from defectsynth.errors import UserError, command
from defectsynth.runconfig import add_dataclass_arguments, config_to_dict, load_config_json, save_config_json
from eval.paper import PaperConfig
from sample.synthesize import SynthesizeConfig
from train.concept import ConceptConfig
from train.condition import ConditionConfig
from train.prior import PriorConfig

STAGES = ("data", "split", "prior", "concept", "condition", "synthesize",
          "concept_small", "condition_small", "synthesize_small",              # Tables 2 and 4: the 10% generator
          "condition_inpaint", "diversity_ours", "diversity_inpaint",          # Table 3: the inpainting baseline
          "condition_no_concept", "synthesize_no_concept",                     # Table 4: no concept phase
          "evaluate")
STAGE_DIRS = {"data": "data", "split": "splits", "prior": "prior", "concept": "concept", "condition": "condition",
              "synthesize": "sadf", "concept_small": "concept_small", "condition_small": "condition_small",
              "synthesize_small": "sadf_small", "condition_inpaint": "condition_inpaint",
              "diversity_ours": "diversity/ours", "diversity_inpaint": "diversity/inpaint",
              "condition_no_concept": "condition_no_concept", "synthesize_no_concept": "sadf_no_concept",
              "evaluate": "eval"}
# The stages each table needs beyond data -> split -> (prior ->) concept -> condition -> synthesize.
TABLE_STAGES = {"1": (), "2": ("concept_small", "condition_small", "synthesize_small"),
                "3": ("condition_inpaint", "diversity_ours", "diversity_inpaint"),
                "4": ("concept_small", "condition_small", "synthesize_small", "condition_no_concept",
                      "synthesize_no_concept")}
TABLES = tuple(TABLE_STAGES)
# Demo only: the extra generators (10%, inpainting baseline, no concept) train this share of the
# main generator's steps, to fit the 15-minute CPU budget (ours; the report says so).
DEMO_EXTRA_STEPS = {"concept": 0.5, "condition": 0.25}
MARKERS = "stages"  # OUT/stages/<stage>.json: the run's completion marker of each stage
# Stage-config fields that may differ between a finished stage and a rerun (bookkeeping only).
BOOKKEEPING = frozenset({"progress", "resume", "device", "log_every", "checkpoint_every", "keep_last", "batch",
                         "max_images", "sheet_pairs", "save_drivers"})


class RunStopped(RuntimeError):
    """A stage stopped before finishing (signal, --max-images); rerunning the command continues it."""


# ---------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class RunFlags:
    """Run the whole pipeline: (demo data ->) (tiny prior ->) concept -> condition -> synthesis -> evaluation."""

    out: str = field(default="runs/demo", metadata={"help": "output (report) folder"})
    ckpt: str = field(default="", metadata={
        "help": "SD 1.x/2.x checkpoint (file or diffusers folder); empty: train the tiny prior (demo)"})
    data: str = field(default="", metadata={
        "help": "annotated defect images: COCO JSON (or a folder holding annotations.json); empty: the demo dataset"})
    free: str = field(default="", metadata={
        "help": "defect-free images: a folder or a COCO JSON (required with --data)"})
    resolution: int = field(default=0, metadata={
        "help": "image side for every stage, a multiple of 64 (0: 128 with the tiny prior, else --ckpt's native size)"})
    seed: int = field(default=0, metadata={"help": "run seed, passed to every stage"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda"})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads (0: one per core this process may use; -1: cores minus the 1-minute "
                "load average, at least 1, for a machine shared with other jobs)"})
    inception_weights: str = field(default="", metadata={
        "help": "pt_inception-2015-12-05-6726825d.pth for FID (else the FD column uses --feature-extractor)"})
    feature_extractor: str = field(default="", metadata={
        "help": "FD features when there is no Inception file (empty: 'pixels' for the demo; see eval.features)"})
    test: str = field(default="", metadata={
        "help": "your own held-out test COCO json (default: split off --data, see --split)"})
    split: tuple[float, ...] = field(default=(0.8, 0.1, 0.1), metadata={
        "help": "train / val / test fractions of the annotated set, split by image, seeded, stratified by class "
                "before anything trains (equal val / test halves following the paper's section 5.1; the 0.8 is ours)"})
    small_fraction: float = field(default=0.1, metadata={
        "help": "the small regime's share of train (paper: 10%%, Tables 2 and 4): ceil(f x train) images, every class"})
    tables: tuple[str, ...] = field(default=TABLES, metadata={
        "help": "the paper's tables to make (each adds its generators and syntheses)", "choices": list(TABLES)})
    stop_after: str = field(default="", metadata={
        "help": "stop after this stage (for testing resumption)", "choices": ["", *STAGES]})


@dataclass(frozen=True)
class RunConfig(RunFlags):
    """RunFlags plus every stage's settings. A None stage config takes the mode's defaults (the demo's
    for the demo, the stage script's otherwise); the saved run_config.json holds
    them resolved, so `--config` reproduces a run exactly. Paths, seed, device and resolution in the
    stage configs are always set by the run (their values in a config file are ignored)."""

    demo_data: DemoConfig | None = None
    prior_images: int = 256
    prior: PriorConfig | None = None
    concept: ConceptConfig | None = None
    condition: ConditionConfig | None = None
    synthesize: SynthesizeConfig | None = None
    evaluate: PaperConfig | None = None
    # The extra generators: the 10% concept (Tables 2, 4), and the settings shared by the three extra
    # controls (10% generator, inpainting baseline, no concept). None: the main generator's settings
    # (the demo: with DEMO_EXTRA_STEPS of its steps).
    concept_small: ConceptConfig | None = None
    condition_extra: ConditionConfig | None = None

    @property
    def demo(self) -> bool:
        return not self.ckpt and not self.data


def demo_stage_configs() -> dict[str, Any]:
    """The embedded demo's settings (ours): the pipeline's recipe, sized to finish within 15 minutes on two
    CPU cores (measured before the Tables 2-4 stages existed: 730 s wall, 1.85 GB peak; their added
    cost is estimated in docs/run.md; steps, images and evaluation cut down, see the report for
    what that means)."""
    return {
        "demo_data": DemoConfig(num_defective=48, num_free=16),
        "prior": PriorConfig(vae_steps=160, unet_steps=360, vae_batch_size=8, unet_batch_size=16, num_samples=16),
        "concept": ConceptConfig(steps=150, lr=1e-4, num_class_images=32, class_steps=25, class_guidance=3.0,
                                 class_batch_size=16, batch_size=4, checkpoint_every=50, validate_every=0,
                                 num_validation_images=8, validation_sampler_steps=20, validation_guidance=3.0),
        # lr 1e-3 (ControlNet: 1e-5): measured on this demo, adherence 0.05 -> 0.37 in 300 steps (1e-4: no change)
        "condition": ConditionConfig(steps=400, lr=1e-3, batch_size=8, checkpoint_every=100, validate_every=100,
                                     num_validation_images=8, validation_sampler_steps=20,
                                     validation_guidance=3.0),
        "synthesize": SynthesizeConfig(variants=2, samples_per_driver=3, steps=20, guidance=3.0, batch=16,
                                       sheet_pairs=6),
        # Mask R-CNN: torchvision's MaskRCNN class narrowed to learn on a CPU (ours: ResNet-18-FPN at 64
        # channels, ~4.5x cheaper per step than ResNet-50-FPN at 128 px, measured; anchors 8-128 px for
        # defects of a few pixels), 3 seeds per row for mean +- std; far too few steps to converge
        # (measured on the demo data: 600 steps reach segm mAP 0.10, blowholes only).
        "evaluate": PaperConfig(iterations=60, batch_size=2, lr=0.02, warmup_iterations=20, seeds=(0, 1, 2),
                                min_size=128, max_size=128, rois_per_image=64, detections_per_image=50,
                                backbone="resnet18", fpn_channels=64, anchor_sizes=(8, 16, 32, 64, 128),
                                checkpoint_every=30, conditions=5, per_condition=4,
                                diversity_size=128, fid_batch_size=64, kid_subsets=20),
    }


def resolve_run_config(cfg: RunConfig) -> RunConfig:
    """Check the flags and fill every None stage config with the mode's defaults."""
    if cfg.data and not cfg.free:
        raise UserError("defectsynth run: --data needs --free (the defect-free images the synthesis draws drivers from)")
    if cfg.free and not cfg.data:
        raise UserError("defectsynth run: --free without --data; the demo makes its own defect-free images")
    if cfg.stop_after and cfg.stop_after not in STAGES:
        raise UserError(f"defectsynth run: --stop-after must be one of {STAGES}, got {cfg.stop_after!r}")
    defaults = demo_stage_configs() if cfg.demo else {
        "demo_data": DemoConfig(), "prior": PriorConfig(), "concept": ConceptConfig(), "condition": ConditionConfig(),
        "synthesize": SynthesizeConfig(), "evaluate": PaperConfig()}
    if cfg.ckpt and not cfg.data:  # real SD on the demo data: the demo's data, the stage scripts' settings
        defaults["demo_data"] = demo_stage_configs()["demo_data"]
    filled = {name: getattr(cfg, name) if getattr(cfg, name) is not None else value for name, value in defaults.items()}
    scale = DEMO_EXTRA_STEPS if cfg.demo else {"concept": 1.0, "condition": 1.0}
    extra = {"concept_small": ("concept", {}),
             # the extra controls validate once, at the end (their adherence is reported, not plotted)
             "condition_extra": ("condition", {"validate_every": 0} if cfg.demo else {})}
    for name, (main, changes) in extra.items():
        if getattr(cfg, name) is None:
            base = filled[main]
            filled[name] = replace(base, steps=max(1, round(base.steps * scale[main])), **changes)
    unknown = sorted(set(cfg.tables) - set(TABLES))
    if unknown:
        raise UserError(f"defectsynth run: --tables {' '.join(unknown)}: unknown; choose from {' '.join(TABLES)}")
    from defectsynth.splits import check_fractions
    try:
        check_fractions(tuple(cfg.split))
    except ValueError as err:
        raise UserError(str(err)) from None
    if not 0 < cfg.small_fraction <= 1:
        raise UserError(f"defectsynth run: --small-fraction must be in (0, 1], got {cfg.small_fraction}")
    resolution = cfg.resolution or (128 if not cfg.ckpt else 0)
    return replace(cfg, resolution=resolution, tables=tuple(t for t in TABLES if t in cfg.tables),
                   split=tuple(cfg.split), **filled)


# ----------------------------------------------------------------------------------------- stages

@dataclass
class Stage:
    """One stage of the plan: its folder, the config its main gets, what it must leave behind."""
    name: str
    folder: Path
    config: Any
    run: Callable[[], Any]
    outputs: list[Path]


def resolved_device(device: str) -> str:
    """--device as every stage gets it ("auto" -> cuda if available, else cpu; defectsynth/device.py)."""
    return str(resolve_device(device))


def plan(cfg: RunConfig) -> list[Stage]:
    """Every stage with its wired config (paths from one stage to the next, seed, device, resolution).

    The annotated set is split before anything trains (the split stage); the generators, the
    synthesis mask banks and every Mask R-CNN training phase see the training split only, and every
    Mask R-CNN metric is computed on the test split (paper sections 4 and 5.1)."""
    out = Path(cfg.out)
    folder = {name: out / sub for name, sub in STAGE_DIRS.items()}
    stages, annotated, free, prior_source = _data_stages(cfg, folder)
    splits = {name: folder["split"] / f"{name}.json" for name in ("train", "val", "test", "train_small",
                                                                  "free_diversity")}
    from defectsynth.splits import SplitConfig, make_splits
    split = SplitConfig(data=str(annotated), free=str(free), out=str(folder["split"]), listing=str(out / "splits.json"),
                        fractions=tuple(cfg.split), test=cfg.test, small_fraction=cfg.small_fraction,
                        diversity_conditions=cfg.evaluate.conditions, seed=cfg.seed)
    stages.append(Stage("split", folder["split"], split, lambda split=split: make_splits(split),
                        [*splits.values(), out / "splits.json"]))

    device = resolved_device(cfg.device)
    if not cfg.ckpt:
        caption = cfg.concept.prompt_template.format(cfg.concept.class_noun)  # the prior knows the class prompt
        prior = replace(cfg.prior, data=str(prior_source), out=str(folder["prior"]), resolution=cfg.resolution,
                        caption=caption, eval_data=str(splits["test"]), seed=cfg.seed, device=device,
                        resume="latest")
        stages.append(Stage("prior", folder["prior"], prior, _call("train.prior", prior),
                            [folder["prior"] / "prior.safetensors"]))
        base = folder["prior"] / "prior.safetensors"
    else:
        base = Path(cfg.ckpt)
    common = dict(resolution=cfg.resolution, seed=cfg.seed, device=device)
    needed = {name for t in cfg.tables for name in TABLE_STAGES[t]}

    def generator(suffix: str, concept_cfg: ConceptConfig | None, condition_cfg: ConditionConfig, data: Path,
                  condition: str = "driver", tuned: Path | None = None) -> None:
        """concept<suffix> (unless `tuned` is given) and condition<suffix>, trained on `data`."""
        if tuned is None:
            concept = replace(concept_cfg, ckpt=str(base), random_weights=False, data=str(data),
                              out=str(folder["concept" + suffix]), resume="latest", **common)
            if suffix:  # the class images depend on the base model and seed only: drawn once, shared
                concept = replace(concept, class_dir=str(folder["concept"] / "class_images"))
            stages.append(Stage("concept" + suffix, folder["concept" + suffix], concept,
                                _call("train.concept", concept), [folder["concept" + suffix] / "concept.safetensors"]))
            tuned = folder["concept" + suffix] / "concept.safetensors"
        name = "condition" + suffix
        control = replace(condition_cfg, ckpt=str(tuned), random_weights=False, data=str(data), out=str(folder[name]),
                          identifier=cfg.concept.identifier, condition=condition, validation_data=str(splits["val"]),
                          resume="latest", **common)
        stages.append(Stage(name, folder[name], control, _call("train.condition", control),
                            [folder[name] / "control.safetensors", folder[name] / "base.safetensors"]))

    def synthesis(name: str, control_stage: str, masks: Path, free_images: Path, **changes: Any) -> None:
        sy = replace(cfg.synthesize, ckpt=str(folder[control_stage] / "base.safetensors"),
                     control=str(folder[control_stage] / "control.safetensors"), random_weights=False,
                     free=str(free_images), masks=str(masks), out=str(folder[name]), **common, **changes)
        stages.append(Stage(name, folder[name], sy, _call("sample.synthesize", sy), [folder[name] / "sadf.json"]))

    generator("", cfg.concept, cfg.condition, splits["train"])
    synthesis("synthesize", "condition", splits["train"], free)
    if "concept_small" in needed:  # Tables 2 and 4: a generator trained on the small subset of train
        generator("_small", cfg.concept_small, cfg.condition_extra, splits["train_small"])
        synthesis("synthesize_small", "condition_small", splits["train_small"], free)
    if "condition_inpaint" in needed:  # Table 3: the inpainting baseline, same pairs and seeds as ours
        generator("_inpaint", None, cfg.condition_extra, splits["train"], condition="inpaint",
                  tuned=folder["concept"] / "concept.safetensors")
        k = cfg.evaluate.per_condition
        synthesis("diversity_ours", "condition", splits["train"], splits["free_diversity"], variants=1,
                  samples_per_driver=k)
        synthesis("diversity_inpaint", "condition_inpaint", splits["train"], splits["free_diversity"], variants=1,
                  samples_per_driver=k)
    if "condition_no_concept" in needed:  # Table 4: the control trained on the base model itself
        generator("_no_concept", None, cfg.condition_extra, splits["train_small"], tuned=base)
        synthesis("synthesize_no_concept", "condition_no_concept", splits["train_small"], free)
    stages.append(_evaluate_stage(cfg, folder, splits, device, needed))
    return stages


def _data_stages(cfg: RunConfig, folder: dict[str, Path]) -> tuple[list[Stage], Path, Path, Path | None]:
    """The demo's data stage (when there is no --data): (stages, annotated COCO, defect-free images,
    the prior's training images or None with --ckpt)."""
    if cfg.demo or not cfg.data:
        demo = replace(cfg.demo_data, out=str(folder["data"]), seed=cfg.seed)
        annotated, free = folder["data"] / "annotations.json", folder["data"] / "free.json"
    else:
        demo = None
        data = Path(cfg.data)
        annotated, free = (data / "annotations.json" if data.is_dir() else data), Path(cfg.free)
    prior_source = None
    if not cfg.ckpt:
        prior_source = folder["data"] / "prior_surfaces" / "free.json" if demo is not None else free
    if demo is None:
        return [], annotated, free, prior_source
    surfaces = None
    if not cfg.ckpt:
        # Generic surfaces from another seed, without defects: the prior never sees the annotated set.
        surfaces = replace(demo, out=str(folder["data"] / "prior_surfaces"), seed=cfg.seed + 1000,
                           num_defective=0, num_free=cfg.prior_images)

    def make_data(demo=demo, surfaces=surfaces):
        from data.demo import make_demo_dataset
        make_demo_dataset(demo)
        if surfaces is not None:
            make_demo_dataset(surfaces)
    outputs = [annotated, free] + ([Path(surfaces.out) / "free.json"] if surfaces else [])
    return ([Stage("data", folder["data"], {"demo": demo, "prior_surfaces": surfaces}, make_data, outputs)],
            annotated, free, prior_source)


def _evaluate_stage(cfg: RunConfig, folder: dict[str, Path], splits: dict[str, Path], device: str,
                    needed: set[str]) -> Stage:
    """eval.paper on the held-out test split: Table 1 from the main generator, Table 2 from the small
    one (Mask R-CNN's real data: the same small subset), Table 3 from the two m x k sample sets,
    Table 4 from the small generator with and without the concept phase and the main one; every FID
    against the training split."""
    extractor = "inception" if cfg.inception_weights else (cfg.feature_extractor or ("pixels" if cfg.demo else "inception"))
    sadf = {name: str(folder[name] / "sadf.json") for name in
            ("synthesize", "synthesize_small", "diversity_ours", "diversity_inpaint", "synthesize_no_concept")}
    has = lambda name: sadf[name] if name in needed else None  # noqa: E731
    evaluate = replace(cfg.evaluate, data=str(splits["train"]), test=str(splits["test"]),
                       data_small=str(splits["train_small"]), synthetic=sadf["synthesize"],
                       synthetic_small=has("synthesize_small"), diversity_samples=has("diversity_ours"),
                       baseline=has("diversity_inpaint"), synthetic_no_concept=has("synthesize_no_concept"),
                       fid_reference=str(splits["train"]), real_fraction=cfg.small_fraction, tables=tuple(cfg.tables),
                       out=str(folder["evaluate"]), seed=cfg.seed, device=device, feature_extractor=extractor,
                       inception_weights=cfg.inception_weights or None)
    return Stage("evaluate", folder["evaluate"], evaluate, _call("eval.paper", evaluate),
                 [folder["evaluate"] / "report.json"])


def _call(module: str, config: Any) -> Callable[[], Any]:
    """`module.main(config)`, imported when the stage runs."""
    def run():
        import importlib
        return importlib.import_module(module).main(config)
    return run


def stage_stopped(result: Any) -> bool:
    """Training results carry `stopped` (a signal saved a checkpoint and ended the loop)."""
    return bool(getattr(result, "stopped", False))


# ------------------------------------------------------------------------------- markers, timing

def marker_path(out: Path, stage: str) -> Path:
    return out / MARKERS / f"{stage}.json"


def comparable(config: Any) -> dict[str, Any]:
    """A stage config as a dict without the bookkeeping fields (for the changed-config check)."""
    data = config_to_dict(config)
    if isinstance(data, dict) and all(isinstance(v, dict) or v is None for v in data.values()):
        return {k: comparable_dict(v) for k, v in data.items()}  # the data stage: two DemoConfigs
    return comparable_dict(data)


def comparable_dict(data: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if data is None else {k: v for k, v in data.items() if k not in BOOKKEEPING}


def finished(stage: Stage, out: Path) -> bool:
    """True when the stage's marker exists and its outputs are in place; an error when the stage
    finished with another config."""
    path = marker_path(out, stage.name)
    if not path.is_file():
        return False
    marker = json.loads(path.read_text(encoding="utf-8"))
    before, now = marker.get("config"), comparable(stage.config)
    if before != now:
        changed = sorted(k for k in set(before or {}) | set(now or {}) if (before or {}).get(k) != (now or {}).get(k))
        raise UserError(f"defectsynth run: stage {stage.name!r} in {out} finished with other settings "
                         f"(changed: {', '.join(changed)}); use a new --out, or delete {stage.folder} "
                         f"and the stages after it")
    missing = [str(p) for p in stage.outputs if not p.exists()]
    if missing:
        print(f"defectsynth run: stage {stage.name} has a marker but lacks {missing}; running it again")
        return False
    return True


def reset_peak_memory() -> None:
    """Restart the kernel's peak-RSS counter of this process (Linux: VmHWM), so each stage's peak
    is its own. Elsewhere the peak is the process's so far."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    """Peak resident memory since the last reset (VmHWM), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log_event(out: Path, record: dict[str, Any]) -> None:
    """Append one line to OUT/run_log.jsonl (every stage attempt: ran / skipped / failed, times)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "run_log.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports it, else all)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pick_threads(requested: int) -> int:
    """Torch CPU threads: `requested` (> 0); 0, the default: one per usable core; -1: the idle cores,
    i.e. cores minus the 1-minute load average (at least 1), for a machine shared with other jobs,
    where extra threads only wait on each other (measured: a tiny VAE step 10x slower with 2
    threads than with 1 at load 7 on 2 cores). Not the default: the load a fresh install leaves
    behind made it pick 1 of 2 idle cores in the README's first command."""
    if requested > 0:
        return requested
    cores = usable_cores()
    if requested == 0:
        return cores
    if requested != -1:
        raise ValueError(f"defectsynth run: --threads must be a positive count, 0 (one per core) or -1 "
                         f"(cores minus the load average), got {requested}")
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(cores, int(round(cores - load))))


# ------------------------------------------------------------------------------------------ main

@dataclass
class RunResult:
    out: Path
    ran: list[str]
    skipped: list[str]
    stopped_after: str | None
    report: Path | None


def main(cfg: RunConfig) -> RunResult:
    cfg = resolve_run_config(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = plan(cfg)
    # Which stages are finished (an error if one finished with other settings), checked before
    # anything runs or is written; a finished stage after an unfinished one would mix two runs.
    done = {stage.name: finished(stage, out) for stage in stages}
    for i, stage in enumerate(stages):
        later = [s.name for s in stages[i + 1:] if done[s.name]]
        if not done[stage.name] and later:
            raise UserError(f"defectsynth run: stage {stage.name!r} must run again, but the later stage(s) "
                             f"{later} finished from its old outputs; delete their folders and markers "
                             f"({', '.join(str(s.folder) for s in stages[i + 1:])}, {out / MARKERS}/<stage>.json) "
                             f"or use a new --out")
    threads = pick_threads(cfg.threads)
    torch.set_num_threads(threads)
    save_config_json(cfg, out / "run_config.json", provenance=True)
    mode = "demo (procedural data, tiny prior)" if cfg.demo else f"real (--ckpt {cfg.ckpt or 'tiny prior'})"
    print(f"defectsynth run: {mode} -> {out}; {threads} torch thread(s); load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    ran, skipped, stopped_after = [], [], None
    started = time.perf_counter()
    for stage in stages:
        if done[stage.name]:
            skipped.append(stage.name)
            log_event(out, {"stage": stage.name, "event": "skipped", "time": _now()})
            print(f"defectsynth run: [{stage.name}] finished earlier, skipped")
        else:
            print(f"defectsynth run: [{stage.name}] running -> {stage.folder}")
            stage.folder.mkdir(parents=True, exist_ok=True)
            gc.collect()
            reset_peak_memory()
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                result = stage.run()
            except BaseException as err:
                log_event(out, {"stage": stage.name, "event": "failed", "time": _now(),
                                "seconds": time.perf_counter() - wall, "error": repr(err)[:500]})
                raise
            seconds, cpu_seconds, peak = time.perf_counter() - wall, time.process_time() - cpu, peak_memory_mb()
            missing = [str(p) for p in stage.outputs if not p.exists()]
            if stage_stopped(result) or missing:
                log_event(out, {"stage": stage.name, "event": "stopped", "time": _now(), "seconds": seconds})
                raise RunStopped(f"defectsynth run: stage {stage.name} stopped before finishing"
                                 + (f" (missing {missing})" if missing else "") + "; rerun the same command to continue")
            del result
            record = {"stage": stage.name, "completed": _now(), "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "peak_rss_mb": peak, "threads": threads, "load_average": os.getloadavg()[0],
                      "outputs": [str(p) for p in stage.outputs], "config": comparable(stage.config)}
            marker_path(out, stage.name).parent.mkdir(parents=True, exist_ok=True)
            write_json(marker_path(out, stage.name), record)  # the stage's completion marker, written last
            log_event(out, {"stage": stage.name, "event": "ran", "time": _now(), "seconds": seconds,
                            "cpu_seconds": cpu_seconds, "peak_rss_mb": peak})
            ran.append(stage.name)
            print(f"defectsynth run: [{stage.name}] done in {seconds:.1f} s (CPU {cpu_seconds:.1f} s, "
                  f"peak RSS {peak:.0f} MB)")
        if cfg.stop_after == stage.name:
            stopped_after = stage.name
            print(f"defectsynth run: stopping after {stage.name} (--stop-after); rerun without it to continue")
            break
    report_path = None
    if stopped_after is None:
        report_path = write_report(cfg, stages, out, threads, time.perf_counter() - started,
                                   {s.name: marker_path(out, s.name) for s in stages})
        print(f"defectsynth run: wrote {report_path}")
    return RunResult(out, ran, skipped, stopped_after, report_path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, obj: Any) -> None:
    from data.files import write_json_atomic
    write_json_atomic(path, obj, indent=2)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defectsynth run", description=(RunFlags.__doc__ or "").strip(),
                                     epilog="Stage settings live in the JSON config (see --print-config).")
    parser.add_argument("--config", default="", help="a run config JSON (OUT/run_config.json of an earlier run, "
                                                      "or --print-config's output); flags given here override it")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    add_dataclass_arguments(parser, RunFlags)
    return parser


def config_from_argv(argv: list[str] | None) -> tuple[RunConfig, bool]:
    """(config, print only). Flags override --config; only flags given on the command line count."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:  # a second parse without defaults tells which flags were given
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    given.pop("config", None), given.pop("print_config", None)
    base = load_config_json(RunConfig, args.config) if args.config else RunConfig()
    return replace(base, **given), args.print_config


@command("run")
def cli(argv: list[str] | None = None) -> int:
    cfg, print_only = config_from_argv(argv)
    if print_only:
        print(json.dumps(config_to_dict(resolve_run_config(cfg)), indent=2, sort_keys=True))
        return 0
    try:
        main(cfg)
    except RunStopped as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())

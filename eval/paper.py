"""The paper's evaluation (Valvano et al. 2024, section 5) as one command.

    python -m eval.paper --data train.json --test test.json --synthetic sadf.json --out runs/paper \\
        [--data-small train_10pct.json --synthetic-small sadf_10pct.json] [--baseline inpaint.json] \\
        [--diversity-samples ours_mxk.json] [--synthetic-no-concept sadf_noconcept.json] [--tables 1 2 3 4]

`defectsynth run` makes every input (see docs/run.md); by hand, keep the paper's protocol (section 4,
5.1): --data is the training split, the generators saw nothing else, --test was never seen.

Tables (Markdown in OUT/report.md and OUT/table<N>.md, numbers in OUT/report.json, charts in OUT/plots/):
    1  Mask R-CNN on held-out real data, trained on synthetic / real / synthetic then real
       (100% of the real training images): segm mAP, bbox mAP, IoU of matched instances (%),
       normalised Hausdorff distance (eval.maskrcnn)
    2  the same with the small real set (--data-small, default a stratified --real-fraction = 10% of
       --data) and the synthetic set of a generator trained on that small set (--synthetic-small)
    3  diversity of our samples vs the inpainting baseline: within-condition L2 and MI over
       m x k samples, and FID of those samples against the real set (eval.diversity)
    4  FID against the real set (--fid-reference, default --data) of the small-data generators with
       (--synthetic-small) and without (--synthetic-no-concept) the concept phase, and of --synthetic
Under every table, "Where these numbers come from" names the test set, Mask R-CNN's training sets,
each synthetic set and its generator (control and base files with sha256, their training data;
eval/provenance.py); report.json holds the same under each table and row ("provenance").
Inputs for tables 3 and 4:
    --synthetic / --diversity-samples / --baseline: COCO json whose image records carry
      "condition_id" (or a folder with one subfolder per condition), see eval.diversity; the
      synthesis stage writes condition_id = the SADF pair id and sample_index = the sample number.
    --synthetic-no-concept: a synthetic set made by the same synthesis without the concept phase
      (any COCO json or image folder; FID needs no annotations).
A table whose inputs are missing is written as "not run: <why>" instead of failing; so is a FID
column when the Inception weights are not on disk. The paper's own numbers (on its in-house
data) appear in columns marked "paper*": a reference for the shape of the results, not a target.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from data.files import write_json_atomic
from defectsynth.errors import UserError, command
from defectsynth.device import DEVICE_HELP, resolve_device
from defectsynth.runconfig import config_from_args, config_to_dict, parser_from_dataclass
from eval.report import bar_chart, fmt, json_ready, markdown_table, write_text_atomic

# Valvano et al. 2024 (arXiv:2401.03152), on the authors' in-house data. Reference only.
PAPER = {
    "table1": {"synthetic": {"segm_map": 0.06, "bbox_map": 0.12, "iou": 80.6, "hd": 0.29},
               "real": {"segm_map": 0.12, "bbox_map": 0.27, "iou": 80.7, "hd": 0.19},
               "synthetic+real": {"segm_map": 0.15, "bbox_map": 0.32, "iou": 80.9, "hd": 0.18}},
    "table2": {"real": {"segm_map": 0.00}, "synthetic+real": {"segm_map": 0.07}},
    "table3": {"ours": {"l2": 91.36, "mi": 0.70, "fid": 181.15},
               "inpainting baseline": {"l2": 64.17, "mi": 1.36, "fid": 203.83}},
    "table4": {"with concept phase": {"fid": 102.79}, "without concept phase": {"fid": 106.17},
               "reference: all training data, with concept": {"fid": 96.57},
               "note": "FID 96.57 with 100% of the data (with concept); 102.79 / 106.17 with 10%"},
}
PAPER_NOTE = ("paper* = Valvano et al. 2024 (arXiv:2401.03152) on their in-house data, quoted for reference; "
              "not comparable with numbers on another dataset")


@dataclass(frozen=True)
class PaperConfig:
    """Write the paper's Tables 1-4 (Mask R-CNN, 10% data, diversity, concept ablation) for a dataset."""

    data: str = field(default="", metadata={
        "help": "real annotated training COCO json (Mask R-CNN's real data; FID's real set unless --fid-reference)"})
    synthetic: str | None = field(default=None, metadata={
        "help": "our synthetic (SADF) COCO json, from the generator trained on --data (Table 1, Table 4's reference row)"})
    test: str | None = field(default=None, metadata={
        "help": "held-out real COCO json, never seen by any generator; default: a stratified --test-fraction of --data"})
    data_small: str | None = field(default=None, metadata={
        "help": "Table 2: the small real training set (default: a seeded ceil(--real-fraction x --data) subset "
                "holding every class)"})
    synthetic_small: str | None = field(default=None, metadata={
        "help": "Table 2 and Table 4 (with concept): the SADF set of the generator trained on --data-small"})
    fid_reference: str | None = field(default=None, metadata={
        "help": "the real images every FID / FD is computed against (default: --data)"})
    baseline: str | None = field(default=None, metadata={
        "help": "table 3: inpainting-baseline samples grouped by condition"})
    diversity_samples: str | None = field(default=None, metadata={
        "help": "table 3: our samples grouped by condition (default: --synthetic)"})
    synthetic_no_concept: str | None = field(default=None, metadata={
        "help": "table 4: synthetic set of a control trained on the base model (no concept phase) on --data-small"})
    out: str = field(default="runs/paper", metadata={"help": "report folder"})
    tables: tuple[str, ...] = field(default=("1", "2", "3", "4"), metadata={"help": "which tables to make"})
    real_fraction: float = field(default=0.1, metadata={
        "help": "table 2: share of the real training images when --data-small is not given (paper: 10%%)"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "Mask R-CNN repeats"})
    iterations: int = field(default=2000, metadata={"help": "Mask R-CNN steps per training phase"})
    batch_size: int = field(default=2, metadata={"help": "Mask R-CNN images per step"})
    lr: float = field(default=0.01, metadata={"help": "Mask R-CNN SGD learning rate"})
    warmup_iterations: int = field(default=100, metadata={"help": "Mask R-CNN linear warm-up steps"})
    min_size: int = field(default=512, metadata={"help": "Mask R-CNN resize: shorter side"})
    max_size: int = field(default=512, metadata={"help": "Mask R-CNN resize: longest side cap"})
    init_weights: str | None = field(default=None, metadata={"help": "Mask R-CNN init state dict (see eval.maskrcnn)"})
    rois_per_image: int = field(default=512, metadata={"help": "Mask R-CNN RoIs per image in training"})
    detections_per_image: int = field(default=100, metadata={"help": "Mask R-CNN detections kept per image"})
    backbone: str = field(default="resnet50", metadata={
        "help": "Mask R-CNN's ResNet-FPN backbone (resnet50: torchvision's Mask R-CNN; see eval.maskrcnn)",
        "choices": ["resnet50", "resnet34", "resnet18"]})
    fpn_channels: int = field(default=256, metadata={
        "help": "Mask R-CNN FPN and head width (256: torchvision's; see eval.maskrcnn)"})
    anchor_sizes: tuple[int, ...] = field(default=(32, 64, 128, 256, 512), metadata={
        "help": "Mask R-CNN RPN anchor side per FPN level (torchvision's default; see eval.maskrcnn)"})
    precision: str = field(default="auto", metadata={
        "help": "Mask R-CNN autocast (auto: bf16 on CUDA and on CPUs with native bf16, else fp32)",
        "choices": ["auto", "fp32", "bf16"]})
    test_fraction: float = field(default=0.2, metadata={
        "help": "held-out share of --data when --test is absent (ours; defectsynth run always passes its test split)"})
    checkpoint_every: int = field(default=200, metadata={"help": "Mask R-CNN checkpoint interval"})
    feature_extractor: str = field(default="inception", metadata={"help": "FID features, see eval.fid"})
    inception_weights: str | None = field(default=None, metadata={"help": "pt_inception-2015-12-05-6726825d.pth"})
    kid: bool = field(default=True, metadata={"help": "report KID beside FID"})
    kid_subsets: int = field(default=100, metadata={"help": "KID subsets"})
    kid_subset_size: int = field(default=1000, metadata={"help": "KID subset size (capped by the set sizes)"})
    fid_max_images: int | None = field(default=None, metadata={"help": "cap each FID set (seeded subset)"})
    fid_batch_size: int = field(default=50, metadata={"help": "images per feature batch"})
    conditions: int = field(default=10, metadata={"help": "table 3: m conditions"})
    per_condition: int = field(default=10, metadata={"help": "table 3: k samples per condition"})
    diversity_size: int = field(default=256, metadata={"help": "table 3: image side for L2 / MI"})
    mi_bins: int = field(default=32, metadata={"help": "table 3: MI histogram bins"})
    seed: int = field(default=0, metadata={"help": "split, subsets, condition draw, KID"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    progress: bool = field(default=True, metadata={"help": "progress bars"})


def _not_run(reason: str) -> dict[str, str]:
    return {"not_run": reason}


def _mean_std(entry: dict[str, Any], key: str, scale: float = 1.0, digits: int = 3) -> str:
    mean, std = entry["mean"][key] * scale, entry["std"][key] * scale
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(entry["runs"]) > 1 else "")


class Distances:
    """FID (or FD-<name>) against the real set, with the real features computed once."""

    def __init__(self, cfg: PaperConfig) -> None:
        self.cfg, self.extractor, self.error, self.real = cfg, None, None, None
        from eval.features import build_extractor
        from eval.inception import InceptionWeightsNotFound

        try:
            self.extractor = build_extractor(cfg.feature_extractor, cfg.inception_weights, cfg.device, cfg.seed)
        except InceptionWeightsNotFound as err:
            self.error = str(err)

    def _cap(self, paths: list[Path]) -> list[Path]:
        """At most --fid-max-images paths (a seeded subset, in the original order)."""
        cap = self.cfg.fid_max_images
        if cap is None or len(paths) <= cap:
            return paths
        rng = np.random.default_rng(self.cfg.seed)
        return [paths[i] for i in sorted(rng.choice(len(paths), cap, replace=False))]

    def against_real(self, paths: list[Path], what: str) -> dict[str, Any]:
        """{"label", "value", "n_real", "n_fake", "kid"} or {"not_run": why}."""
        from eval.features import extract_features, image_set_paths
        from eval.fid import distance_from_features

        if self.extractor is None:
            return _not_run(f"no Inception weights ({self.error.splitlines()[-1]})")
        cfg = self.cfg
        reference = cfg.fid_reference or cfg.data
        if not reference:
            return _not_run("no --data or --fid-reference (the real set) given")
        if self.real is None:
            self.real = extract_features(self._cap(image_set_paths(reference)), self.extractor,
                                         cfg.fid_batch_size, cfg.device, cfg.progress, "real features")
        fake = extract_features(self._cap(paths), self.extractor, cfg.fid_batch_size, cfg.device,
                                cfg.progress, f"{what} features")
        return distance_from_features(self.real, fake, self.extractor.label, cfg.kid, cfg.kid_subsets,
                                      cfg.kid_subset_size, cfg.seed).as_dict()


def real_sets(cfg: PaperConfig, out: Path) -> dict[str, str]:
    """{"train", "test", "small"}: the COCO files of Mask R-CNN's real training data (Tables 1, 2) and
    of the held-out test set. What --data / --test / --data-small do not give is cut here, seeded
    and stratified by class (data.coco), and saved under OUT/splits/."""
    from data.coco import load_coco, save_coco, split_every_class, subset_with_every_class

    sets = {"train": cfg.data, "test": cfg.test, "small": cfg.data_small}
    if not cfg.test:
        if not 0 < cfg.test_fraction < 1:
            raise UserError(f"--test-fraction must be in (0, 1), got {cfg.test_fraction}")
        parts = split_every_class(load_coco(cfg.data, check_images=False, progress=False),
                                  [1 - cfg.test_fraction, cfg.test_fraction], seed=cfg.seed, names=["train", "test"])
        for name in ("train", "test"):
            sets[name] = str(out / "splits" / f"real_{name}.json")
            save_coco(parts[name], sets[name], validate=False)
    if not cfg.data_small and "2" in cfg.tables:
        small = subset_with_every_class(load_coco(sets["train"], check_images=False, progress=False),
                                        cfg.real_fraction, seed=cfg.seed)
        sets["small"] = str(out / "splits" / "real_small.json")
        save_coco(small, sets["small"], validate=False)
    return sets


def run_detection_tables(cfg: PaperConfig, out: Path) -> dict[str, dict[str, Any]]:
    """Tables 1 and 2, each its own Mask R-CNN benchmark on the same test set: Table 1 trains on
    --synthetic and --data, Table 2 on --synthetic-small and the small real set. Returns
    {table: {"summary", "sets"}}."""
    from eval.maskrcnn import MaskRCNNConfig, run_benchmark

    sets = real_sets(cfg, out)
    inputs = {"1": (sets["train"], cfg.synthetic), "2": (sets["small"], cfg.synthetic_small)}
    tables = {}
    for table in (t for t in ("1", "2") if t in cfg.tables):
        real, synthetic = inputs[table]
        mcfg = MaskRCNNConfig(real=real, synthetic=synthetic, test=sets["test"], split_seed=cfg.seed,
                              out=str(out / "maskrcnn" / f"table{table}"), real_fractions=(1.0,),
                              seeds=cfg.seeds, iterations=cfg.iterations, batch_size=cfg.batch_size, lr=cfg.lr,
                              warmup_iterations=cfg.warmup_iterations,
                              min_size=cfg.min_size, max_size=cfg.max_size, init_weights=cfg.init_weights,
                              rois_per_image=cfg.rois_per_image, detections_per_image=cfg.detections_per_image,
                              checkpoint_every=cfg.checkpoint_every, device=cfg.device, progress=cfg.progress,
                              backbone=cfg.backbone, fpn_channels=cfg.fpn_channels, anchor_sizes=cfg.anchor_sizes,
                              precision=cfg.precision)
        tables[table] = {"summary": run_benchmark(mcfg), "real": real, "synthetic": synthetic, "test": sets["test"]}
    return tables


def detection_table(run: dict[str, Any], table: str, pct: str) -> dict[str, Any]:
    """Rows of table 1 or 2 from its benchmark run, each with where its number comes from: the
    synthetic set and its generator, Mask R-CNN's training set(s) and the test set."""
    from eval.provenance import coco_set, synthetic_provenance

    summary, reference = run["summary"], PAPER[f"table{table}"]
    real, synthetic, test = coco_set(run["real"]), synthetic_provenance(run["synthetic"]), coco_set(run["test"])
    training = {"synthetic": [synthetic], "real": [real], "synthetic+real": [synthetic, real]}
    missing = "no synthetic set given (" + ("--synthetic" if table == "1" else "--synthetic-small") + ")"
    rows = []
    for name, key in (("synthetic", "synthetic"), ("real", "real@100%"), ("synthetic+real", "synthetic+real@100%")):
        entry = summary["experiments"].get(key, _not_run(f"experiment {key} not requested"))
        if name != "real" and synthetic is None:
            entry = _not_run(missing)
        row = {"training data": name if name == "synthetic" else f"{name} ({pct} real)", "entry": entry,
               "paper": reference.get(name, {}),
               "provenance": {"maskrcnn_training": [t for t in training[name] if t], "test_set": test,
                              "synthetic": synthetic if name != "real" else None}}
        rows.append(row)
    return {"rows": rows, "classes": summary["classes"], "n_test_images": summary["n_test_images"],
            "matching_rule": summary["matching_rule"],
            "provenance": {"test_set": test, "real_training_set": real, "synthetic": synthetic}}


def detection_provenance(table: dict[str, Any]) -> str:
    """Markdown lines under a detection table: test set, real set, synthetic set and its generator."""
    from eval.provenance import describe_set, describe_synthetic

    prov = table["provenance"]
    return ("\n\nWhere these numbers come from:\n"
            f"- metrics: on the test set {describe_set(prov['test_set'])} only\n"
            f"- real rows: Mask R-CNN trained on {describe_set(prov['real_training_set'])}\n"
            f"- synthetic rows: Mask R-CNN trained on {describe_synthetic(prov['synthetic'])}\n"
            "- synthetic+real: the synthetic row's model fine-tuned on the real row's set")


def detection_markdown(table: dict[str, Any]) -> str:
    headers = ["training data", "segm mAP", "bbox mAP", "IoU (%)", "HD (norm.)", "seeds",
               "paper* segm mAP", "paper* bbox mAP", "paper* IoU (%)", "paper* HD"]
    rows = []
    for row in table["rows"]:
        e, p = row["entry"], row["paper"]
        paper = [fmt(p[k], 1 if k == "iou" else 2) if k in p else "—" for k in ("segm_map", "bbox_map", "iou", "hd")]
        if "not_run" in e:
            rows.append([row["training data"], f"not run: {e['not_run']}", "—", "—", "—", "—", *paper])
            continue
        rows.append([row["training data"], _mean_std(e, "segm_map"), _mean_std(e, "bbox_map"),
                     _mean_std(e, "mean_iou", 100.0, 1), _mean_std(e, "mean_hausdorff"), str(len(e["runs"])), *paper])
    classes = [r for r in table["rows"] if "not_run" not in r["entry"]]
    per_class = ""
    if classes:
        per_class = "\n\nPer-class segm AP:\n\n" + markdown_table(
            ["training data", *table["classes"]],
            [[r["training data"], *[fmt(r["entry"]["mean"]["per_class_segm_ap"].get(c)) for c in table["classes"]]]
             for r in classes])
    return (markdown_table(headers, rows) + per_class +
            f"\n\nHeld-out real test images: {table['n_test_images']}. Matching for IoU / HD: "
            f"{table['matching_rule']}.")


def detection_plots(table: dict[str, Any], plots: Path, name: str) -> list[str]:
    rows = [r for r in table["rows"] if "not_run" not in r["entry"]]
    if not rows:
        return []
    metrics = {"segm mAP": ("segm_map", 1.0), "bbox mAP": ("bbox_map", 1.0), "IoU": ("mean_iou", 1.0),
               "HD (norm.)": ("mean_hausdorff", 1.0)}
    series = {r["training data"]: [r["entry"]["mean"][k] * s for k, s in metrics.values()] for r in rows}
    title = name.replace("table", "Table ")
    a = bar_chart(plots / f"{name}_metrics.png", list(metrics), series, f"{title}: Mask R-CNN on held-out real data")
    per_class = {r["training data"]: [r["entry"]["mean"]["per_class_segm_ap"].get(c) for c in table["classes"]]
                 for r in rows}
    b = bar_chart(plots / f"{name}_per_class_segm_ap.png", table["classes"], per_class, f"{title}: per-class segm AP")
    return [str(a), str(b)]


def diversity_table(cfg: PaperConfig, distances: Distances) -> dict[str, Any]:
    from eval.diversity import run_diversity
    from eval.provenance import synthetic_provenance

    rows = []
    inputs = (("ours", cfg.diversity_samples or cfg.synthetic, "no --synthetic or --diversity-samples"),
              ("inpainting baseline", cfg.baseline, "no --baseline given"))
    for name, source, missing in inputs:
        row: dict[str, Any] = {"method": name, "paper": PAPER["table3"][name], "source": source,
                               "provenance": {"synthetic": synthetic_provenance(source)}}
        if source is None:
            row["entry"] = _not_run(missing)
        else:
            try:
                result, paths = run_diversity(source, cfg.conditions, cfg.per_condition, cfg.diversity_size,
                                              cfg.mi_bins, cfg.seed, cfg.progress)
            except ValueError as err:  # no condition ids, too few conditions or samples
                row["entry"] = _not_run(str(err))
            else:
                row["entry"] = vars(result) | {"definition": result.definition(),
                                               "distance": distances.against_real(paths, name)}
        rows.append(row)
    return {"rows": rows}


def _distance_cells(d: dict[str, Any]) -> list[str]:
    if "not_run" in d:
        return [f"not run: {d['not_run']}", "—", "—"]
    kid = d.get("kid")
    return [f"{d['value']:.2f}", f"{kid['mean']:.4f} ± {kid['std']:.4f}" if kid else "n/a",
            f"{d['n_fake']} vs {d['n_real']} real"]


def _distance_headers(distances: list[dict[str, Any]]) -> tuple[str, str]:
    """Column names: "FID" / "KID" with the Inception weights, "FD-<name>" / "KD-<name>" otherwise."""
    label = next((d["label"] for d in distances if "label" in d), "FID")
    return (f"{label} ↓", "KID ↓" if label == "FID" else f"KD-{label[3:]} ↓")


def diversity_markdown(table: dict[str, Any]) -> str:
    fd, kd = _distance_headers([r["entry"]["distance"] for r in table["rows"] if "distance" in r["entry"]])
    headers = ["method", "L2 ↑", "MI ↓", fd, kd, "N", "paper* L2", "paper* MI", "paper* FID"]
    rows, definition = [], ""
    for row in table["rows"]:
        e, p = row["entry"], row["paper"]
        paper = [fmt(p["l2"], 2), fmt(p["mi"], 2), fmt(p["fid"], 2)]
        if "not_run" in e:
            rows.append([row["method"], f"not run: {e['not_run']}", "—", "—", "—", "—", *paper])
            continue
        definition = e["definition"]
        rows.append([row["method"], f"{e['mean_l2']:.2f} ± {e['std_l2']:.2f}",
                     f"{e['mean_mi']:.3f} ± {e['std_mi']:.3f}", *_distance_cells(e["distance"]), *paper])
    text = markdown_table(headers, rows)
    if definition:
        text += f"\n\nDefinitions: {definition} (eval.diversity). FID of the m x k samples against the real set."
    return text


def fid_table(cfg: PaperConfig, distances: Distances) -> dict[str, Any]:
    """Table 4: FID of the small-data generators with and without the concept phase, and of the
    generator trained on all of --data as the reference row, all against the same real set."""
    from eval.features import image_set_paths
    from eval.provenance import synthetic_provenance

    rows = []
    for name, source, flag in (("with concept phase", cfg.synthetic_small, "--synthetic-small"),
                               ("without concept phase", cfg.synthetic_no_concept, "--synthetic-no-concept"),
                               ("reference: all training data, with concept", cfg.synthetic, "--synthetic")):
        row: dict[str, Any] = {"synthetic set": name, "source": source, "paper": PAPER["table4"].get(name, {}),
                               "provenance": {"synthetic": synthetic_provenance(source)}}
        row["entry"] = (_not_run(f"no {flag} given") if source is None
                        else distances.against_real(image_set_paths(source), name))
        rows.append(row)
    return {"rows": rows, "reference": cfg.fid_reference or cfg.data}


def sample_provenance(table: dict[str, Any], cfg: PaperConfig, key: str) -> str:
    """Markdown lines under Table 3 or 4: each row's sample set and generator, and the real set."""
    from eval.provenance import coco_set, describe_set, describe_synthetic

    table["provenance"] = {"fid_reference": coco_set(cfg.fid_reference or cfg.data)}
    lines = [f"- {r[key]}: {describe_synthetic(r['provenance']['synthetic'])}" for r in table["rows"]
             if r["provenance"]["synthetic"] is not None]
    lines.append(f"- FID / FD real set: {describe_set(table['provenance']['fid_reference'])}")
    return "\n\nWhere these numbers come from:\n" + "\n".join(lines)


def fid_markdown(table: dict[str, Any]) -> str:
    rows = [[r["synthetic set"], *_distance_cells(r["entry"]), fmt(r["paper"].get("fid"), 2)] for r in table["rows"]]
    fd, kd = _distance_headers([r["entry"] for r in table["rows"]])
    return (markdown_table(["synthetic set", fd, kd, "N", "paper* FID"], rows) +
            f"\n\npaper*: {PAPER['table4']['note']}.")


TITLES = {"1": "Table 1: Mask R-CNN, synthetic / real / synthetic then real (100% real data)",
          "2": "Table 2: Mask R-CNN with {pct} of the real training data",
          "3": "Table 3: diversity, ours vs inpainting baseline",
          "4": "Table 4: FID with and without the concept phase"}


def main(cfg: PaperConfig) -> dict[str, Any]:
    """Make the requested tables; returns the report dict also written to OUT/report.json."""
    cfg = replace(cfg, device=str(resolve_device(cfg.device)))  # "auto" -> cuda if available, else cpu
    unknown = sorted(set(cfg.tables) - set(TITLES))
    if unknown:
        raise UserError(f"--tables: unknown {unknown}; choose from {sorted(TITLES)}")
    # Checked before OUT (and OUT/maskrcnn) is written: the intervals and the annotated data.
    from data.coco import load_coco
    from eval.maskrcnn import check_intervals
    check_intervals(cfg)
    if cfg.data:
        load_coco(cfg.data, check_images=False, progress=False)
    out, plots = Path(cfg.out), Path(cfg.out) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": config_to_dict(cfg), "paper_reference": PAPER, "tables": {}, "plots": [],
                              "seconds": {}}
    markdown: dict[str, str] = {}
    if {"1", "2"} & set(cfg.tables):
        tic = time.perf_counter()
        runs = run_detection_tables(cfg, out) if cfg.data else None
        for t in (t for t in ("1", "2") if t in cfg.tables):
            if runs is None:
                report["tables"][t] = _not_run("no --data (real annotated COCO) given")
                continue
            table = detection_table(runs[t], t, "100%" if t == "1" else f"{cfg.real_fraction * 100:g}%")
            report["tables"][t] = table
            markdown[t] = detection_markdown(table) + detection_provenance(table)
            report["plots"] += detection_plots(table, plots, f"table{t}")
        report["seconds"]["tables 1-2"] = time.perf_counter() - tic
    distances = Distances(cfg) if ({"3", "4"} & set(cfg.tables)) else None
    if "3" in cfg.tables:
        tic = time.perf_counter()
        table = diversity_table(cfg, distances)
        report["tables"]["3"], markdown["3"] = table, diversity_markdown(table) + sample_provenance(table, cfg, "method")
        done = [r for r in table["rows"] if "not_run" not in r["entry"]]
        if done:
            for key, label in (("mean_l2", "L2 (higher = more diverse)"), ("mean_mi", "MI (lower = more diverse)")):
                report["plots"].append(str(bar_chart(plots / f"table3_{key[5:]}.png", [label],
                                                     {r["method"]: [r["entry"][key]] for r in done},
                                                     f"Table 3: {label}")))
        report["seconds"]["table 3"] = time.perf_counter() - tic
    if "4" in cfg.tables:
        tic = time.perf_counter()
        table = fid_table(cfg, distances)
        report["tables"]["4"], markdown["4"] = table, fid_markdown(table) + sample_provenance(table, cfg, "synthetic set")
        done = [r for r in table["rows"] if "not_run" not in r["entry"]]
        if done:
            label = done[0]["entry"]["label"]
            report["plots"].append(str(bar_chart(plots / "table4_fid.png", [label],
                                                 {r["synthetic set"]: [r["entry"]["value"]] for r in done},
                                                 f"Table 4: {label} against the real set")))
        report["seconds"]["table 4"] = time.perf_counter() - tic
    sections = [f"# Evaluation report\n\n{PAPER_NOTE}."]
    for t in cfg.tables:
        title = TITLES[t].format(pct=f"{cfg.real_fraction * 100:g}%")
        body = markdown.get(t) or f"not run: {report['tables'][t]['not_run']}"
        write_text_atomic(out / f"table{t}.md", f"## {title}\n\n{body}\n")
        sections.append(f"## {title}\n\n{body}")
    write_text_atomic(out / "report.md", "\n\n".join(sections) + "\n")
    write_json_atomic(out / "report.json", json_ready(report), indent=1)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(report['plots'])} plot(s) in {plots}")
    return report


def get_args_parser():
    return parser_from_dataclass(PaperConfig, prog="python -m eval.paper")


@command("evaluate")
def cli(argv: list[str] | None = None) -> int:
    main(config_from_args(PaperConfig, get_args_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

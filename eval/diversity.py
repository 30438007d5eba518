"""Sample diversity (paper 5.3): how different are the images generated from ONE condition?

    python -m eval.diversity --samples sadf.json [--real real.json] [--conditions 10 --per-condition 10]

Input: a sample set grouped by condition, in either form
- a COCO json whose image records carry a condition key: "condition_id" (preferred), or
  "pair_id" / "driver_id" (aliases). Images sharing the value were generated from the same
  condition (same driver / mask / prompt), differing only in the sampling seed. An optional
  "sample_index" orders the samples of a condition (otherwise image id order);
- a folder with one subfolder per condition (DIR/<condition>/<image files>).
m conditions with at least k samples are drawn (seeded; sorted by condition id before drawing),
and the first k samples of each are used.

Definitions (every image: read as RGB, converted to grayscale with OpenCV's BT.601 weights
0.299 R + 0.587 G + 0.114 B, resized to S x S = 256 x 256 with area interpolation, uint8 0..255):
    L2(a, b)   root-mean-square pixel difference sqrt(mean_p (a_p - b_p)^2) on the 0..255 scale
               (the Euclidean distance divided by sqrt(S^2)); range 0..255, higher = more diverse
    MI(a, b)   mutual information of the joint grey-level histogram, B = 32 equal bins over
               [0, 256) per image (bin = value * B // 256), natural log (nats):
               sum_uv p(u, v) log(p(u, v) / (p(u) p(v))); range 0..log(B) = 3.47,
               lower = more diverse
Each is averaged over the k(k-1)/2 unordered pairs of a condition, then over the m conditions
(std: across conditions). FID / KID of the m x k samples against the real set come from
`eval.fid` (labelled FD-<name> for a non-Inception extractor).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from data.coco import load_coco
from data.images import list_images, read_image
from defectsynth.errors import UserError, command
from defectsynth.device import DEVICE_HELP, resolve_device
from defectsynth.runconfig import config_from_args, parser_from_dataclass

CONDITION_KEYS = ("condition_id", "pair_id", "driver_id")


def load_groups(source: str | os.PathLike) -> dict[str, list[Path]]:
    """condition -> sample image paths, in sample order (see module doc for the two layouts)."""
    source = Path(source)
    if source.is_dir():
        groups = {sub.name: list_images(sub) for sub in sorted(source.iterdir()) if sub.is_dir()}
        groups = {k: v for k, v in groups.items() if v}
        if not groups:
            raise UserError(f"{source}: expected one subfolder of images per condition, found none")
        return groups
    data = load_coco(source, check_images=False, progress=False)
    groups: dict[str, list[tuple[Any, Path]]] = {}
    for record in data["images"]:
        key = next((k for k in CONDITION_KEYS if k in record), None)
        if key is None:
            raise UserError(f"{source}: image id={record['id']} ({record['file_name']}) has no condition key; "
                             f"diversity needs one of {list(CONDITION_KEYS)} on every image record")
        order = (record.get("sample_index", record["id"]), record["id"])
        groups.setdefault(str(record[key]), []).append((order, Path(record["file_name"])))
    return {cond: [p for _, p in sorted(items, key=lambda x: x[0])] for cond, items in groups.items()}


def _condition_sort_key(name: str) -> tuple:
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def select_groups(groups: dict[str, list[Path]], conditions: int, per_condition: int, seed: int = 0,
                  source: str = "samples") -> list[tuple[str, list[Path]]]:
    """m seeded conditions with >= k samples, each with its first k samples."""
    eligible = sorted((c for c, paths in groups.items() if len(paths) >= per_condition), key=_condition_sort_key)
    if len(eligible) < conditions:
        raise UserError(f"{source}: needs {conditions} conditions with >= {per_condition} samples each, "
                         f"found {len(eligible)} (of {len(groups)} conditions)")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(eligible), conditions, replace=False).tolist())
    return [(eligible[i], groups[eligible[i]][:per_condition]) for i in chosen]


def preprocess(path: str | os.PathLike, size: int = 256) -> np.ndarray:
    """uint8 (size, size) grayscale (BT.601), area-resized."""
    gray = cv2.cvtColor(read_image(path), cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)


def rms_l2(a: np.ndarray, b: np.ndarray) -> float:
    """sqrt(mean((a - b)^2)) over pixels, computed in float64."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sqrt(np.mean(diff * diff)))


def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """MI in nats of two uint8 images' joint histogram with `bins` equal bins over [0, 256)."""
    if a.shape != b.shape:
        raise ValueError(f"mutual_information: shapes differ {a.shape} vs {b.shape}")
    qa = a.astype(np.int64).ravel() * bins // 256
    qb = b.astype(np.int64).ravel() * bins // 256
    joint = np.bincount(qa * bins + qb, minlength=bins * bins).reshape(bins, bins) / qa.size  # p(u, v)
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)  # marginals p(u), p(v)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])))


@dataclass(frozen=True)
class DiversityResult:
    mean_l2: float
    std_l2: float
    mean_mi: float
    std_mi: float
    conditions: int
    per_condition: int
    pairs: int
    size: int
    bins: int
    condition_ids: tuple[str, ...]

    def definition(self) -> str:
        return (f"m={self.conditions} conditions x k={self.per_condition} samples; grayscale (BT.601) "
                f"{self.size}x{self.size} uint8; L2 = RMS pixel difference on 0..255; MI = joint-histogram "
                f"mutual information, {self.bins} bins, nats; means over the {self.pairs} within-condition pairs")


def diversity_scores(selected: list[tuple[str, list[Path]]], size: int = 256, bins: int = 32,
                     progress: bool = True) -> DiversityResult:
    """Mean pairwise L2 and MI within each condition, averaged over conditions (module doc)."""
    l2_means, mi_means, pairs = [], [], 0
    for _, paths in tqdm(selected, desc="diversity", disable=not progress, unit="condition"):
        images = [preprocess(p, size) for p in paths]
        l2s = [rms_l2(a, b) for a, b in combinations(images, 2)]
        mis = [mutual_information(a, b, bins) for a, b in combinations(images, 2)]
        if not l2s:
            raise ValueError("diversity needs at least 2 samples per condition")
        l2_means.append(np.mean(l2s))
        mi_means.append(np.mean(mis))
        pairs += len(l2s)
    return DiversityResult(float(np.mean(l2_means)), float(np.std(l2_means)), float(np.mean(mi_means)),
                           float(np.std(mi_means)), len(selected), len(selected[0][1]), pairs, size, bins,
                           tuple(c for c, _ in selected))


@dataclass(frozen=True)
class DiversityConfig:
    """Diversity of samples generated from the same condition (+ their FID against the real set)."""

    samples: str = field(default="", metadata={
        "help": "sample set: COCO json with condition_id on every image, or a folder of condition subfolders"})
    real: str | None = field(default=None, metadata={"help": "real images (folder or COCO) for FID/KID"})
    conditions: int = field(default=10, metadata={"help": "m: conditions drawn"})
    per_condition: int = field(default=10, metadata={"help": "k: samples per condition"})
    size: int = field(default=256, metadata={"help": "side images are resized to"})
    bins: int = field(default=32, metadata={"help": "histogram bins of the mutual information"})
    seed: int = field(default=0, metadata={"help": "which conditions are drawn; KID subsets"})
    feature_extractor: str = field(default="inception", metadata={"help": "see eval.fid"})
    inception_weights: str | None = field(default=None, metadata={"help": "see eval.fid"})
    kid: bool = field(default=True, metadata={"help": "also KID"})
    device: str = field(default="auto", metadata={"help": f"torch device for features: {DEVICE_HELP}"})
    out: str | None = field(default=None, metadata={"help": "write the result as JSON here"})


def run_diversity(samples: str, conditions: int = 10, per_condition: int = 10, size: int = 256, bins: int = 32,
                  seed: int = 0, progress: bool = True) -> tuple[DiversityResult, list[Path]]:
    """Diversity of a grouped sample set; also returns the m x k sample paths used."""
    selected = select_groups(load_groups(samples), conditions, per_condition, seed, samples)
    result = diversity_scores(selected, size, bins, progress)
    return result, [p for _, paths in selected for p in paths]


def main(cfg: DiversityConfig) -> dict[str, Any]:
    cfg = replace(cfg, device=str(resolve_device(cfg.device)))  # "auto" -> cuda if available, else cpu
    if not cfg.samples:
        raise UserError("eval.diversity: --samples is required")
    result, paths = run_diversity(cfg.samples, cfg.conditions, cfg.per_condition, cfg.size, cfg.bins, cfg.seed)
    report: dict[str, Any] = {"diversity": vars(result) | {"definition": result.definition()}}
    print(f"L2 {result.mean_l2:.2f} +- {result.std_l2:.2f}  MI {result.mean_mi:.3f} +- {result.std_mi:.3f}  "
          f"({result.definition()})")
    if cfg.real:
        from eval.features import build_extractor, extract_features, image_set_paths
        from eval.fid import distance_from_features

        extractor = build_extractor(cfg.feature_extractor, cfg.inception_weights, cfg.device, cfg.seed)
        real = extract_features(image_set_paths(cfg.real), extractor, device=cfg.device, desc="real")
        fake = extract_features(paths, extractor, device=cfg.device, desc="samples")
        distance = distance_from_features(real, fake, extractor.label, cfg.kid, seed=cfg.seed)
        report["distance"] = distance.as_dict()
        print(distance.summary())
    if cfg.out:
        from data.files import write_json_atomic

        write_json_atomic(cfg.out, report, indent=2)
    return report


def get_args_parser():
    return parser_from_dataclass(DiversityConfig, prog="python -m eval.diversity")


@command("diversity")
def cli(argv: list[str] | None = None) -> int:
    from eval.inception import InceptionWeightsNotFound

    try:
        main(config_from_args(DiversityConfig, get_args_parser().parse_args(argv)))
    except InceptionWeightsNotFound as err:
        print(f"eval.diversity: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

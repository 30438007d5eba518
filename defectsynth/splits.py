"""The split stage of `defectsynth run`: the annotated set cut once, before anything trains.

    OUT/splits/train.json, val.json, test.json   COCO subsets (absolute image paths, ids kept)
    OUT/splits/train_small.json                  the small regime's subset of train (Table 2, Table 4)
    OUT/splits/free_diversity.json               the defect-free images of Table 3's m conditions
    OUT/splits.json                              {"train": [...], "val": [...], "test": [...],
                                                  "train_small": [...]}: image file names as they
                                                  appear in the source COCO, plus sizes and settings

Protocol (Valvano et al., arXiv:2401.03152, sections 4 and 5.1): both generator phases train on the
training images only, "to prevent any possible bias due to data leakage"; the paper trains on
1,170 images and splits the rest equally into validation and test. It states the counts, not
fractions: our default (0.8, 0.1, 0.1) keeps its equal validation/test halves, and the 0.8 training
share is ours. The split is by image, seeded, and stratified by class: every class is in every
split where it has at least one image per split (data.coco.split_every_class). With `test` (the
user's own test COCO) the annotated set is split into train / validation only, in the same
proportions, and images whose files are also in the test set are left out of both.

The small regime (paper section 4, "just 120 annotated images", and Tables 2 and 4): a seeded
subset of ceil(small_fraction x |train|) training images holding every class
(data.coco.subset_with_every_class).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.coco import load_coco, save_coco, split_every_class, subset_with_every_class
from data.files import write_json_atomic

SPLITS = ("train", "val", "test")
SMALL, FREE_DIVERSITY = "train_small", "free_diversity"


@dataclass(frozen=True)
class SplitConfig:
    data: str                                  # the annotated COCO json
    free: str                                  # defect-free images: a folder or a COCO json
    out: str                                   # OUT/splits
    listing: str                               # OUT/splits.json
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    test: str = ""                             # the user's own test COCO (then data -> train / val)
    small_fraction: float = 0.1
    diversity_conditions: int = 10             # Table 3's m: defect-free images drawn for it
    seed: int = 0


def check_fractions(fractions: tuple[float, ...]) -> None:
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"defectsynth run: --split must be three positive train / val / test fractions "
                         f"summing to 1, got {list(fractions)}")


def source_names(path: str | Path) -> dict[int, str]:
    """image id -> file name as written in the source COCO json (before path resolution)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {int(img["id"]): img["file_name"] for img in data["images"]}


def make_splits(cfg: SplitConfig) -> dict[str, Any]:
    """Write the split files (see the module docstring); returns the OUT/splits.json content."""
    check_fractions(cfg.fractions)
    out = Path(cfg.out)
    data = load_coco(cfg.data, progress=False)
    excluded = 0
    if cfg.test:
        test = load_coco(cfg.test, progress=False)
        test_files = {img["file_name"] for img in test["images"]}
        keep = [img for img in data["images"] if img["file_name"] not in test_files]
        excluded = len(data["images"]) - len(keep)
        kept_ids = {img["id"] for img in keep}
        data = {**data, "images": keep, "annotations": [a for a in data["annotations"] if a["image_id"] in kept_ids]}
        train_share = cfg.fractions[0] / (cfg.fractions[0] + cfg.fractions[1])
        parts = split_every_class(data, [train_share, 1 - train_share], seed=cfg.seed, names=["train", "val"])
        parts["test"] = test
    else:
        parts = split_every_class(data, list(cfg.fractions), seed=cfg.seed, names=list(SPLITS))
    for name in SPLITS:
        if not parts[name]["images"]:
            raise ValueError(f"defectsynth run: --data {cfg.data}: the {name} split is empty "
                             f"({len(data['images'])} images, --split {list(cfg.fractions)}); give more images")
    parts[SMALL] = subset_with_every_class(parts["train"], cfg.small_fraction, seed=cfg.seed)
    for name, part in parts.items():
        save_coco(part, out / f"{name}.json", validate=False)
    free = _free_subset(cfg)
    save_coco(free, out / f"{FREE_DIVERSITY}.json", validate=False)

    names = source_names(cfg.data)
    test_names = source_names(cfg.test) if cfg.test else names
    listing: dict[str, Any] = {
        name: [(test_names if name == "test" else names)[int(img["id"])] for img in parts[name]["images"]]
        for name in (*SPLITS, SMALL)}
    listing["info"] = {
        "source": str(cfg.data), "test_source": str(cfg.test or cfg.data), "seed": cfg.seed,
        "fractions": list(cfg.fractions), "small_fraction": cfg.small_fraction,
        "excluded_as_in_test": excluded,
        "sizes": {name: len(parts[name]["images"]) for name in parts},
        "classes": {name: sorted({a["category_id"] for a in parts[name]["annotations"]}) for name in parts},
        "rule": "by image, seeded, stratified by class; every class in every split where it has an image per "
                "split (data.coco.split_every_class); train_small: ceil(small_fraction x train) images with "
                "every class (data.coco.subset_with_every_class)"}
    write_json_atomic(Path(cfg.listing), listing, indent=1)
    return listing


def _free_subset(cfg: SplitConfig) -> dict[str, Any]:
    """Table 3's defect-free images: a seeded draw of `diversity_conditions` of them (all when fewer)."""
    from data.importers import load_dataset

    free = load_dataset(cfg.free, progress=False)
    count = min(cfg.diversity_conditions, len(free["images"]))
    rng = np.random.default_rng(cfg.seed)
    chosen = sorted(int(i) for i in rng.choice(len(free["images"]), count, replace=False))
    return {**free, "images": [free["images"][i] for i in chosen], "annotations": []}

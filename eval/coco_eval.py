"""A thin wrapper around pycocotools' COCOeval: mAP for instance masks ("segm") or boxes ("bbox").

    metrics = evaluate_coco(gt_dataset_dict, detections, iou_type="segm")
    metrics["map"], metrics["map50"], metrics["per_class"]["crack"]

Detections follow the COCO results format: {"image_id", "category_id", "score", and
"segmentation" (RLE) for segm or "bbox" [x, y, w, h] for bbox}. `map` is COCO's AP averaged over
IoU thresholds 0.50:0.05:0.95, all areas, up to 100 detections per image (stats[0]); per-class AP
is the same average restricted to one category (NaN for a category without ground truth).
No detections at all gives 0.0 (pycocotools cannot load an empty result list).
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Any

import numpy as np
from pycocotools.cocoeval import COCOeval

from data.coco import to_pycocotools, validate_coco

STAT_NAMES = ("map", "map50", "map75", "map_small", "map_medium", "map_large",
              "mar1", "mar10", "mar100", "mar_small", "mar_medium", "mar_large")


def _quiet():
    """pycocotools prints progress to stdout; keep the caller's output clean."""
    return contextlib.redirect_stdout(io.StringIO())


def _ground_truth(gt: dict[str, Any]):
    """A pycocotools COCO object of `gt` (validated; `iscrowd`, `area`, `bbox` filled in)."""
    return to_pycocotools(validate_coco(gt, source="ground truth", check_images=False))


def _detections_for(iou_type: str, detections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep only the field the IoU type is computed on, so pycocotools takes the right path."""
    key = "segmentation" if iou_type == "segm" else "bbox"
    out = []
    for i, det in enumerate(detections):
        if key not in det:
            raise ValueError(f"detections[{i}] lacks {key!r}, needed for iou_type={iou_type!r}")
        out.append({"image_id": det["image_id"], "category_id": det["category_id"],
                    "score": float(det["score"]), key: copy.deepcopy(det[key])})
    return out


def evaluate_coco(gt: dict[str, Any], detections: list[dict[str, Any]], iou_type: str = "segm") -> dict[str, Any]:
    """COCO metrics of `detections` against the ground-truth dataset dict `gt`.

    Returns {"map", "map50", "map75", ... (the 12 COCO stats, named in STAT_NAMES),
    "per_class": {category name: AP}, "n_detections", "iou_type"}.
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    coco_gt = _ground_truth(gt)
    categories = sorted(coco_gt.cats.values(), key=lambda c: c["id"])
    has_gt = {c["id"]: bool(coco_gt.getAnnIds(catIds=[c["id"]])) for c in categories}
    result: dict[str, Any] = {"iou_type": iou_type, "n_detections": len(detections)}
    if not detections or not coco_gt.dataset["annotations"]:
        result.update({name: 0.0 for name in STAT_NAMES})
        result["per_class"] = {c["name"]: (0.0 if has_gt[c["id"]] else math.nan) for c in categories}
        return result
    with _quiet():
        coco_dt = coco_gt.loadRes(_detections_for(iou_type, detections))
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # pycocotools writes -1 for a stat without ground truth (e.g. no "large" objects): NaN here.
    result.update({name: (float(v) if v > -1 else math.nan) for name, v in zip(STAT_NAMES, evaluator.stats)})
    # precision: (IoU thresholds T, recall points R, categories K, area ranges A, max dets M);
    # -1 marks entries without ground truth. Area "all" is index 0, maxDets 100 the last.
    precision = evaluator.eval["precision"]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        valid = values[values > -1]
        per_class[coco_gt.cats[cat_id]["name"]] = float(np.mean(valid)) if valid.size else math.nan
    result["per_class"] = per_class
    return result

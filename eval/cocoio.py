"""The few COCO-reading helpers the evaluation needs (json -> dict, image paths, instance masks).

Image paths: an absolute `file_name` is used as is; a relative one is looked up beside the json
file, then in an `images/` folder beside it. Masks come from pycocotools (polygons and RLE alike).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def load_coco(path: str | os.PathLike) -> dict[str, Any]:
    """Read a COCO instances json and check the fields the evaluation relies on."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: COCO json not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: COCO field {key!r} missing or not a list")
    for i, image in enumerate(data["images"]):
        for key in ("id", "file_name", "height", "width"):
            if key not in image:
                raise ValueError(f"{path}: images[{i}] lacks {key!r}")
    image_ids = {im["id"] for im in data["images"]}
    category_ids = {c["id"] for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        for key in ("id", "image_id", "category_id", "segmentation"):
            if key not in ann:
                raise ValueError(f"{path}: annotations[{i}] lacks {key!r}")
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{path}: annotations[{i}] refers to unknown image_id {ann['image_id']}")
        if ann["category_id"] not in category_ids:
            raise ValueError(f"{path}: annotations[{i}] refers to unknown category_id {ann['category_id']}")
    return data


def resolve_image_path(coco_path: str | os.PathLike, file_name: str) -> Path:
    """Where the image `file_name` of the COCO file `coco_path` lives (see module doc)."""
    name = Path(file_name)
    if name.is_absolute():
        return name
    root = Path(coco_path).parent
    for candidate in (root / name, root / "images" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{coco_path}: image {file_name!r} not found at {root / name} "
                            f"nor at {root / 'images' / name}")


def coco_image_paths(coco_path: str | os.PathLike) -> list[Path]:
    """The files of every image listed in a COCO json, in file order."""
    data = load_coco(coco_path)
    return [resolve_image_path(coco_path, image["file_name"]) for image in data["images"]]


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """One annotation's instance mask, uint8 (H, W) in {0, 1}."""
    segm = ann["segmentation"]
    if isinstance(segm, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(np.uint8)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary (H, W) mask -> compressed RLE with a str `counts` (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def annotations_by_image(data: dict[str, Any]) -> dict[Any, list[dict[str, Any]]]:
    """image id -> its annotations (every image present, possibly with an empty list)."""
    grouped: dict[Any, list[dict[str, Any]]] = {im["id"]: [] for im in data["images"]}
    for ann in data["annotations"]:
        grouped[ann["image_id"]].append(ann)
    return grouped

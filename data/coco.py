"""COCO datasets as plain dicts: load with validation, save atomically, merge, split, stats.

In memory a dataset is the COCO dict (`images`, `annotations`, `categories`, optional `info`,
`licenses`) with one difference: every image's `file_name` is an absolute path. `load_coco`
resolves file names against the image root (the JSON's folder unless given) and `save_coco` writes
them back relative to the output JSON's folder when the image lies inside it (absolute otherwise),
so datasets from different folders merge freely and a self-contained dataset folder can move. pycocotools ignores the extra keys used here (`image["source"]` after a merge).

Validation errors (`CocoError`) name the JSON file and the offending image or annotation.
"""
from __future__ import annotations

import copy
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from defectsynth.errors import UserError

from .files import write_json_atomic
from .images import ImageReadError, image_size
from .masks import label_map, rle_area, rle_bbox, rle_to_mask, segmentation_to_rle

Coco = dict[str, Any]


class CocoError(UserError):
    """A COCO file or dict breaks the format; the message names the file and the record."""


def new_coco(categories: Sequence[dict] | Sequence[str]) -> Coco:
    """An empty dataset. `categories` are COCO dicts or plain names (ids 1, 2, ... in order)."""
    cats = [dict(c) if isinstance(c, dict) else {"id": i + 1, "name": str(c), "supercategory": "defect"}
            for i, c in enumerate(categories)]
    return {"info": {"description": "defectsynth"}, "licenses": [], "images": [], "annotations": [],
            "categories": cats}


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _check_ids(records: list, key: str, source: str) -> None:
    kind = {"images": "image", "annotations": "annotation", "categories": "category"}[key]
    seen: set[int] = set()
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise CocoError(f"{source}: {key}[{index}] is not an object")
        rid = record.get("id")
        if not _is_id(rid):
            raise CocoError(f"{source}: {key}[{index}] has {kind} id {rid!r}; ids must be positive "
                            "integers (0 is reserved)")
        if rid in seen:
            raise CocoError(f"{source}: duplicate {kind} id {rid} (at {key}[{index}])")
        seen.add(int(rid))


def _check_segmentation(segm: Any, height: int, width: int, where: str) -> dict:
    """Validate one segmentation; return its compressed RLE."""
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            raise CocoError(f"{where}: RLE segmentation needs 'counts' and 'size'")
        if [int(s) for s in segm["size"]] != [height, width]:
            raise CocoError(f"{where}: RLE size {list(segm['size'])} does not match the image's "
                            f"[height, width] = [{height}, {width}]")
    elif isinstance(segm, list):
        if not segm or all(isinstance(p, list) and not p for p in segm):
            raise CocoError(f"{where}: empty segmentation (no polygons)")
        for i, poly in enumerate(segm):
            if not isinstance(poly, list) or not all(isinstance(v, (int, float)) for v in poly):
                raise CocoError(f"{where}: polygon {i} is not a flat list of numbers")
            if len(poly) % 2:
                raise CocoError(f"{where}: polygon {i} has an odd count of numbers ({len(poly)})")
            if len(poly) < 6:
                raise CocoError(f"{where}: polygon {i} has {len(poly) // 2} points; a polygon needs at "
                                "least 3 points (6 numbers; 4 numbers would be read as a box)")
            if not np.all(np.isfinite(poly)):
                raise CocoError(f"{where}: polygon {i} holds NaN or infinite coordinates")
    else:
        raise CocoError(f"{where}: segmentation must be a polygon list or an RLE dict, "
                        f"got {type(segm).__name__}")
    try:
        rle = segmentation_to_rle(segm, height, width)
    except Exception as err:  # pycocotools raises bare Exceptions on malformed RLE strings
        raise CocoError(f"{where}: cannot decode segmentation ({err})") from err
    if rle_area(rle) == 0:
        raise CocoError(f"{where}: empty segmentation (0 pixels inside the image)")
    return rle


BBOX_SLACK = 0.5  # pixels a given bbox may reach beyond the image border


def _check_annotation(ann: dict, images: dict[int, dict], categories: dict[int, str], source: str) -> None:
    """Check one annotation record against its image and the categories, and fill in `bbox`,
    `area` and `iscrowd` where missing (in place). Raises `CocoError` naming the record."""
    img = images.get(ann.get("image_id"))
    where = f"{source}: annotation id={ann['id']}"
    if img is None:
        raise CocoError(f"{where}: unknown image_id {ann.get('image_id')!r}")
    where += f" (image id={img['id']}, file {img['file_name']})"
    if ann.get("category_id") not in categories:
        raise CocoError(f"{where}: unknown category_id {ann.get('category_id')!r}; "
                        f"known ids {sorted(categories)}")
    if "segmentation" not in ann:
        raise CocoError(f"{where}: missing segmentation")
    rle = _check_segmentation(ann["segmentation"], img["height"], img["width"], where)
    if "bbox" in ann:
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise CocoError(f"{where}: bbox must be [x, y, w, h], got {box!r}")
        if box[2] <= 0 or box[3] <= 0:
            raise CocoError(f"{where}: zero-area bbox {box} (width and height must be > 0)")
        # Half a pixel of slack: polygon boxes along pixel edges may end on the border itself.
        if box[0] < -BBOX_SLACK or box[1] < -BBOX_SLACK or box[0] + box[2] > img["width"] + BBOX_SLACK \
                or box[1] + box[3] > img["height"] + BBOX_SLACK:
            raise CocoError(f"{where}: bbox {box} lies outside the {img['width']}x{img['height']} (w x h) "
                            f"image; fix the record or drop 'bbox' to have it computed from the mask")
    else:
        ann["bbox"] = rle_bbox(rle)
    if "area" in ann:
        if not isinstance(ann["area"], (int, float)) or not ann["area"] > 0:
            raise CocoError(f"{where}: area must be a number > 0, got {ann['area']!r}; fix the record "
                            f"or drop 'area' to have it computed from the mask")
    else:
        ann["area"] = float(rle_area(rle))
    # Every annotation is one instance here; COCO's crowd regions (iscrowd=1, ignored by
    # COCOeval, one blob of many objects) have no meaning for the generator or the segmentor.
    iscrowd = ann.setdefault("iscrowd", 0)
    if iscrowd not in (0, 1, False, True):
        raise CocoError(f"{where}: iscrowd must be 0 or 1, got {iscrowd!r}")
    if iscrowd:
        raise CocoError(f"{where}: iscrowd=1 (a crowd region) is not supported: defectsynth treats every "
                        f"annotation as one instance; split the region into instances or remove it")


def validate_coco(data: Coco, source: str = "<coco>", image_root: str | os.PathLike | None = None,
                  check_images: bool = True, progress: bool = False) -> Coco:
    """Check `data` and return a copy with absolute file names and `area`, `bbox`, `iscrowd`
    filled in where missing (area = RLE pixel count, bbox = exact pixel extent).

    Relative file names are resolved against `image_root` (default: the current folder).
    With `check_images`, every image is decoded: missing, unreadable or wrongly sized files are
    errors. Raises `CocoError` naming `source` and the record.
    """
    if not isinstance(data, dict):
        raise CocoError(f"{source}: top level must be an object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoError(f"{source}: missing or non-list '{key}'")
    data = copy.deepcopy(data)
    root = Path(image_root) if image_root is not None else Path.cwd()
    for kind in ("images", "annotations", "categories"):
        _check_ids(data[kind], kind, source)

    categories = {}
    for cat in data["categories"]:
        if not isinstance(cat.get("name"), str) or not cat["name"]:
            raise CocoError(f"{source}: category id={cat['id']} has no name")
        categories[cat["id"]] = cat["name"]

    images, seen_files = {}, {}
    iterator = tqdm(data["images"], desc="checking images", disable=not progress, leave=False)
    for img in iterator:
        where = f"{source}: image id={img['id']}"
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            raise CocoError(f"{where}: missing file_name")
        path = (root / name).resolve() if not os.path.isabs(name) else Path(name)
        img["file_name"] = str(path)
        where += f" (file {path})"
        if str(path) in seen_files:  # two records of one file: its annotations would be split or doubled
            raise CocoError(f"{where}: duplicate file_name, also image id={seen_files[str(path)]}; "
                            f"merge the two records into one")
        seen_files[str(path)] = img["id"]
        for key in ("height", "width"):
            if not _is_id(img.get(key)):
                raise CocoError(f"{where}: '{key}' must be a positive integer, got {img.get(key)!r}")
        if check_images:
            try:
                height, width = image_size(path)
            except ImageReadError as err:
                raise CocoError(f"{where}: image file missing or unreadable: {err}") from err
            if (height, width) != (img["height"], img["width"]):
                raise CocoError(f"{where}: the file is {width}x{height} (w x h) but the record says "
                                f"{img['width']}x{img['height']}")
        images[img["id"]] = img

    for ann in data["annotations"]:
        _check_annotation(ann, images, categories, source)
    return data


def load_coco(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
              check_images: bool = True, progress: bool = True) -> Coco:
    """Read and validate a COCO JSON file (see `validate_coco`); file names become absolute,
    resolved against `image_root` (default: the JSON's folder)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise CocoError(f"{path}: COCO file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CocoError(f"{path}: not valid JSON ({err})") from err
    root = Path(image_root) if image_root is not None else path.parent
    return validate_coco(data, source=str(path), image_root=root.resolve(), check_images=check_images,
                         progress=progress)


def save_coco(data: Coco, path: str | os.PathLike, validate: bool = True) -> None:
    """Write `data` atomically. File names of images inside the JSON's folder (at any depth) are
    stored relative to it, so a self-contained dataset folder can move; other images keep their
    absolute path. Validates first (without decoding images) so an invalid dataset never
    reaches the disk."""
    path = Path(path).resolve()
    if validate:
        validate_coco(data, source=str(path), check_images=False)
    out = copy.deepcopy(data)
    for img in out["images"]:
        name = Path(img["file_name"])
        if name.is_absolute() and name.is_relative_to(path.parent):
            img["file_name"] = name.relative_to(path.parent).as_posix()
    write_json_atomic(path, out)


def to_pycocotools(data: Coco):
    """A `pycocotools.coco.COCO` object over `data` (its index built quietly)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def annotations_by_image(data: Coco) -> dict[int, list[dict]]:
    """image id -> its annotations in id order (images without annotations map to [])."""
    out: dict[int, list[dict]] = {img["id"]: [] for img in data["images"]}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        out.setdefault(ann["image_id"], []).append(ann)
    return out


def category_names(data: Coco) -> dict[int, str]:
    return {c["id"]: c["name"] for c in data["categories"]}


def decode_instances(image: dict, annotations: Sequence[dict]) -> list[tuple[np.ndarray, int]]:
    """The (binary uint8 (H, W) mask, category id) pairs of an image's annotations, in the order
    given (`annotations_by_image` gives id order, the order drivers paint them)."""
    h, w = image["height"], image["width"]
    return [(rle_to_mask(segmentation_to_rle(a["segmentation"], h, w)), int(a["category_id"]))
            for a in annotations]


def image_label_map(image: dict, annotations: Sequence[dict]) -> np.ndarray:
    """uint8 (H, W) category-id map of an image (later annotations on top)."""
    return label_map(decode_instances(image, annotations), (image["height"], image["width"]))


def merge_coco(datasets: Sequence[Coco], sources: Sequence[str] | None = None) -> Coco:
    """Concatenate datasets (e.g. real + synthetic) with fresh ids.

    Categories are matched by name: the first dataset's ids are kept, a new name gets the next
    free id. Image and annotation ids are renumbered 1..N in input order, annotations follow
    their image. With `sources`, every image gets `image["source"] = sources[i]`.
    """
    if sources is not None and len(sources) != len(datasets):
        raise ValueError(f"merge_coco: {len(datasets)} datasets but {len(sources)} sources")
    merged = new_coco([])
    by_name: dict[str, int] = {}
    next_image_id, next_ann_id = 1, 1
    for index, data in enumerate(datasets):
        cat_map = {}
        for cat in data["categories"]:
            if cat["name"] not in by_name:
                new_id = cat["id"] if cat["id"] not in by_name.values() else max(by_name.values()) + 1
                by_name[cat["name"]] = new_id
                merged["categories"].append({**cat, "id": new_id})
            cat_map[cat["id"]] = by_name[cat["name"]]
        image_map = {}
        for img in data["images"]:
            image_map[img["id"]] = next_image_id
            new_img = {**copy.deepcopy(img), "id": next_image_id}
            if sources is not None:
                new_img["source"] = sources[index]
            merged["images"].append(new_img)
            next_image_id += 1
        for ann in sorted(data["annotations"], key=lambda a: a["id"]):
            merged["annotations"].append({**copy.deepcopy(ann), "id": next_ann_id,
                                          "image_id": image_map[ann["image_id"]],
                                          "category_id": cat_map[ann["category_id"]]})
            next_ann_id += 1
    merged["categories"].sort(key=lambda c: c["id"])
    return merged


def _largest_remainder(total: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to `total`, proportional to `fractions` (Hamilton's method; ties go
    to the earlier split)."""
    quotas = [total * f for f in fractions]
    counts = [int(np.floor(q)) for q in quotas]
    order = sorted(range(len(fractions)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def image_strata(data: Coco) -> dict[int, int]:
    """image id -> stratum: the rarest category (fewest instances overall) among its annotations,
    0 for images without annotations."""
    totals = Counter(a["category_id"] for a in data["annotations"])
    cats_of: dict[int, set[int]] = defaultdict(set)
    for ann in data["annotations"]:
        cats_of[ann["image_id"]].add(ann["category_id"])
    return {img["id"]: (min(cats_of[img["id"]], key=lambda c: (totals[c], c)) if cats_of[img["id"]] else 0)
            for img in data["images"]}


def split_coco(data: Coco, fractions: Sequence[float], seed: int = 0, stratify: bool = True,
               names: Sequence[str] | None = None) -> dict[str, Coco]:
    """Split images (with their annotations) into parts of the given fractions (summing to 1).

    Seeded shuffle; with `stratify`, images are grouped by `image_strata` and every group is cut in
    the same proportions (cumulative largest-remainder rounding: each part's total is exact and
    each group's share is within one image of proportional). Ids are kept, so every part's ids
    stay unique and every annotation stays with its image; all parts keep all categories.
    Returns {name: dataset}, names default to "split0", "split1", ...
    """
    fractions = [float(f) for f in fractions]
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_coco: fractions must be >= 0 and sum to 1, got {fractions}")
    names = list(names) if names is not None else [f"split{i}" for i in range(len(fractions))]
    if len(names) != len(fractions) or len(set(names)) != len(names):
        raise ValueError(f"split_coco: need {len(fractions)} distinct names, got {names}")
    rng = np.random.default_rng(seed)
    strata = image_strata(data) if stratify else {img["id"]: 0 for img in data["images"]}
    groups: dict[int, list[int]] = defaultdict(list)
    for image_id in sorted(strata):
        groups[strata[image_id]].append(image_id)
    assigned: list[list[int]] = [[] for _ in fractions]
    done_before = [0] * len(fractions)
    cumulative = 0
    for key in sorted(groups):
        ids = [groups[key][i] for i in rng.permutation(len(groups[key]))]
        cumulative += len(ids)
        targets = _largest_remainder(cumulative, fractions)
        start = 0
        for part, target in enumerate(targets):
            take = target - done_before[part]
            assigned[part].extend(ids[start:start + take])
            start += take
        done_before = targets
    by_image = annotations_by_image(data)
    images = {img["id"]: img for img in data["images"]}
    out = {}
    for name, ids in zip(names, assigned):
        ids = sorted(ids)
        part = {k: copy.deepcopy(v) for k, v in data.items() if k not in ("images", "annotations")}
        part["images"] = [copy.deepcopy(images[i]) for i in ids]
        part["annotations"] = [copy.deepcopy(a) for i in ids for a in by_image[i]]
        out[name] = part
    return out


def _images_of_category(data: Coco) -> dict[int, list[int]]:
    """category id -> sorted ids of the images holding at least one of its instances."""
    found: dict[int, set[int]] = defaultdict(set)
    for ann in data["annotations"]:
        found[ann["category_id"]].add(ann["image_id"])
    return {cat: sorted(ids) for cat, ids in found.items()}


def _select_images(data: Coco, ids: Sequence[int]) -> Coco:
    """A copy of `data` with only the images `ids` (in id order) and their annotations."""
    keep = set(ids)
    part = {k: copy.deepcopy(v) for k, v in data.items() if k not in ("images", "annotations")}
    part["images"] = [copy.deepcopy(img) for img in data["images"] if img["id"] in keep]
    part["annotations"] = [copy.deepcopy(a) for a in data["annotations"] if a["image_id"] in keep]
    return part


def split_every_class(data: Coco, fractions: Sequence[float], seed: int = 0,
                      names: Sequence[str] | None = None) -> dict[str, Coco]:
    """Split by image into parts of exact sizes (largest remainder of len(images) x fractions), with
    every category present in every part when it has at least one image per part.

    First, category by category (fewest images first), every part that lacks the category gets one
    seeded random image holding it that no part has taken yet; then the other images are cut by
    `split_coco` (stratified, seeded) so each part reaches its size. A part smaller than the number
    of categories it must hold grows to hold them; the largest part gives the images back.
    """
    fractions = [float(f) for f in fractions]
    names = list(names) if names is not None else [f"split{i}" for i in range(len(fractions))]
    if len(names) != len(fractions) or len(set(names)) != len(names):
        raise ValueError(f"split_every_class: need {len(fractions)} distinct names, got {names}")
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_every_class: fractions must be > 0 and sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    by_category = _images_of_category(data)
    cats_of: dict[int, set[int]] = defaultdict(set)
    for cat, ids in by_category.items():
        for image_id in ids:
            cats_of[image_id].add(cat)
    taken: dict[int, int] = {}  # image id -> part index
    for cat in sorted(by_category, key=lambda c: (len(by_category[c]), c)):
        if len(by_category[cat]) < len(fractions):
            continue  # too few images to reach every part
        for part in range(len(fractions)):
            if any(cat in cats_of[i] for i, p in taken.items() if p == part):
                continue
            free = [i for i in by_category[cat] if i not in taken]
            if free:
                taken[free[int(rng.integers(len(free)))]] = part
    targets = _largest_remainder(len(data["images"]), fractions)
    seeded = [sum(1 for p in taken.values() if p == part) for part in range(len(fractions))]
    needs = [max(0, t - s) for t, s in zip(targets, seeded)]
    rest = [img["id"] for img in data["images"] if img["id"] not in taken]
    largest = int(np.argmax(fractions))
    needs[largest] += len(rest) - sum(needs)  # parts grown to hold their categories shrink the largest
    while needs[largest] < 0:  # tiny sets: the largest part is already full, so the next largest gives
        needs[largest] += 1
        needs[max((p for p in range(len(needs)) if p != largest and needs[p] > 0), key=lambda p: needs[p])] -= 1
    parts = [sorted(i for i, p in taken.items() if p == part) for part in range(len(fractions))]
    if rest:
        remainder = _select_images(data, rest)
        cut = split_coco(remainder, [n / len(rest) for n in needs], seed=int(rng.integers(2 ** 31)),
                         names=names)
        for part, name in enumerate(names):
            parts[part] += [img["id"] for img in cut[name]["images"]]
    return {name: _select_images(data, ids) for name, ids in zip(names, parts)}


def subset_with_every_class(data: Coco, fraction: float, seed: int = 0) -> Coco:
    """ceil(fraction x images) seeded images holding every category (more when there are more
    categories than that): one random image per category not yet covered (fewest images first),
    then a stratified draw (`split_coco`) of the rest."""
    if not 0 < fraction <= 1:
        raise ValueError(f"subset_with_every_class: fraction must be in (0, 1], got {fraction}")
    total = len(data["images"])
    count = min(total, int(np.ceil(fraction * total - 1e-9)))
    rng = np.random.default_rng(seed)
    by_category = _images_of_category(data)
    chosen: list[int] = []
    covered: set[int] = set()
    for cat in sorted(by_category, key=lambda c: (len(by_category[c]), c)):
        if cat in covered:
            continue
        pick = by_category[cat][int(rng.integers(len(by_category[cat])))]
        chosen.append(pick)
        covered |= {c for c, ids in by_category.items() if pick in ids}
    rest = [img["id"] for img in data["images"] if img["id"] not in set(chosen)]
    need = count - len(chosen)
    if need > 0 and rest:
        cut = split_coco(_select_images(data, rest), [need / len(rest), 1 - need / len(rest)],
                         seed=int(rng.integers(2 ** 31)), names=["take", "leave"])
        chosen += [img["id"] for img in cut["take"]["images"]]
    return _select_images(data, chosen)


def subset_coco(data: Coco, fraction: float, seed: int = 0, stratify: bool = True) -> Coco:
    """A seeded (stratified) fraction of the images, e.g. 0.1 for the paper's 10% experiments."""
    if not 0 < fraction <= 1:
        raise ValueError(f"subset_coco: fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return copy.deepcopy(data)
    return split_coco(data, [fraction, 1 - fraction], seed=seed, stratify=stratify, names=["a", "b"])["a"]


def _summary(values: Sequence[float]) -> dict[str, float]:
    if len(values) == 0:
        return {"count": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {"count": int(arr.size), "min": float(arr.min()), "median": float(np.median(arr)),
            "mean": float(arr.mean()), "max": float(arr.max())}


def coco_stats(data: Coco) -> dict[str, Any]:
    """Counts and distributions: images (with/without annotations), instances and images per
    category, image sizes, mask areas in pixels and as a fraction of the image, per category."""
    images = {img["id"]: img for img in data["images"]}
    names = category_names(data)
    per_cat: dict[int, list[dict]] = {cid: [] for cid in names}
    for ann in data["annotations"]:
        per_cat.setdefault(ann["category_id"], []).append(ann)
    annotated = {a["image_id"] for a in data["annotations"]}
    sizes = Counter((img["width"], img["height"]) for img in data["images"])
    categories = {}
    for cid, anns in sorted(per_cat.items()):
        areas = [a.get("area", 0.0) for a in anns]
        relative = [a.get("area", 0.0) / (images[a["image_id"]]["width"] * images[a["image_id"]]["height"])
                    for a in anns]
        categories[names.get(cid, str(cid))] = {
            "id": cid, "instances": len(anns), "images": len({a["image_id"] for a in anns}),
            "area": _summary(areas), "relative_area": _summary(relative)}
    return {
        "images": len(images),
        "images_with_annotations": len(annotated),
        "images_without_annotations": len(images) - len(annotated),
        "annotations": len(data["annotations"]),
        "categories": categories,
        "width": _summary([img["width"] for img in data["images"]]),
        "height": _summary([img["height"] for img in data["images"]]),
        "distinct_sizes": len(sizes),
        "most_common_sizes": [[w, h, n] for (w, h), n in sizes.most_common(5)],
        "area": _summary([a.get("area", 0.0) for a in data["annotations"]]),
    }


def format_stats(stats: dict[str, Any]) -> str:
    """A short Markdown summary of `coco_stats` output."""
    def row(s: dict) -> str:
        if not s.get("count"):
            return "- | - | - | -"
        return f"{s['min']:.0f} | {s['median']:.0f} | {s['mean']:.1f} | {s['max']:.0f}"

    lines = [f"images: {stats['images']} ({stats['images_with_annotations']} with annotations, "
             f"{stats['images_without_annotations']} without); annotations: {stats['annotations']}",
             f"width min/median/mean/max: {row(stats['width'])}; height: {row(stats['height'])}; "
             f"distinct sizes: {stats['distinct_sizes']}", "",
             "| category | id | instances | images | area px min | median | mean | max | mean area / image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, c in stats["categories"].items():
        rel = c["relative_area"]
        rel_text = f"{100 * rel['mean']:.2f}%" if rel.get("count") else "-"
        lines.append(f"| {name} | {c['id']} | {c['instances']} | {c['images']} | {row(c['area'])} | {rel_text} |")
    return "\n".join(lines)

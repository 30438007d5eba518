"""Importers to COCO: mask folders (one folder per class, or class-index masks), LabelMe JSON
polygons, and plain image folders (defect-free images, no annotations).

    python -m data.importers --format class-folders --root DATA --class-regex 'MT_(.+)' \\
        --exclude-classes free --out runs/mt/defects.json
    python -m data.importers --format images --root DATA/MT_Free/Imgs --image-exts .jpg --out runs/mt/free.json
    python -m data.importers --format class-index --root DATA/images --mask-template '../masks/{stem}.png' \\
        --classes crack blowhole --out coco.json
    python -m data.importers --format labelme --root DATA/labelme --out coco.json

Masks: pixels > `threshold` are defect (anti-aliased masks; class-index masks use their exact
values); instances are connected components (8-connectivity by default: thin diagonal cracks stay
whole) of at least `min_area` pixels. The mask of image `<folder>/<stem>.<ext>` is found at
`<folder>/` + `mask_template` ({stem}, {name}, {ext} are filled in). Segmentations are RLE
(exact) or polygons along pixel edges (exact except holes). Nothing is written until every input
has been read and checked, and the output is written atomically.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from defectsynth.errors import UserError, command
from defectsynth.runconfig import config_from_args, parser_from_dataclass

from .coco import Coco, coco_stats, format_stats, load_coco, new_coco, save_coco
from .files import write_json_atomic
from .images import IMAGE_EXTENSIONS, ImageReadError, image_size, list_images, read_mask
from .masks import connected_instances, mask_to_polygons, mask_to_rle, polygons_to_mask, rle_area, rle_bbox

FORMATS = ("class-folders", "class-index", "labelme", "images")


class DatasetImportError(UserError):
    """An input of an importer is missing or malformed; the message names the file."""


def _annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int, segmentation: str) -> dict:
    rle = mask_to_rle(mask)
    segm = rle if segmentation == "rle" else mask_to_polygons(mask)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segm,
            "area": float(rle_area(rle)), "bbox": rle_bbox(rle), "iscrowd": 0}


def _add_image(coco: Coco, path: Path) -> dict:
    try:
        height, width = image_size(path)
    except ImageReadError as err:
        raise DatasetImportError(str(err)) from err
    img = {"id": len(coco["images"]) + 1, "file_name": str(path.resolve()), "height": height, "width": width}
    coco["images"].append(img)
    return img


def _add_instances(coco: Coco, img: dict, binary: np.ndarray, category_id: int, connectivity: int,
                   min_area: int, segmentation: str) -> int:
    instances = connected_instances(binary, connectivity, min_area)
    for mask in instances:
        coco["annotations"].append(_annotation(mask, len(coco["annotations"]) + 1, img["id"], category_id, segmentation))
    return len(instances)


def _read_matching_mask(image: dict, mask_path: Path) -> np.ndarray:
    try:
        mask = read_mask(mask_path)
    except ImageReadError as err:
        raise DatasetImportError(f"mask of {image['file_name']}: {err}") from err
    if mask.shape[:2] != (image["height"], image["width"]):
        raise DatasetImportError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} (w x h) but its image "
                           f"{image['file_name']} is {image['width']}x{image['height']}")
    return mask


def _mask_path(image: Path, template: str) -> Path:
    return (image.parent / template.format(stem=image.stem, name=image.name, ext=image.suffix)).resolve()


def _images_and_masks(folder: Path, template: str, exts: Sequence[str], missing: str) -> list[tuple[Path, Path | None]]:
    """Images under `folder` with their mask paths; files that are some image's mask are not images."""
    files = [p.resolve() for p in list_images(folder, extensions=exts)]
    masks = {_mask_path(p, template) for p in files}
    pairs = []
    for path in files:
        if path in masks:
            continue
        mask = _mask_path(path, template)
        if not mask.is_file():
            if missing == "error":
                raise DatasetImportError(f"{path}: no mask file at {mask} (mask template {template!r}); "
                                   "use --missing-mask skip or empty to continue without it")
            if missing == "skip":
                continue
            mask = None
        pairs.append((path, mask))
    return pairs


def import_class_folders(root: str | Path, class_regex: str = "(.+)", mask_template: str = "{stem}.png",
                         threshold: int = 127, connectivity: int = 8, min_area: int = 1,
                         free_classes: Sequence[str] = (), exclude_classes: Sequence[str] = (),
                         lowercase: bool = True, image_exts: Sequence[str] = IMAGE_EXTENSIONS,
                         missing_mask: str = "error", segmentation: str = "rle", progress: bool = True) -> Coco:
    """One subfolder of `root` per class, images and masks inside (any depth). The class name is
    the first group of `class_regex` matched against the folder name (folders that do not match
    are ignored), lowercased by default; category ids follow the sorted class names. Folders of a
    `free_classes` class add images without annotations; `exclude_classes` are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetImportError(f"{root}: not a folder")
    pattern = re.compile(class_regex)
    folders: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        match = pattern.fullmatch(sub.name)
        if match:
            name = match.group(1) if match.groups() else match.group(0)
            folders.setdefault(name.lower() if lowercase else name, []).append(sub)
    folders = {k: v for k, v in folders.items() if k not in set(exclude_classes)}
    defect_names = sorted(k for k in folders if k not in set(free_classes))
    if not folders:
        raise DatasetImportError(f"{root}: no subfolder matches class regex {class_regex!r}")
    coco = new_coco(defect_names)
    cat_ids = {name: i + 1 for i, name in enumerate(defect_names)}
    work = [(name, path, mask) for name in sorted(folders) for folder in folders[name]
            for path, mask in _images_and_masks(folder, mask_template, image_exts,
                                                "empty" if name in free_classes else missing_mask)]
    for name, path, mask_path in tqdm(work, desc="importing", disable=not progress):
        img = _add_image(coco, path)
        if name in cat_ids and mask_path is not None:
            mask = _read_matching_mask(img, mask_path)
            binary = (mask.max(axis=2) if mask.ndim == 3 else mask) > threshold
            _add_instances(coco, img, binary, cat_ids[name], connectivity, min_area, segmentation)
    return coco


def import_class_index(root: str | Path, classes: Sequence[str], mask_template: str = "../masks/{stem}.png",
                       ignore_values: Sequence[int] = (255,), connectivity: int = 8, min_area: int = 1,
                       image_exts: Sequence[str] = IMAGE_EXTENSIONS, missing_mask: str = "error",
                       segmentation: str = "rle", progress: bool = True) -> Coco:
    """Images under `root` whose masks hold class indices: value k in 1..len(classes) is class
    `classes[k - 1]` (category id k), 0 and `ignore_values` are background."""
    root = Path(root)
    if not classes:
        raise DatasetImportError("class-index import needs --classes (names of mask values 1, 2, ...)")
    coco = new_coco(list(classes))
    for path, mask_path in tqdm(_images_and_masks(root, mask_template, image_exts, missing_mask),
                                desc="importing", disable=not progress):
        img = _add_image(coco, path)
        if mask_path is None:
            continue
        mask = _read_matching_mask(img, mask_path)
        if mask.ndim == 3:
            raise DatasetImportError(f"{mask_path}: colour mask; class-index masks must be single-channel or palette PNGs")
        values = set(np.unique(mask).tolist()) - {0} - set(ignore_values)
        unknown = sorted(v for v in values if not 1 <= v <= len(classes))
        if unknown:
            raise DatasetImportError(f"{mask_path}: mask values {unknown} have no class (--classes names values 1..{len(classes)})")
        for value in sorted(values):
            _add_instances(coco, img, mask == value, int(value), connectivity, min_area, segmentation)
    return coco


def _labelme_shape_mask(shape: dict, height: int, width: int, line_width: int, where: str) -> np.ndarray | None:
    import cv2

    points = np.asarray(shape.get("points", []), dtype=np.float64).reshape(-1, 2)
    kind = shape.get("shape_type") or "polygon"
    if kind == "polygon":
        if len(points) < 3:
            raise DatasetImportError(f"{where}: polygon with {len(points)} points (needs at least 3)")
        return polygons_to_mask([points.reshape(-1).tolist()], height, width)
    if kind == "rectangle":
        if len(points) != 2:
            raise DatasetImportError(f"{where}: rectangle needs 2 points, got {len(points)}")
        (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
        return polygons_to_mask([[x0, y0, x1, y0, x1, y1, x0, y1]], height, width)
    if kind == "circle":
        if len(points) != 2:
            raise DatasetImportError(f"{where}: circle needs centre and edge points, got {len(points)}")
        mask = np.zeros((height, width), np.uint8)
        radius = int(round(np.hypot(*(points[1] - points[0]))))
        cv2.circle(mask, tuple(int(round(v)) for v in points[0]), max(radius, 1), 1, -1)
        return mask
    if kind in ("line", "linestrip") and line_width > 0:
        mask = np.zeros((height, width), np.uint8)
        cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 1, line_width)
        return mask
    return None  # points, and lines without --line-width, carry no area


def import_labelme(root: str | Path, classes: Sequence[str] = (), line_width: int = 0,
                   segmentation: str = "rle", progress: bool = True) -> Coco:
    """LabelMe JSON files under `root` (any depth). Shapes with the same label and group_id form
    one instance; polygons, rectangles and circles are areas, lines count only with `line_width`
    > 0, points are skipped. Categories: `classes` in that order, else the sorted labels found."""
    root = Path(root)
    files = sorted(root.rglob("*.json")) if root.is_dir() else []
    if not files:
        raise DatasetImportError(f"{root}: no LabelMe .json files found")
    documents = []
    for path in files:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetImportError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(doc, dict) or "shapes" not in doc or "imagePath" not in doc:
            raise DatasetImportError(f"{path}: not a LabelMe file (needs 'shapes' and 'imagePath')")
        documents.append((path, doc))
    labels = list(classes) or sorted({s.get("label", "") for _, d in documents for s in d["shapes"]})
    coco = new_coco(labels)
    cat_ids = {name: i + 1 for i, name in enumerate(labels)}
    for path, doc in tqdm(documents, desc="importing", disable=not progress):
        image_path = (path.parent / doc["imagePath"]).resolve()
        if not image_path.is_file():
            raise DatasetImportError(f"{path}: image {image_path} (imagePath {doc['imagePath']!r}) not found")
        img = _add_image(coco, image_path)
        expected = (doc.get("imageHeight"), doc.get("imageWidth"))
        if None not in expected and tuple(expected) != (img["height"], img["width"]):
            raise DatasetImportError(f"{path}: imageHeight/imageWidth {expected} but {image_path} is "
                               f"{img['height']}x{img['width']} (h x w)")
        groups: dict[tuple, np.ndarray] = {}
        for index, shape in enumerate(doc["shapes"]):
            where = f"{path}: shape {index} ({shape.get('label')!r})"
            if shape.get("label") not in cat_ids:
                raise DatasetImportError(f"{where}: label not in the class list {labels}")
            mask = _labelme_shape_mask(shape, img["height"], img["width"], line_width, where)
            if mask is None:
                continue
            group = shape.get("group_id")
            key = (shape["label"], group if group is not None else f"shape{index}")
            groups[key] = mask if key not in groups else (groups[key] | mask)
        for (label, _), mask in groups.items():
            if mask.any():
                coco["annotations"].append(_annotation(mask, len(coco["annotations"]) + 1, img["id"],
                                                       cat_ids[label], segmentation))
    return coco


def import_image_folder(root: str | Path, image_exts: Sequence[str] = IMAGE_EXTENSIONS,
                        categories: Sequence[str] = (), progress: bool = True) -> Coco:
    """Every image under `root` as a COCO dataset without annotations (defect-free images)."""
    coco = new_coco(list(categories))
    paths = list_images(root, extensions=image_exts)
    if not paths:
        raise DatasetImportError(f"{root}: no images with extensions {list(image_exts)}")
    for path in tqdm(paths, desc="importing", disable=not progress):
        _add_image(coco, path)
    return coco


def load_dataset(path: str | Path, progress: bool = True) -> Coco:
    """A COCO JSON file (validated) or a folder of images (no annotations)."""
    path = Path(path)
    return import_image_folder(path, progress=progress) if path.is_dir() else load_coco(path, progress=progress)


@dataclass(frozen=True)
class ImportConfig:
    """Convert a mask-folder, class-index, LabelMe or plain image dataset to COCO."""
    format: str = field(default="class-folders", metadata={"help": "input layout", "choices": list(FORMATS)})
    root: str = field(default="", metadata={"help": "input folder (required)"})
    out: str = field(default="", metadata={"help": "output COCO JSON (required)"})
    class_regex: str = field(default="(.+)", metadata={"help": "class-folders: folder name -> class (group 1)"})
    mask_template: str = field(default="{stem}.png", metadata={
        "help": "mask path relative to the image's folder; {stem} {name} {ext}"})
    classes: tuple[str, ...] = field(default=(), metadata={"help": "class-index: names of values 1, 2, ...; labelme: class order"})
    free_classes: tuple[str, ...] = field(default=(), metadata={"help": "class-folders: classes imported without annotations"})
    exclude_classes: tuple[str, ...] = field(default=(), metadata={"help": "class-folders: classes to skip"})
    threshold: int = field(default=127, metadata={"help": "class-folders: mask pixels > threshold are defect"})
    connectivity: int = field(default=8, metadata={"help": "connected components", "choices": [4, 8]})
    min_area: int = field(default=1, metadata={"help": "smallest instance kept, pixels"})
    ignore_values: tuple[int, ...] = field(default=(255,), metadata={"help": "class-index: values treated as background"})
    line_width: int = field(default=0, metadata={"help": "labelme: width for line shapes (0 skips them)"})
    image_exts: tuple[str, ...] = field(default=IMAGE_EXTENSIONS, metadata={"help": "image file extensions"})
    missing_mask: str = field(default="error", metadata={"help": "image without mask", "choices": ["error", "skip", "empty"]})
    segmentation: str = field(default="rle", metadata={"help": "output segmentation", "choices": ["rle", "polygon"]})
    stats_json: str = field(default="", metadata={"help": "also write the statistics here"})


def likely_format(root: str | Path, image_exts: Sequence[str] = IMAGE_EXTENSIONS) -> str:
    """A guess at --format from what lies in `root`, for the error message of an empty import."""
    root = Path(root)
    if not root.is_dir():
        return ""
    exts = tuple(e.lower() for e in image_exts)
    top = [p for p in root.iterdir() if p.is_file()]
    if any(p.suffix == ".json" for p in top):
        return "labelme"
    if any(p.suffix.lower() in exts for p in top):  # class-folders reads images in subfolders only
        return "images (no annotations) or class-index (class-index masks beside the images)"
    subfolders = [p for p in root.iterdir() if p.is_dir()]
    if any(any(q.suffix.lower() in exts for q in folder.rglob("*")) for folder in subfolders):
        return "class-folders (one subfolder of images and masks per class)"
    return ""


def check_not_empty(coco: Coco, cfg: "ImportConfig") -> None:
    """Zero images, or zero annotations where annotations are expected, is a wrong layout or
    --format, not a dataset: refuse it with the likely --format instead of writing an empty COCO."""
    expects_annotations = cfg.format != "images" and not cfg.free_classes
    if coco["images"] and (coco["annotations"] or not expects_annotations):
        return
    what = "no images" if not coco["images"] else f"{len(coco['images'])} images but no annotations"
    guess = likely_format(cfg.root, cfg.image_exts)
    hint = f"; its layout looks like --format {guess}" if guess and not guess.startswith(cfg.format + " ") else ""
    raise DatasetImportError(f"{cfg.root}: --format {cfg.format} found {what}{hint} (see python -m data.importers "
                             f"--help; nothing written to {cfg.out})")


def get_args_parser():
    return parser_from_dataclass(ImportConfig, prog="python -m data.importers")


def main(cfg: ImportConfig) -> Coco:
    if not cfg.root or not cfg.out:
        raise UserError("data.importers: --root and --out are required")
    start = time.perf_counter()
    common = dict(image_exts=cfg.image_exts)
    if cfg.format == "class-folders":
        coco = import_class_folders(cfg.root, cfg.class_regex, cfg.mask_template, cfg.threshold, cfg.connectivity,
                                    cfg.min_area, cfg.free_classes, cfg.exclude_classes, missing_mask=cfg.missing_mask,
                                    segmentation=cfg.segmentation, **common)
    elif cfg.format == "class-index":
        coco = import_class_index(cfg.root, cfg.classes, cfg.mask_template, cfg.ignore_values, cfg.connectivity,
                                  cfg.min_area, missing_mask=cfg.missing_mask, segmentation=cfg.segmentation, **common)
    elif cfg.format == "labelme":
        coco = import_labelme(cfg.root, cfg.classes, cfg.line_width, cfg.segmentation)
    else:
        coco = import_image_folder(cfg.root, categories=cfg.classes, **common)
    check_not_empty(coco, cfg)  # before: an empty COCO was written and the mistake surfaced stages later
    save_coco(coco, cfg.out)
    stats = coco_stats(coco)
    stats["seconds"] = round(time.perf_counter() - start, 2)
    if cfg.stats_json:
        write_json_atomic(cfg.stats_json, stats, indent=2)
    print(format_stats(stats))
    print(f"wrote {cfg.out} in {stats['seconds']} s")
    return coco


@command("import")
def cli(argv: list[str] | None = None) -> int:
    main(config_from_args(ImportConfig, get_args_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

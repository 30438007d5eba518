"""The procedural demo dataset: small industrial-looking surfaces with crack, blowhole and scratch
defects, plus defect-free images, deterministic from a seed and written in seconds.

    python -m data.demo --out runs/demo --seed 0

writes
    DIR/images/defect_0000.png ...   defective images (size x size RGB)
    DIR/free/free_0000.png ...       defect-free images
    DIR/annotations.json             COCO of the defective images (RLE masks, one instance per defect)
    DIR/free.json                    COCO of the defect-free images (no annotations), written last

Surfaces are brushed metal (streaks along one axis) or ceramic (mottled, fine speckle) with low-
frequency shading and a lighting gradient. Defects (category ids in this order):
    1 crack     thin dark branching polyline (random walk, 8-connected: one instance per crack)
    2 blowhole  dark round/elliptic pit with a lit rim
    3 scratch   long thin bright, slightly curved line
Image i is generated from (seed, kind, i) alone.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from defectsynth.errors import UserError, command
from defectsynth.runconfig import config_from_args, parser_from_dataclass

from .coco import Coco, new_coco, save_coco
from .files import write_image_atomic
from .masks import mask_to_rle, rle_area, rle_bbox
from .seeding import rng_for

DEFECT_CLASSES: tuple[str, ...] = ("crack", "blowhole", "scratch")


def generate_surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """A defect-free metal or ceramic surface, uint8 RGB (size, size, 3)."""
    base = rng.uniform(90, 170)
    coarse = rng.normal(0, 1, size=(max(2, size // 16),) * 2).astype(np.float32)
    shading = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) * rng.uniform(6, 16)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (np.cos(angle) * xx + np.sin(angle) * yy - 0.5) * rng.uniform(10, 40)
    fine = rng.normal(0, 1, size=(size, size)).astype(np.float32)
    if rng.random() < 0.5:  # brushed metal: streaks along one axis
        length = int(size // 4) | 1
        kernel = (length, 1) if rng.random() < 0.5 else (1, length)
        texture = cv2.blur(fine, kernel) * math.sqrt(length) * rng.uniform(4, 8) + fine * 2.0
        tint = np.array([1.0, 1.0, 1.02])
    else:  # ceramic: mottled blobs and speckle
        texture = cv2.GaussianBlur(fine, (0, 0), 2.0) * rng.uniform(8, 14) + fine * rng.uniform(2, 5)
        tint = np.array([1.03, 1.0, 0.95])
    gray = base + shading + gradient + texture
    rgb = gray[:, :, None] * tint[None, None, :]
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _walk(rng: np.random.Generator, start: np.ndarray, angle: float, steps: int, step: float) -> np.ndarray:
    points = [start]
    for _ in range(steps):
        angle += rng.normal(0, 0.35)
        points.append(points[-1] + step * np.array([math.cos(angle), math.sin(angle)]))
    return np.round(np.array(points)).astype(np.int32)


def draw_crack(mask: np.ndarray, rng: np.random.Generator) -> None:
    """A branching random-walk polyline (LINE_8, so the crack is one 8-connected component)."""
    size = mask.shape[0]
    start = rng.uniform(0.2, 0.8, size=2) * size
    trunk = _walk(rng, start, rng.uniform(0, 2 * math.pi), int(rng.integers(12, 24)), size / 40)
    cv2.polylines(mask, [trunk], False, 1, 1, lineType=cv2.LINE_8)
    for _ in range(int(rng.integers(0, 3))):
        origin = trunk[int(rng.integers(1, len(trunk)))].astype(np.float64)
        branch = _walk(rng, origin, rng.uniform(0, 2 * math.pi), int(rng.integers(4, 10)), size / 40)
        cv2.polylines(mask, [branch], False, 1, 1, lineType=cv2.LINE_8)


def draw_blowhole(mask: np.ndarray, rng: np.random.Generator) -> None:
    size = mask.shape[0]
    center = tuple(int(v) for v in rng.uniform(0.15, 0.85, size=2) * size)
    axes = tuple(int(max(2, v)) for v in rng.uniform(0.02, 0.06, size=2) * size)
    cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)


def draw_scratch(mask: np.ndarray, rng: np.random.Generator) -> None:
    size = mask.shape[0]
    start = rng.uniform(0.1, 0.9, size=2) * size
    angle = rng.uniform(0, math.pi)
    length = rng.uniform(0.3, 0.6) * size
    bend = rng.normal(0, 0.08) * size
    t = np.linspace(0, 1, 24)[:, None]
    direction, normal = np.array([math.cos(angle), math.sin(angle)]), np.array([-math.sin(angle), math.cos(angle)])
    points = start + t * length * direction + (4 * t * (1 - t)) * bend * normal
    cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 1, 1, lineType=cv2.LINE_8)


DRAW = {"crack": draw_crack, "blowhole": draw_blowhole, "scratch": draw_scratch}


def render_defect(image: np.ndarray, mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Darken (crack, blowhole) or brighten (scratch) the defect pixels, with a soft edge."""
    work = image.astype(np.float32)
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.6)
    soft = np.maximum(soft, mask.astype(np.float32))[:, :, None]
    if kind == "scratch":
        work += soft * rng.uniform(40, 70)
    else:
        work *= 1 - soft * rng.uniform(0.55, 0.8)
        if kind == "blowhole":  # a lit rim on the lower-right side
            rim = cv2.dilate(mask, np.ones((3, 3), np.uint8)) - mask
            rim_shift = np.roll(np.roll(rim, 1, axis=0), 1, axis=1) * (1 - mask)
            work += rim_shift[:, :, None].astype(np.float32) * rng.uniform(25, 45)
    return np.clip(np.round(work), 0, 255).astype(np.uint8)


def generate_defective(rng: np.random.Generator, size: int, classes: tuple[str, ...] = DEFECT_CLASSES,
                       max_defects: int = 3) -> tuple[np.ndarray, list[tuple[np.ndarray, int]]]:
    """A surface with 1..max_defects non-overlapping defects: (image, [(mask, category id)]),
    category id = position in `classes` + 1."""
    image = generate_surface(rng, size)
    occupied = np.zeros((size, size), np.uint8)
    instances: list[tuple[np.ndarray, int]] = []
    for _ in range(int(rng.integers(1, max_defects + 1))):
        for _attempt in range(10):
            class_index = int(rng.integers(len(classes)))
            mask = np.zeros((size, size), np.uint8)
            DRAW[classes[class_index]](mask, rng)
            # one 8-connected piece (a walk leaving the frame and coming back would make two)
            if (mask.sum() >= 4 and not np.any(occupied & mask)
                    and cv2.connectedComponents(mask, connectivity=8)[0] == 2):
                occupied |= cv2.dilate(mask, np.ones((5, 5), np.uint8))
                image = render_defect(image, mask, classes[class_index], rng)
                instances.append((mask, class_index + 1))
                break
    return image, instances


@dataclass(frozen=True)
class DemoConfig:
    """Write the procedural demo dataset (defective images with COCO masks + defect-free images)."""
    out: str = field(default="", metadata={"help": "output folder (required)"})
    seed: int = field(default=0, metadata={"help": "dataset seed"})
    size: int = field(default=128, metadata={"help": "image side, pixels"})
    num_defective: int = field(default=24, metadata={"help": "defective images"})
    num_free: int = field(default=24, metadata={"help": "defect-free images"})
    classes: tuple[str, ...] = field(default=DEFECT_CLASSES, metadata={
        "help": f"defect classes, from {list(DEFECT_CLASSES)}"})
    max_defects: int = field(default=3, metadata={"help": "most defects per image"})


def make_demo_dataset(cfg: DemoConfig, progress: bool = True) -> tuple[Coco, Coco]:
    """Generate and write the dataset; returns (defective COCO, defect-free COCO)."""
    unknown = sorted(set(cfg.classes) - set(DRAW))
    if unknown or not cfg.classes:
        raise UserError(f"DemoConfig.classes: unknown {unknown}; choose from {list(DEFECT_CLASSES)}")
    if not cfg.out:
        raise UserError("data.demo: --out is required")
    out = Path(cfg.out).resolve()
    defects, free = new_coco(list(cfg.classes)), new_coco(list(cfg.classes))
    for i in tqdm(range(cfg.num_defective), desc="demo defective", disable=not progress):
        image, instances = generate_defective(rng_for(cfg.seed, "defect", i), cfg.size, tuple(cfg.classes), cfg.max_defects)
        path = out / "images" / f"defect_{i:04d}.png"
        write_image_atomic(path, image)
        defects["images"].append({"id": i + 1, "file_name": str(path), "height": cfg.size, "width": cfg.size})
        for mask, category_id in instances:
            rle = mask_to_rle(mask)
            defects["annotations"].append({"id": len(defects["annotations"]) + 1, "image_id": i + 1,
                                           "category_id": category_id, "segmentation": rle,
                                           "area": float(rle_area(rle)), "bbox": rle_bbox(rle), "iscrowd": 0})
    for i in tqdm(range(cfg.num_free), desc="demo defect-free", disable=not progress):
        path = out / "free" / f"free_{i:04d}.png"
        write_image_atomic(path, generate_surface(rng_for(cfg.seed, "free", i), cfg.size))
        free["images"].append({"id": i + 1, "file_name": str(path), "height": cfg.size, "width": cfg.size})
    save_coco(defects, out / "annotations.json")
    save_coco(free, out / "free.json")
    return defects, free


def main(cfg: DemoConfig) -> tuple[Coco, Coco]:
    defects, free = make_demo_dataset(cfg)
    print(f"wrote {len(defects['images'])} defective images ({len(defects['annotations'])} instances) and "
          f"{len(free['images'])} defect-free images to {cfg.out}")
    return defects, free


def get_args_parser():
    return parser_from_dataclass(DemoConfig, prog="python -m data.demo")


@command("demo-data")
def cli(argv: list[str] | None = None) -> int:
    main(config_from_args(DemoConfig, get_args_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

"""Offline augmentation of defect-free images (paper 5.1): N variants per image (default 10) from
crop, zoom, roto-translation, Gaussian noise and contrast/brightness changes.

One affine matrix per variant holds every geometric change, so masks (when given) go through
exactly the same warp as the image: bilinear with reflected borders for the image, nearest
neighbour with zero borders for masks. Variant v of an image is seeded by (seed, image id, v)
(`augment_dataset`; `augment_variant` takes the image's seed and v), so it can be rebuilt alone.

    python -m data.augment --data free.json --out runs/free_aug --variants 10 --seed 0
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import cv2
import numpy as np
from tqdm import tqdm

from defectsynth.errors import UserError, command
from defectsynth.runconfig import config_from_args, config_to_dict, parser_from_dataclass

from .coco import Coco, annotations_by_image, decode_instances, new_coco, save_coco
from .files import write_image_atomic, write_json_atomic
from .images import read_image
from .masks import mask_to_rle, rle_area, rle_bbox
from .seeding import derive_seed, rng_for

Masks = Union[None, np.ndarray, Sequence[np.ndarray]]
BORDERS = {"reflect": cv2.BORDER_REFLECT_101, "replicate": cv2.BORDER_REPLICATE, "constant": cv2.BORDER_CONSTANT}


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random changes; every variant draws one value from each."""
    variants: int = field(default=10, metadata={"help": "variants per image"})
    crop_scale: tuple[float, ...] = field(default=(0.75, 1.0), metadata={
        "help": "side of a random crop as a fraction of the image side (min max); resized back to full size"})
    zoom: tuple[float, ...] = field(default=(0.9, 1.1), metadata={
        "help": "extra zoom about the centre (min max); < 1 zooms out with reflected borders"})
    rotation: float = field(default=15.0, metadata={"help": "maximum rotation, degrees (either way)"})
    translate: float = field(default=0.05, metadata={"help": "maximum shift, fraction of the side"})
    noise_std: tuple[float, ...] = field(default=(0.0, 6.0), metadata={
        "help": "Gaussian noise sigma range, grey levels (same noise on the three channels)"})
    contrast: tuple[float, ...] = field(default=(0.8, 1.2), metadata={"help": "gain about the image mean (min max)"})
    brightness: tuple[float, ...] = field(default=(-12.0, 12.0), metadata={"help": "offset, grey levels (min max)"})
    hflip_p: float = field(default=0.0, metadata={"help": "probability of a horizontal flip"})
    vflip_p: float = field(default=0.0, metadata={"help": "probability of a vertical flip"})
    border: str = field(default="reflect", metadata={"help": "image border fill", "choices": sorted(BORDERS)})

    def __post_init__(self) -> None:
        for name in ("crop_scale", "zoom", "noise_std", "contrast", "brightness"):
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"AugmentConfig.{name} must be (min, max) with min <= max, got {value}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"AugmentConfig.crop_scale must lie in (0, 1], got {self.crop_scale}")
        if self.zoom[0] <= 0:
            raise ValueError(f"AugmentConfig.zoom must be > 0, got {self.zoom}")
        if self.border not in BORDERS:
            raise ValueError(f"AugmentConfig.border must be one of {sorted(BORDERS)}, got {self.border!r}")


def random_affine(height: int, width: int, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """A 2x3 matrix (source -> output pixel coordinates) combining crop, zoom, rotation,
    translation and flips, drawn from `rng`."""
    crop = rng.uniform(*config.crop_scale)
    ox, oy = rng.uniform(0, (1 - crop) * width), rng.uniform(0, (1 - crop) * height)
    zoom = rng.uniform(*config.zoom)
    angle = math.radians(rng.uniform(-config.rotation, config.rotation))
    tx, ty = rng.uniform(-config.translate, config.translate, size=2) * (width, height)
    flip_x, flip_y = rng.random() < config.hflip_p, rng.random() < config.vflip_p
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # Crop window (ox, oy, crop * size) -> full frame, pixel centres at integer coordinates.
    m_crop = np.array([[1 / crop, 0, (0.5 - ox) / crop - 0.5], [0, 1 / crop, (0.5 - oy) / crop - 0.5], [0, 0, 1]])
    cos, sin = math.cos(angle) * zoom, math.sin(angle) * zoom
    # Zoom and rotate about the centre, then shift.
    m_rot = np.array([[cos, -sin, cx - cos * cx + sin * cy + tx], [sin, cos, cy - sin * cx - cos * cy + ty], [0, 0, 1]])
    m_flip = np.array([[-1.0 if flip_x else 1.0, 0, width - 1 if flip_x else 0],
                       [0, -1.0 if flip_y else 1.0, height - 1 if flip_y else 0], [0, 0, 1]])
    return (m_flip @ m_rot @ m_crop)[:2]


def warp_masks(masks: Masks, matrix: np.ndarray, size: tuple[int, int]) -> Masks:
    """Warp a label map or a list of masks with nearest neighbour, zero outside the source."""
    height, width = size

    def warp(mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask)
        dtype = mask.dtype
        work = mask.astype(np.uint8) if dtype == bool else mask
        out = cv2.warpAffine(work, matrix, (width, height), flags=cv2.INTER_NEAREST,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return out.astype(dtype)

    if masks is None:
        return None
    if isinstance(masks, np.ndarray):
        return warp(masks)
    return [warp(m) for m in masks]


def photometric(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """Contrast about the mean, brightness offset and Gaussian noise, clipped to uint8."""
    gain, offset = rng.uniform(*config.contrast), rng.uniform(*config.brightness)
    sigma = rng.uniform(*config.noise_std)
    work = image.astype(np.float32)
    mean = work.mean()
    work = (work - mean) * gain + mean + offset
    work += rng.normal(0.0, sigma, size=image.shape[:2])[:, :, None].astype(np.float32)  # one noise for all channels
    return np.clip(np.round(work), 0, 255).astype(np.uint8)


def augment_image(image: np.ndarray, rng: np.random.Generator | int, config: AugmentConfig = AugmentConfig(),
                  masks: Masks = None) -> tuple[np.ndarray, Masks]:
    """One random variant of a uint8 RGB (H, W, 3) image (same size), and the masks warped alike.

    `masks`: None, a (H, W) label map or a list of (H, W) masks. `rng`: a Generator or a seed.
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    height, width = image.shape[:2]
    matrix = random_affine(height, width, rng, config)
    border = BORDERS[config.border]
    warped = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=border)
    return photometric(warped, rng, config), warp_masks(masks, matrix, (height, width))


def augment_variants(image: np.ndarray, seed: int, config: AugmentConfig = AugmentConfig(),
                     masks: Masks = None) -> list[tuple[np.ndarray, Masks]]:
    """`config.variants` variants; variant v uses `rng_for(seed, "augment", v)` (see `augment_variant`)."""
    return [augment_variant(image, seed, v, config, masks) for v in range(config.variants)]


def augment_variant(image: np.ndarray, seed: int, variant: int, config: AugmentConfig = AugmentConfig(),
                    masks: Masks = None) -> tuple[np.ndarray, Masks]:
    """Variant number `variant` of an image, rebuilt alone from (seed, variant)."""
    return augment_image(image, rng_for(seed, "augment", variant), config, masks)


def augment_dataset(data: Coco, out_dir: str | Path, config: AugmentConfig = AugmentConfig(), seed: int = 0,
                    ext: str = ".png", progress: bool = True) -> Coco:
    """Write `config.variants` variants of every image of `data` under `out_dir/images/` and their
    COCO (annotations warped alike; instances that leave the frame entirely are dropped) as
    `out_dir/annotations.json`, written last. Image v of image id i is seeded by (seed, i, v);
    existing variant files are kept, so an interrupted run resumes."""
    out_dir = Path(out_dir)
    config_path = out_dir / "augment_config.json"
    settings = {"seed": seed, "ext": ext, **config_to_dict(config)}
    if config_path.exists():
        import json

        previous = json.loads(config_path.read_text(encoding="utf-8"))
        if previous != settings:
            raise UserError(f"{config_path}: {out_dir} holds variants made with other settings "
                             f"({previous}); use another --out or delete it")
    write_json_atomic(config_path, settings, indent=2)
    by_image = annotations_by_image(data)
    out = new_coco(data["categories"])
    for img in tqdm(data["images"], desc="augmenting", disable=not progress):
        image = None
        instances = decode_instances(img, by_image[img["id"]])
        for v in range(config.variants):
            path = out_dir / "images" / f"{Path(img['file_name']).stem}_id{img['id']}_v{v}{ext}"
            need_pixels = not path.exists() or instances
            if need_pixels and image is None:
                image = read_image(img["file_name"])
            masks = [m for m, _ in instances]
            if need_pixels:
                variant, warped = augment_variant(image, derive_seed(seed, img["id"]), v, config, masks)
                if not path.exists():
                    write_image_atomic(path, variant)
            new_id = len(out["images"]) + 1
            out["images"].append({"id": new_id, "file_name": str(path.resolve()), "height": img["height"],
                                  "width": img["width"], "source_image": img["file_name"], "variant": v})
            for mask, (_, category_id) in zip(warped if instances else [], instances):
                rle = mask_to_rle(mask)
                if rle_area(rle) > 0:
                    out["annotations"].append({"id": len(out["annotations"]) + 1, "image_id": new_id,
                                               "category_id": category_id, "segmentation": rle,
                                               "area": float(rle_area(rle)), "bbox": rle_bbox(rle), "iscrowd": 0})
    save_coco(out, out_dir / "annotations.json")
    return out


@dataclass(frozen=True)
class AugmentRunConfig(AugmentConfig):
    """Write N augmented variants of every image of a COCO file or image folder."""
    data: str = field(default="", metadata={"help": "COCO JSON or folder of images (required)"})
    out: str = field(default="", metadata={"help": "output folder (required)"})
    seed: int = field(default=0, metadata={"help": "run seed"})
    ext: str = field(default=".png", metadata={"help": "output image format", "choices": [".png", ".jpg"]})


def get_args_parser():
    return parser_from_dataclass(AugmentRunConfig, prog="python -m data.augment")


def main(cfg: AugmentRunConfig) -> Coco:
    from .importers import load_dataset

    if not cfg.data or not cfg.out:
        raise UserError("data.augment: --data and --out are required")
    config = AugmentConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(AugmentConfig)})
    data = load_dataset(cfg.data)
    out = augment_dataset(data, cfg.out, config, seed=cfg.seed, ext=cfg.ext)
    print(f"wrote {len(out['images'])} images and {Path(cfg.out) / 'annotations.json'}")
    return out


@command("augment")
def cli(argv: list[str] | None = None) -> int:
    cfg = config_from_args(AugmentRunConfig, get_args_parser().parse_args(argv))
    main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(cli())

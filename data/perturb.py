"""Random shape perturbation of annotated defect masks and their placement in a new frame
(paper 4.3): affine (rotation, scale, shear, flip), elastic (smoothed random displacement) and
morphological (dilate, erode, open, close) changes, then a position inside the target image.

An instance is kept only when it is valid: non-empty, at least `min_area` pixels, entirely inside
the frame and (by default) not overlapping instances placed before it. Invalid draws are retried
up to `max_tries` times. All randomness comes from the `rng` the caller passes in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from .coco import Coco, annotations_by_image, decode_instances
from .masks import crop_to_content

MORPH_OPS = {"dilate": cv2.MORPH_DILATE, "erode": cv2.MORPH_ERODE, "open": cv2.MORPH_OPEN, "close": cv2.MORPH_CLOSE}


@dataclass(frozen=True)
class PerturbConfig:
    rotation: float = 30.0                 # maximum |angle|, degrees
    scale: tuple[float, float] = (0.8, 1.2)  # isotropic scale range (times the base scale)
    shear: float = 10.0                    # maximum |shear angle|, degrees
    flip_p: float = 0.5                    # probability of a horizontal flip
    elastic_p: float = 0.5                 # probability of an elastic deformation
    elastic_alpha: float = 3.0             # maximum displacement, pixels
    elastic_sigma: float = 8.0             # smoothing of the displacement field, pixels
    morph_p: float = 0.3                   # probability of one morphological operation
    morph_ops: tuple[str, ...] = ("dilate", "erode", "open", "close")
    morph_kernel: int = 3                  # elliptical kernel side, pixels
    min_area: int = 16                     # smallest valid instance, pixels
    max_tries: int = 10                    # draws per instance before giving up
    allow_overlap: bool = False            # may a placed instance touch earlier ones?

    def __post_init__(self) -> None:
        unknown = set(self.morph_ops) - set(MORPH_OPS)
        if unknown:
            raise ValueError(f"PerturbConfig.morph_ops: unknown {sorted(unknown)}; choose from {sorted(MORPH_OPS)}")
        if self.scale[0] <= 0 or self.scale[0] > self.scale[1]:
            raise ValueError(f"PerturbConfig.scale must be (min, max) with 0 < min <= max, got {self.scale}")


@dataclass(frozen=True)
class SourceInstance:
    """One annotated instance, stored as its tight crop."""
    mask: np.ndarray                 # uint8 (h, w) {0, 1}, tight crop
    category_id: int
    center: tuple[float, float]      # (x, y) of the crop centre relative to the source frame, 0..1
    frame: tuple[int, int]           # source image (H, W)
    image_id: int
    annotation_id: int


def instance_bank(data: Coco, category_ids: Sequence[int] | None = None) -> list[SourceInstance]:
    """Every annotation of `data` (optionally only some categories) as a `SourceInstance`,
    in image order then annotation-id order."""
    bank = []
    by_image = annotations_by_image(data)
    for img in data["images"]:
        anns = [a for a in by_image[img["id"]] if category_ids is None or a["category_id"] in category_ids]
        for ann, (mask, category_id) in zip(anns, decode_instances(img, anns)):
            crop, (y, x) = crop_to_content(mask)
            if crop.size == 0:
                continue
            h, w = crop.shape
            center = ((x + w / 2) / img["width"], (y + h / 2) / img["height"])
            bank.append(SourceInstance(crop, category_id, center, (img["height"], img["width"]),
                                       img["id"], ann["id"]))
    return bank


def perturb_mask(mask: np.ndarray, rng: np.random.Generator, config: PerturbConfig = PerturbConfig(),
                 base_scale: float = 1.0) -> np.ndarray:
    """A randomly deformed copy of a binary mask, returned as its tight uint8 crop ((0, 0) when
    the deformation erased it). `base_scale` multiplies the random scale (e.g. the ratio of the
    target frame to the source frame). Warps use nearest neighbour so thin cracks keep their
    width instead of fading under interpolation."""
    crop, _ = crop_to_content(mask)
    if crop.size == 0:
        return crop
    scale = base_scale * rng.uniform(*config.scale)
    angle = rng.uniform(-config.rotation, config.rotation)
    shear = math.tan(math.radians(rng.uniform(-config.shear, config.shear)))
    flip = rng.random() < config.flip_p
    do_elastic = rng.random() < config.elastic_p
    do_morph = rng.random() < config.morph_p and len(config.morph_ops) > 0
    h, w = crop.shape
    # A square canvas large enough for any rotation/shear of the scaled crop plus the elastic/morph margin.
    margin = int(math.ceil(config.elastic_alpha)) + config.morph_kernel + 2
    side = int(math.ceil(math.hypot(h, w) * scale * (1 + abs(shear)))) + 2 * margin
    c = (side - 1) / 2
    # source crop centre -> canvas centre: flip, shear, rotate + scale.
    to_origin = np.array([[-1.0 if flip else 1.0, 0, (w - 1) / 2 if flip else -(w - 1) / 2],
                          [0, 1, -(h - 1) / 2], [0, 0, 1]])
    m_shear = np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]])
    m_rot = np.vstack([cv2.getRotationMatrix2D((0, 0), angle, scale), [0, 0, 1]])
    to_canvas = np.array([[1, 0, c], [0, 1, c], [0, 0, 1]])
    matrix = (to_canvas @ m_rot @ m_shear @ to_origin)[:2]
    out = cv2.warpAffine(crop, matrix, (side, side), flags=cv2.INTER_NEAREST, borderValue=0)
    if do_elastic and config.elastic_alpha > 0:
        fields = []
        for _ in range(2):
            noise = rng.uniform(-1, 1, size=(side, side)).astype(np.float32)
            smooth = cv2.GaussianBlur(noise, (0, 0), config.elastic_sigma)
            fields.append(smooth / (np.abs(smooth).max() + 1e-8) * config.elastic_alpha)
        grid_y, grid_x = np.mgrid[0:side, 0:side].astype(np.float32)
        out = cv2.remap(out, grid_x + fields[0], grid_y + fields[1], cv2.INTER_NEAREST, borderValue=0)
    if do_morph:
        op = config.morph_ops[int(rng.integers(len(config.morph_ops)))]
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (config.morph_kernel, config.morph_kernel))
        out = cv2.morphologyEx(out, MORPH_OPS[op], kernel)
    return crop_to_content(out)[0]


def place_mask(crop: np.ndarray, frame: tuple[int, int], rng: np.random.Generator,
               center: tuple[float, float] | None = None, jitter: float = 0.0,
               occupied: np.ndarray | None = None) -> np.ndarray | None:
    """Put a tight crop into an (H, W) frame: centred on `center` (pixels, moved by up to
    `jitter` x frame size either way) or at a uniformly random position. Returns the full uint8
    mask, or None when the crop does not fit entirely inside the frame or touches `occupied`."""
    height, width = frame
    h, w = crop.shape
    if h == 0 or h > height or w > width:
        return None
    if center is None:
        y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    else:
        dx, dy = rng.uniform(-jitter, jitter, size=2) * (width, height)
        x, y = int(round(center[0] + dx - w / 2)), int(round(center[1] + dy - h / 2))
        if x < 0 or y < 0 or x + w > width or y + h > height:
            return None
    full = np.zeros(frame, dtype=np.uint8)
    full[y:y + h, x:x + w] = crop
    if occupied is not None and np.any(occupied[full != 0]):
        return None
    return full


def is_valid_instance(mask: np.ndarray | None, frame: tuple[int, int], min_area: int) -> bool:
    """Non-empty, of the frame's size (so inside it) and at least `min_area` pixels."""
    return mask is not None and mask.shape == tuple(frame) and int(np.count_nonzero(mask)) >= max(1, min_area)


def sample_instance(source: np.ndarray, frame: tuple[int, int], rng: np.random.Generator,
                    config: PerturbConfig = PerturbConfig(), base_scale: float = 1.0,
                    center: tuple[float, float] | None = None, jitter: float = 0.0,
                    occupied: np.ndarray | None = None) -> np.ndarray | None:
    """Perturb `source` and place it in `frame` until the result is valid (at most
    `config.max_tries` draws); None when every draw failed."""
    for _ in range(config.max_tries):
        crop = perturb_mask(source, rng, config, base_scale)
        if crop.size == 0 or int(crop.sum()) < config.min_area:
            continue
        full = place_mask(crop, frame, rng, center, jitter, None if config.allow_overlap else occupied)
        if is_valid_instance(full, frame, config.min_area):
            return full
    return None

"""SADF pairs (paper 4.3): a defect-free image variant, perturbed masks drawn from the annotated
set and placed in it, the topological driver of the two, and the prompt naming the classes.

Pair p is built from `rng_for(seed, "pair", p)` alone, so any pair can be rebuilt on its own:

    free image  = images[(p // V) % N]       (N defect-free images, V = config.variants)
    variant     = p % V                      (augment.augment_variant, seeded by (seed, image id): the
                                              same random draws as `data.augment`'s offline variants, applied
                                              to the already resized image, so the pixels differ)
    masks       = draw="image":     all instances of one random annotated image, each perturbed
                                    and placed near its original relative position;
                  draw="instances": k random instances (k in config.instances), random positions
    driver      = topological_driver(image variant, kept instances in draw order)
    prompt      = prompts.make_prompt(class names of the kept instances)

Instances that come out invalid (see perturb.py) are dropped; when a draw keeps none, up to
`max_draws` new draws are made, and a pair that still has none gets the defect-free prompt.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from .augment import AugmentConfig, augment_variant
from .coco import Coco, category_names
from .drivers import DriverConfig, topological_driver
from .images import read_image
from .masks import label_map, mask_to_rle, rle_area, rle_bbox
from .perturb import PerturbConfig, SourceInstance, instance_bank, sample_instance
from .prompts import PromptConfig, make_prompt
from .resize import check_resolution, resize_and_crop
from .seeding import derive_seed, rng_for

DRAW_MODES = ("image", "instances")


@dataclass(frozen=True)
class PairingConfig:
    resolution: int | None = 512          # free images are resized + centre-cropped to this (None: as is)
    variants: int = 10                    # augmented variants per free image (0: the image itself)
    draw: str = "image"                   # "image" or "instances", see the module docstring
    instances: tuple[int, int] = (1, 3)   # how many instances for draw="instances"
    relative_size: bool = True            # scale masks by target side / source side
    position_jitter: float = 0.1          # draw="image": shift from the source position, x frame size
    max_draws: int = 5                    # new draws when one keeps no instance
    category_ids: tuple[int, ...] | None = None  # draw only these classes (None: all)
    augment: AugmentConfig = AugmentConfig()
    perturb: PerturbConfig = PerturbConfig()
    driver: DriverConfig = DriverConfig()
    prompt: PromptConfig = PromptConfig()

    def __post_init__(self) -> None:
        if self.draw not in DRAW_MODES:
            raise ValueError(f"PairingConfig.draw must be one of {DRAW_MODES}, got {self.draw!r}")
        if self.resolution is not None:
            check_resolution(self.resolution)
        if not 1 <= self.instances[0] <= self.instances[1]:
            raise ValueError(f"PairingConfig.instances must be (min, max) with 1 <= min <= max, got {self.instances}")


@dataclass
class SadfPair:
    pair_id: int
    seed: int
    image: np.ndarray                            # uint8 (H, W, 3), the defect-free variant
    instances: list[tuple[np.ndarray, int]]      # (uint8 (H, W) {0, 1} mask, category id), paint order
    driver: torch.Tensor                         # float32 (3, H, W) in [0, 1]
    prompt: str
    source_file: str                             # the defect-free image
    variant: int                                 # -1 when not augmented
    source_annotations: list[int] = field(default_factory=list)  # annotation ids the masks come from

    def label_map(self) -> np.ndarray:
        """uint8 (H, W) category-id map (later instances on top, as in the driver)."""
        return label_map(self.instances, self.image.shape[:2])

    def annotations(self, image_id: int, first_annotation_id: int) -> list[dict]:
        """COCO annotations (RLE, exact area and box) of this pair's masks for an output image."""
        out = []
        for index, (mask, category_id) in enumerate(self.instances):
            rle = mask_to_rle(mask)
            out.append({"id": first_annotation_id + index, "image_id": image_id, "category_id": int(category_id),
                        "segmentation": rle, "area": float(rle_area(rle)), "bbox": rle_bbox(rle), "iscrowd": 0})
        return out


class SadfPairs:
    """The pairs of a defect-free dataset and an annotated one; `pairs[p]` builds pair p.

    len(pairs) = N free images x max(V, 1) variants; `build(p)` accepts any p >= 0 (beyond the
    length the images repeat with new masks).
    """

    def __init__(self, free: Coco, annotated: Coco, config: PairingConfig = PairingConfig(), seed: int = 0):
        if not free["images"]:
            raise ValueError("SadfPairs: the defect-free dataset has no images")
        self.free_images = sorted(free["images"], key=lambda i: i["id"])
        self.config, self.seed = config, int(seed)
        self.names = category_names(annotated)
        self.bank: list[SourceInstance] = instance_bank(annotated, config.category_ids)
        if not self.bank:
            raise ValueError("SadfPairs: the annotated dataset has no instances"
                             + (f" of categories {list(config.category_ids)}" if config.category_ids else ""))
        self.by_image: dict[int, list[SourceInstance]] = {}
        for inst in self.bank:
            self.by_image.setdefault(inst.image_id, []).append(inst)
        self.source_images = sorted(self.by_image)
        # Consecutive pairs share a free image (its variants): keep the last few decoded.
        self._free_image = functools.lru_cache(maxsize=8)(self._load_free_image)

    def __getstate__(self) -> dict:
        # DataLoader workers pickle the builder: the image cache stays behind.
        state = self.__dict__.copy()
        del state["_free_image"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._free_image = functools.lru_cache(maxsize=8)(self._load_free_image)

    def __len__(self) -> int:
        return len(self.free_images) * max(self.config.variants, 1)

    def __getitem__(self, pair_id: int) -> SadfPair:
        if not 0 <= pair_id < len(self):
            raise IndexError(f"pair {pair_id} out of range 0..{len(self) - 1}")
        return self.build(pair_id)

    def __iter__(self) -> Iterator[SadfPair]:
        return (self.build(p) for p in range(len(self)))

    def _load_free_image(self, index: int) -> np.ndarray:
        image = read_image(self.free_images[index]["file_name"])
        if self.config.resolution is not None:
            image, _ = resize_and_crop(image, check_resolution(self.config.resolution))
        return image

    def _draw_sources(self, rng: np.random.Generator) -> list[SourceInstance]:
        if self.config.draw == "image":
            image_id = self.source_images[int(rng.integers(len(self.source_images)))]
            return list(self.by_image[image_id])
        low, high = self.config.instances
        count = int(rng.integers(low, high + 1))
        return [self.bank[int(i)] for i in rng.integers(len(self.bank), size=count)]

    def _place(self, sources: list[SourceInstance], frame: tuple[int, int],
               rng: np.random.Generator) -> list[tuple[np.ndarray, int, int]]:
        height, width = frame
        occupied = np.zeros(frame, dtype=bool)
        kept = []
        for src in sources:
            base = min(height, width) / min(src.frame) if self.config.relative_size else 1.0
            center = None
            if self.config.draw == "image":
                center = (src.center[0] * width, src.center[1] * height)
            mask = sample_instance(src.mask, frame, rng, self.config.perturb, base, center,
                                   self.config.position_jitter, occupied)
            if mask is not None:
                occupied |= mask != 0
                kept.append((mask, src.category_id, src.annotation_id))
        return kept

    def build(self, pair_id: int) -> SadfPair:
        """Build pair `pair_id` (deterministic in (seed, pair_id, config, datasets))."""
        cfg = self.config
        variants = max(cfg.variants, 1)
        index = (pair_id // variants) % len(self.free_images)
        image = self._free_image(index)
        variant = -1
        if cfg.variants > 0:
            variant = pair_id % variants
            image_seed = derive_seed(self.seed, self.free_images[index]["id"])
            image, _ = augment_variant(image, image_seed, variant, cfg.augment)
        rng = rng_for(self.seed, "pair", pair_id)
        kept: list[tuple[np.ndarray, int, int]] = []
        for _ in range(max(cfg.max_draws, 1)):
            kept = self._place(self._draw_sources(rng), image.shape[:2], rng)
            if kept:
                break
        instances = [(mask, category_id) for mask, category_id, _ in kept]
        names = [self.names[c] for c in sorted({c for _, c in instances})]
        return SadfPair(pair_id=pair_id, seed=derive_seed(self.seed, "pair", pair_id), image=image,
                        instances=instances, driver=topological_driver(image, instances, cfg.driver),
                        prompt=make_prompt(names, cfg.prompt),
                        source_file=self.free_images[index]["file_name"], variant=variant,
                        source_annotations=[a for _, _, a in kept])

"""torch Datasets of the two training phases.

ConceptDataset (paper 4.1, DreamBooth):   {"image": float32 (3, H, W) in [-1, 1], "prompt": str, "path": str}
ConditionDataset (paper 4.2, control):    {"image": (3, H, W) in [-1, 1], "driver": float32 (3, H, W) in [0, 1],
                                           "prompt": str, "path": str}
                                          + with return_masks: "masks": uint8 (H, W) category-id map,
                                            "instance_masks": uint8 (N, H, W), "category_ids": int64 (N,)

Every item is scaled to cover the resolution (a multiple of 64) and cropped (centre, or a random
window); masks follow with nearest neighbour. The driver is computed on the resized image and
masks, then the optional horizontal flip is applied to image, driver and masks together.
Randomness (random crop, flip) uses torch's global generator, which DataLoader seeds per worker,
so a run is reproducible under `torch.manual_seed`. Use `collate` as the DataLoader's collate_fn.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .coco import Coco, annotations_by_image, category_names, decode_instances
from .drivers import DriverConfig, topological_driver
from .images import image_to_tensor, read_image
from .masks import label_map
from .prompts import PromptConfig, concept_prompt, make_prompt
from .resize import check_resolution, resize_and_crop

CROPS = ("center", "random")


def _crop_offset(crop: str) -> tuple[float, float]:
    if crop == "center":
        return (0.5, 0.5)
    y, x = torch.rand(2).tolist()
    return (y, x)


def _flip() -> bool:
    return bool(torch.rand(()) < 0.5)


class ConceptDataset(Dataset):
    """Images and one prompt ("an image of a sks" by default) for the concept phase.

    images: a COCO dict (its annotations are ignored) or a list of image paths.
    """

    def __init__(self, images: Coco | Sequence[str | os.PathLike], resolution: int | Sequence[int] = 512,
                 prompt: str | None = None, prompt_config: PromptConfig = PromptConfig(),
                 crop: str = "center", hflip: bool = False):
        if crop not in CROPS:
            raise ValueError(f"ConceptDataset: crop must be one of {CROPS}, got {crop!r}")
        self.paths = ([img["file_name"] for img in images["images"]] if isinstance(images, dict)
                      else [str(p) for p in images])
        if not self.paths:
            raise ValueError("ConceptDataset: no images")
        self.size = check_resolution(resolution)
        self.prompt = prompt if prompt is not None else concept_prompt(prompt_config)
        self.crop, self.hflip = crop, hflip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, _ = resize_and_crop(read_image(self.paths[index]), self.size, offset=_crop_offset(self.crop))
        if self.hflip and _flip():
            image = image[:, ::-1]
        return {"image": image_to_tensor(image), "prompt": self.prompt, "path": self.paths[index]}


class ConditionDataset(Dataset):
    """(image, driver, prompt[, masks]) items of an annotated COCO dataset for the condition phase.
    Images without annotations are kept: their driver has no paint and their prompt is the
    defect-free one."""

    def __init__(self, data: Coco, resolution: int | Sequence[int] = 512, driver: DriverConfig = DriverConfig(),
                 prompt_config: PromptConfig = PromptConfig(), return_masks: bool = False,
                 crop: str = "center", hflip: bool = False):
        if crop not in CROPS:
            raise ValueError(f"ConditionDataset: crop must be one of {CROPS}, got {crop!r}")
        if not data["images"]:
            raise ValueError("ConditionDataset: the dataset has no images")
        self.images = list(data["images"])
        self.by_image = annotations_by_image(data)
        self.names = category_names(data)
        self.size = check_resolution(resolution)
        self.driver_config, self.prompt_config = driver, prompt_config
        self.return_masks, self.crop, self.hflip = return_masks, crop, hflip

    def __len__(self) -> int:
        return len(self.images)

    def prompt_for(self, index: int) -> str:
        ids = sorted({a["category_id"] for a in self.by_image[self.images[index]["id"]]})
        return make_prompt([self.names[c] for c in ids], self.prompt_config)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = self.images[index]
        instances = decode_instances(img, self.by_image[img["id"]])
        image, masks = resize_and_crop(read_image(img["file_name"]), self.size, [m for m, _ in instances],
                                       offset=_crop_offset(self.crop))
        # Instances cropped away entirely are dropped (their class leaves the prompt too).
        kept = [(m, c) for m, (_, c) in zip(masks, instances) if m.any()]
        driver = topological_driver(image, kept, self.driver_config)
        if self.hflip and _flip():
            image, driver = image[:, ::-1], driver.flip(-1)
            kept = [(m[:, ::-1], c) for m, c in kept]
        names = [self.names[c] for c in sorted({c for _, c in kept})]
        item = {"image": image_to_tensor(image), "driver": driver, "prompt": make_prompt(names, self.prompt_config),
                "path": img["file_name"]}
        if self.return_masks:
            height, width = self.size
            item["masks"] = torch.from_numpy(label_map(kept, (height, width)))
            stack = np.stack([m for m, _ in kept]) if kept else np.zeros((0, height, width), np.uint8)
            item["instance_masks"] = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.uint8))
            item["category_ids"] = torch.tensor([c for _, c in kept], dtype=torch.int64)
        return item


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-shaped tensors (image, driver, masks); keep strings and per-item instance lists
    ("instance_masks", "category_ids") as lists."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if key in ("instance_masks", "category_ids") or not isinstance(values[0], torch.Tensor):
            out[key] = values
        else:
            out[key] = torch.stack(values)
    return out

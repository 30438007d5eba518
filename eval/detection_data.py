"""COCO instance datasets as Mask R-CNN inputs, and the seeded batch order of the benchmark.

An item is (image, target):
    image   float32 (3, H, W) RGB in [0, 1] at the file's own size (the detector resizes)
    target  {"boxes": float32 (N, 4) x0 y0 x1 y1 (pixel edges, exact mask extent),
             "labels": int64 (N,) in 1..K, "masks": uint8 (N, H, W) in {0, 1}, "image_id": int}
Labels are contiguous indices of the category NAMES (`LabelMap`), so a synthetic dataset whose
category ids differ from the real one's still trains the same classes.

Batch order: step s of a run with seed r takes items s*B .. s*B + B - 1 of the endless sequence
perm(r, 0) + perm(r, 1) + ..., one seeded permutation of the dataset per epoch; the horizontal
flip of each item is seeded by (r, s, position). Both are pure functions of (r, s), so a resumed
run sees exactly the batches of an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from data.coco import annotations_by_image, decode_instances
from data.images import read_image
from data.masks import mask_bbox
from data.seeding import derive_seed


@dataclass(frozen=True)
class LabelMap:
    """Category names in label order: label i + 1 is names[i] (0 is the background)."""

    names: tuple[str, ...]

    @classmethod
    def from_coco(cls, data: dict[str, Any]) -> "LabelMap":
        """Labels in category-id order of `data` (the real dataset defines the classes)."""
        return cls(tuple(c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])))

    @property
    def num_classes(self) -> int:
        """Classes of the detector, background included."""
        return len(self.names) + 1

    def labels_for(self, data: dict[str, Any], source: str) -> dict[int, int]:
        """category id of `data` -> label; a category name unknown to the map is an error."""
        out = {}
        for cat in data["categories"]:
            if cat["name"] not in self.names:
                raise ValueError(f"{source}: category {cat['name']!r} (id {cat['id']}) is not among the "
                                 f"real dataset's categories {list(self.names)}")
            out[cat["id"]] = self.names.index(cat["name"]) + 1
        return out


def target_from_masks(masks: Sequence[np.ndarray], labels: Sequence[int], height: int, width: int,
                      image_id: int) -> dict[str, torch.Tensor | int]:
    """A detector target from binary (H, W) instance masks and their labels."""
    boxes = [[x, y, x + w, y + h] for x, y, w, h in map(mask_bbox, masks)]  # COCO xywh -> x0 y0 x1 y1
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(list(labels), dtype=torch.int64),
        "masks": (torch.from_numpy(np.stack(masks)) if len(masks)
                  else torch.zeros((0, height, width), dtype=torch.uint8)),
        "image_id": int(image_id),
    }


def hflip_item(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mirror an item left-right: image (3, H, W), masks (N, H, W), boxes x0 <-> W - x1."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


class InstanceDataset(torch.utils.data.Dataset):
    """(image, target) items of a COCO dict (file names absolute, as `data.coco.load_coco` gives)."""

    def __init__(self, data: dict[str, Any], label_map: LabelMap, source: str = "<coco>") -> None:
        self.data = data
        self.images = list(data["images"])
        self.by_image = annotations_by_image(data)
        self.label_of = label_map.labels_for(data, source)

    def __len__(self) -> int:
        return len(self.images)

    def instances(self, index: int) -> tuple[list[np.ndarray], list[int]]:
        """Binary (H, W) masks and category ids of image `index` (annotation id order)."""
        pairs = decode_instances(self.images[index], self.by_image[self.images[index]["id"]])
        pairs = [(m, c) for m, c in pairs if m.any()]
        return [m for m, _ in pairs], [c for _, c in pairs]

    def image(self, index: int) -> torch.Tensor:
        """Image `index` as float32 (3, H, W) RGB in [0, 1]."""
        record = self.images[index]
        pixels = read_image(record["file_name"])  # uint8 (H, W, 3) RGB
        if pixels.shape[:2] != (record["height"], record["width"]):
            raise ValueError(f"{record['file_name']}: image is {pixels.shape[1]}x{pixels.shape[0]} (w x h), "
                             f"the COCO record says {record['width']}x{record['height']}")
        return torch.from_numpy(pixels).permute(2, 0, 1).float().div(255.0)  # (H, W, 3) -> (3, H, W)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.images[index]
        image = self.image(index)
        masks, categories = self.instances(index)
        target = target_from_masks(masks, [self.label_of[c] for c in categories],
                                   record["height"], record["width"], record["id"])
        return image, target


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Dataset indices of training step `step` (see module doc)."""
    if num_items <= 0:
        raise ValueError("batch_indices: empty dataset")
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_items)
        generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch) % (2 ** 63))
        out.append(int(torch.randperm(num_items, generator=generator)[offset]))
    return out


def flip_flags(batch_size: int, step: int, seed: int) -> list[bool]:
    """Whether each item of step `step` is mirrored (probability 1/2, seeded)."""
    rng = np.random.default_rng(derive_seed(seed, "hflip", step))
    return [bool(v) for v in rng.random(batch_size) < 0.5]


def load_batch(dataset: InstanceDataset, step: int, batch_size: int, seed: int, hflip: bool
               ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """The images and targets of training step `step`."""
    images, targets = [], []
    flips = flip_flags(batch_size, step, seed)
    for index, flip in zip(batch_indices(len(dataset), batch_size, step, seed), flips):
        image, target = dataset[index]
        if hflip and flip:
            image, target = hflip_item(image, target)
        images.append(image)
        targets.append(target)
    return images, targets

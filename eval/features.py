"""Image sets and feature extractors for Frechet distances.

An image set is a folder of images (searched recursively) or a COCO json (every image it lists).
A feature extractor is any `nn.Module` mapping float (B, 3, S, S) RGB in [0, 1] to (B, D)
features; it is paired with a label that says what the distance is:

| name               | module                                   | label                   |
|--------------------|------------------------------------------|-------------------------|
| `inception`        | FID Inception-v3, published weights      | `FID`                   |
| `inception-random` | same network, seeded random weights      | `FD-inception-random`   |
| `pixels`           | 3x8x8 area-downsampled pixels (192-d)    | `FD-pixels`             |
| `pkg.mod:factory`  | `factory()` returns any module           | `FD-<factory>`          |

Only `inception` with the published file is FID; every other label starts with "FD-" so a result
table never passes an experiment off as FID.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from defectsynth.errors import UserError
from data.coco import load_coco
from data.images import list_images, read_image

INCEPTION_INPUT_SIZE = 299


def image_set_paths(source: str | os.PathLike) -> list[Path]:
    """The image files of a folder (recursive, sorted) or of a COCO json (in file order)."""
    source = Path(source)
    if source.is_dir():
        paths = list_images(source)
    elif source.is_file() and source.suffix.lower() == ".json":
        paths = [Path(img["file_name"]) for img in load_coco(source, check_images=False, progress=False)["images"]]
    else:
        raise UserError(f"{source}: expected a folder of images or a COCO .json file")
    if not paths:
        raise UserError(f"{source}: holds no images")
    return paths


class PixelFeatures(nn.Module):
    """Area-downsampled pixels as features: (B, 3, H, W) in [0, 1] -> (B, 3 * size * size).
    A cheap, weight-free stand-in for experiments and tests (its distance is "FD-pixels")."""

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, self.size).flatten(1)  # (B, 3, s, s) -> (B, 3 s^2)


@dataclass(frozen=True)
class Extractor:
    """A feature module, the label of the distance it gives, and the square input size it gets."""

    module: nn.Module
    label: str
    input_size: int = INCEPTION_INPUT_SIZE

    @property
    def is_fid(self) -> bool:
        return self.label == "FID"


def build_extractor(name: str = "inception", inception_weights: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu", seed: int = 0) -> Extractor:
    """See the module table. Raises `eval.inception.InceptionWeightsNotFound` for a missing file."""
    from eval.inception import build_fid_inception

    if name == "inception":
        return Extractor(build_fid_inception(inception_weights, device=device), "FID")
    if name == "inception-random":
        return Extractor(build_fid_inception(device=device, random_init_seed=seed), "FD-inception-random")
    if name == "pixels":
        return Extractor(PixelFeatures().to(device).eval(), "FD-pixels", input_size=64)
    if ":" in name:
        module_name, attr = name.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"feature extractor {name!r}: cannot import {attr} from {module_name} ({err})") from err
        module = factory()
        if not isinstance(module, nn.Module):
            raise ValueError(f"feature extractor {name!r}: {attr}() returned {type(module).__name__}, "
                             f"expected a torch.nn.Module")
        size = int(getattr(module, "input_size", INCEPTION_INPUT_SIZE))
        return Extractor(module.to(device).eval(), f"FD-{attr}", input_size=size)
    raise ValueError(f"unknown feature extractor {name!r}: expected 'inception', 'inception-random', "
                     f"'pixels' or 'package.module:factory'")


def load_resized(path: str | os.PathLike, size: int) -> torch.Tensor:
    """One image as float32 (3, size, size) RGB in [0, 1]: read as RGB (grayscale replicated),
    then resized bilinearly with `align_corners=False`, the resize pytorch-fid applies in-network
    (resizing one image at a time lets a batch hold images of different sizes)."""
    image = read_image(path)  # uint8 (H, W, 3) RGB
    tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)  # (H, W, 3) -> (3, H, W)
    if tensor.shape[1:] != (size, size):
        tensor = F.interpolate(tensor[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return tensor


@torch.no_grad()
def extract_features(paths: Sequence[str | os.PathLike], extractor: Extractor, batch_size: int = 50,
                     device: str | torch.device = "cpu", progress: bool = True,
                     desc: str = "features") -> np.ndarray:
    """Features of every image, float64 (N, D), in the order of `paths`."""
    chunks: list[np.ndarray] = []
    batches = range(0, len(paths), batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        batch = torch.stack([load_resized(p, extractor.input_size) for p in paths[start:start + batch_size]])
        features = extractor.module(batch.to(device))
        if features.dim() != 2:
            raise ValueError(f"feature extractor {extractor.label}: expected (B, D) output, "
                             f"got {tuple(features.shape)}")
        chunks.append(features.double().cpu().numpy())
    if not chunks:
        raise ValueError("extract_features: no images")
    return np.concatenate(chunks, axis=0)

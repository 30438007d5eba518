"""Control hints: what the control copy sees, built the same way for training and for synthesis.

Two kinds of condition (paper 4.2 and the baseline of 5.3):

    "driver"   the topological driver (data/drivers.py): adaptive-threshold topology at grey levels
               0..50 with every defect mask painted in its class colour. It carries the surface's
               layout but none of its appearance, so a driver from a defect-free image and one from
               a defective image look alike, and synthesis can vary the texture.
    "inpaint"  the RGB image itself with every defect mask painted in its class colour (the same
               palette and painting order as the driver), i.e. an inpainting condition: the control
               sees all the surface's pixels except those under the masks, and learns to fill the
               painted regions with a defect of that class. This is the inpainting-style baseline the
               paper compares diversity against.

Both are float32 (3, H, W) in [0, 1] (the contract for drivers and hints), built from a uint8
(H, W, 3) image and (mask, category id) instances:

    hint = build_hint("inpaint", image, [(mask, 2)])          # training: the defective image
    hint = build_hint("driver", free_image, perturbed_masks)  # synthesis: a defect-free image

A trained control records its kind in its exported metadata (key CONDITION_METADATA_KEY, written
by train.condition; `read_condition_metadata` reads it back from the single file or the diffusers
folder), so the synthesis stage builds the hint the control was trained on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .drivers import DriverConfig, Instances, driver_to_tensor, paint_masks, render_driver

HINT_KINDS = ("driver", "inpaint")
# safetensors metadata key (single file) / config.json key (diffusers folder) written by train.condition:
# a JSON object {"condition": kind, "driver": DriverConfig fields, ...}.
CONDITION_METADATA_KEY = "defectsynth_condition"
DIFFUSERS_CONDITION_FILE = "defectsynth_condition.json"


def inpaint_hint(image: np.ndarray, instances: Instances = None, palette=None) -> torch.Tensor:
    """The inpainting hint: float32 (3, H, W) in [0, 1], the image with every mask painted in its
    class colour (later masks cover earlier ones; palette as the driver's). image: uint8 (H, W, 3)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"inpaint_hint: expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    return driver_to_tensor(paint_masks(image.copy(), instances, palette))


def build_hint(kind: str, image: np.ndarray, instances: Instances = None,
               driver_config: DriverConfig = DriverConfig()) -> torch.Tensor:
    """The hint of condition `kind` ("driver" or "inpaint") for a uint8 (H, W, 3) image and its
    defect instances: float32 (3, H, W) in [0, 1]."""
    if kind == "driver":
        return driver_to_tensor(render_driver(image, instances, driver_config))
    if kind == "inpaint":
        return inpaint_hint(image, instances, driver_config.palette)
    raise ValueError(f"hint kind must be one of {HINT_KINDS}, got {kind!r}")


def read_condition_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The condition record train.condition stored with an exported control, or None if the file
    has none (a control trained elsewhere). path: the control's .safetensors file, or its diffusers
    ControlNetModel folder (the record is in DIFFUSERS_CONDITION_FILE beside config.json)."""
    path = Path(path)
    if path.is_dir():
        record = path / DIFFUSERS_CONDITION_FILE
        return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        text = (handle.metadata() or {}).get(CONDITION_METADATA_KEY)
    return json.loads(text) if text else None

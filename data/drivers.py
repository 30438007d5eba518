"""The topological driver (paper 4.2): the control image of the condition phase.

    image (H, W, 3) uint8
      -> downscale by `downscale` (area averaging)          small grey-level structure goes
      -> grayscale (ITU-R BT.601 weights)
      -> adaptive threshold (`threshold_method`, `block_size`, `threshold_c`) -> binary {0, 255}
      -> resize back to (H, W) (`upsample`)
      -> scale 0..255 to 0..`background_level` (default 50; rounded to integers)
      -> replicate to RGB and paint every defect mask in its class colour (palette.py), in the
         order given: later masks cover earlier ones
      -> divide by 255                                       float32 (3, H, W) in [0, 1]

The same function serves defective and defect-free images, so the two kinds of driver come from
the same procedure; on a defective image the paint covers the defect pixels themselves.

The halo (beyond the paper): the adaptive threshold also reacts to the defect itself, so around the
paint of a defective image's driver the topology differs from that of the same surface without the
defect, in a band up to the threshold window's radius wide; drivers built for synthesis from
defect-free images never have it. `inpaint_defects` removes it: the topology is computed on the
image with the instances' pixels (masks dilated by `inpaint_dilate` px) filled in by OpenCV's
Telea inpainting (radius `inpaint_radius`), before downscaling and thresholding. The paint then
covers the inpainted pixels as before. Measured numbers and the chosen default: docs/data.md. Every
topology value is <= background_level / 255 and every painted pixel is exactly its class colour
/ 255 (all palette colours have a channel at 255, so paint and topology never collide).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence, Union

import cv2
import numpy as np
import torch

from .palette import PALETTE, Color

# Instances: None (defect-free), a uint8 (H, W) category-id map, or (mask, category id) pairs.
Instances = Union[None, np.ndarray, Sequence[tuple[np.ndarray, int]]]

THRESHOLD_METHODS = {"gaussian": cv2.ADAPTIVE_THRESH_GAUSSIAN_C, "mean": cv2.ADAPTIVE_THRESH_MEAN_C}
UPSAMPLING = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


@dataclass(frozen=True)
class DriverConfig:
    """Parameters of the topological driver (defaults are the project's documented defaults)."""
    downscale: int = 4                   # the threshold runs at (H / downscale, W / downscale)
    threshold_method: str = "gaussian"   # OpenCV adaptive threshold: "gaussian" or "mean" window
    block_size: int = 11                 # odd window side, in downscaled pixels
    threshold_c: float = 2.0             # constant subtracted from the local (weighted) mean
    background_level: int = 50           # the binary map's 255 becomes this grey level
    upsample: str = "linear"             # "linear" (soft edges) or "nearest" (binary levels only)
    palette: tuple[Color, ...] | None = None  # colour per category id (index = id); None = PALETTE
    inpaint_defects: bool = False        # topology of the image with its instances inpainted (no halo)
    inpaint_dilate: int = 2              # px the masks grow before inpainting (the defect's soft edge)
    inpaint_radius: int = 5              # cv2.inpaint neighbourhood radius, px

    def __post_init__(self) -> None:
        if self.downscale < 1:
            raise ValueError(f"DriverConfig.downscale must be >= 1, got {self.downscale}")
        if self.threshold_method not in THRESHOLD_METHODS:
            raise ValueError(f"DriverConfig.threshold_method must be one of {sorted(THRESHOLD_METHODS)}, "
                             f"got {self.threshold_method!r}")
        if self.block_size < 3 or self.block_size % 2 == 0:
            raise ValueError(f"DriverConfig.block_size must be odd and >= 3, got {self.block_size}")
        if not 0 <= self.background_level <= 255:
            raise ValueError(f"DriverConfig.background_level must be in 0..255, got {self.background_level}")
        if self.upsample not in UPSAMPLING:
            raise ValueError(f"DriverConfig.upsample must be one of {sorted(UPSAMPLING)}, got {self.upsample!r}")
        if self.inpaint_dilate < 0 or self.inpaint_radius < 1:
            raise ValueError(f"DriverConfig: inpaint_dilate must be >= 0 and inpaint_radius >= 1, got "
                             f"{self.inpaint_dilate}, {self.inpaint_radius}")


def grey_image(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) grey levels of a uint8 RGB (H, W, 3) or grey (H, W) image."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"topological driver: expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    raise ValueError(f"topological driver: expected (H, W, 3) RGB or (H, W) grey, got shape {image.shape}")


def inpaint_instances(image: np.ndarray, instances: Instances, dilate: int = 2, radius: int = 5) -> np.ndarray:
    """`image` (uint8 RGB or grey) with every instance's pixels, masks grown by `dilate` px
    (square), filled in by cv2.inpaint (Telea); the image itself when there are no instances."""
    image = np.asarray(image)
    masks = instance_masks(instances, image.shape[:2])
    if not masks:
        return image
    union = np.zeros(image.shape[:2], np.uint8)
    for mask, _ in masks:
        union[mask] = 255
    if dilate > 0:
        union = cv2.dilate(union, np.ones((2 * dilate + 1, 2 * dilate + 1), np.uint8))
    return cv2.inpaint(np.ascontiguousarray(image), union, radius, cv2.INPAINT_TELEA)


def topology_map(image: np.ndarray, config: DriverConfig = DriverConfig(), instances: Instances = None) -> np.ndarray:
    """The grey part of the driver: uint8 (H, W) with values in [0, background_level]. With
    `config.inpaint_defects`, computed on the image with `instances` inpainted (no halo)."""
    if config.inpaint_defects and instances is not None:
        image = inpaint_instances(image, instances, config.inpaint_dilate, config.inpaint_radius)
    gray = grey_image(image)
    height, width = gray.shape
    small_size = (max(1, round(width / config.downscale)), max(1, round(height / config.downscale)))
    small = cv2.resize(gray, small_size, interpolation=cv2.INTER_AREA) if config.downscale > 1 else gray
    binary = cv2.adaptiveThreshold(small, 255, THRESHOLD_METHODS[config.threshold_method],
                                   cv2.THRESH_BINARY, config.block_size, config.threshold_c)
    if binary.shape != (height, width):
        binary = cv2.resize(binary, (width, height), interpolation=UPSAMPLING[config.upsample])
    # 0..255 -> 0..background_level, integer levels so that uint8 and float drivers agree.
    scaled = np.round(binary.astype(np.float32) * (config.background_level / 255.0))
    return scaled.astype(np.uint8)


def instance_masks(instances: Instances, shape: tuple[int, int]) -> list[tuple[np.ndarray, int]]:
    """(boolean mask, category id) pairs from a label map or (mask, category id) pairs, each
    checked against the image shape; None gives no instances."""
    if instances is None:
        return []
    if isinstance(instances, np.ndarray):
        if instances.shape != shape:
            raise ValueError(f"topological driver: label map shape {instances.shape} != image shape {shape}")
        ids = [int(v) for v in np.unique(instances) if v != 0]
        return [(instances == cid, cid) for cid in ids]
    out = []
    for index, (mask, category_id) in enumerate(instances):
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"topological driver: mask {index} has shape {mask.shape}, image is {shape}")
        out.append((mask != 0, int(category_id)))
    return out


def paint_masks(canvas: np.ndarray, instances: Instances, palette: Sequence[Color] | None = None) -> np.ndarray:
    """Paint masks onto an RGB uint8 (H, W, 3) canvas in place, in the order given (a label map
    paints one colour per id in increasing id order; its pixels never overlap)."""
    palette = PALETTE if palette is None else palette
    for mask, category_id in instance_masks(instances, canvas.shape[:2]):
        if not 0 < category_id < len(palette):
            raise ValueError(f"topological driver: category id {category_id} has no palette colour "
                             f"(palette has ids 1..{len(palette) - 1})")
        canvas[mask] = palette[category_id]
    return canvas


def render_driver(image: np.ndarray, instances: Instances = None, config: DriverConfig = DriverConfig(),
                  **overrides) -> np.ndarray:
    """The driver as uint8 RGB (H, W, 3) (for writing files). `overrides` replace config fields."""
    if overrides:
        config = dataclasses.replace(config, **overrides)
    topology = topology_map(image, config, instances)
    canvas = np.repeat(topology[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    return paint_masks(canvas, instances, config.palette)


def driver_to_tensor(driver: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) driver -> float32 (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(driver)).permute(2, 0, 1).float() / 255.0  # (H, W, 3) -> (3, H, W)


def topological_driver(image: np.ndarray, instances: Instances = None,
                       config: DriverConfig = DriverConfig(), **overrides) -> torch.Tensor:
    """The driver as float32 (3, H, W) in [0, 1]; see the module docstring for the procedure.

    image: uint8 (H, W, 3) RGB or (H, W) grey. instances: None for a defect-free image, a uint8
    (H, W) category-id map, or (mask (H, W), category id) pairs painted in order.
    """
    return driver_to_tensor(render_driver(image, instances, config, **overrides))

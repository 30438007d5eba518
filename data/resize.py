"""Resizing to the training/synthesis resolution: scale so the image covers the target, then crop.
Images use area averaging when shrinking and bilinear when enlarging; masks use pixel-centre
aligned nearest neighbour (OpenCV's INTER_NEAREST_EXACT: plain INTER_NEAREST is shifted by half a
pixel), so masks stay aligned with their image and keep their exact category ids."""
from __future__ import annotations

import math
from typing import Sequence, Union

import cv2
import numpy as np

Masks = Union[None, np.ndarray, Sequence[np.ndarray]]


def check_resolution(resolution: int | Sequence[int], multiple: int = 64) -> tuple[int, int]:
    """int or (height, width) -> (height, width); each must be a positive multiple of 64, because
    the SD VAE downsamples by 8 and the UNet by another 8 (three levels)."""
    size = (resolution, resolution) if isinstance(resolution, (int, np.integer)) else tuple(resolution)
    if len(size) != 2 or any(int(s) <= 0 or int(s) % multiple for s in size):
        raise ValueError(f"resolution {resolution!r}: height and width must be positive multiples of "
                         f"{multiple} (VAE x8, UNet x8), e.g. 512 or (512, 768)")
    return int(size[0]), int(size[1])


def resize_and_crop(image: np.ndarray, size: tuple[int, int], masks: Masks = None,
                    offset: tuple[float, float] = (0.5, 0.5)) -> tuple[np.ndarray, Masks]:
    """Scale `image` (H, W[, C]) so that it covers `size` = (height, width), then crop.

    offset = (y, x) in [0, 1]: where the crop window sits in the surplus (0.5, 0.5 = centre).
    `masks` (a (H, W) map or a list of them) go through the same scale and crop.
    """
    height, width = image.shape[:2]
    target_h, target_w = size
    scale = max(target_h / height, target_w / width)
    new_h, new_w = max(target_h, math.ceil(height * scale - 1e-6)), max(target_w, math.ceil(width * scale - 1e-6))
    y0 = int(round(offset[0] * (new_h - target_h)))
    x0 = int(round(offset[1] * (new_w - target_w)))

    def apply(array: np.ndarray, interpolation: int) -> np.ndarray:
        if (new_h, new_w) != array.shape[:2]:
            dtype = array.dtype
            work = array.astype(np.uint8) if dtype == bool else array
            array = cv2.resize(work, (new_w, new_h), interpolation=interpolation).astype(dtype)
        return np.ascontiguousarray(array[y0:y0 + target_h, x0:x0 + target_w])

    image_interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out_image = apply(image, image_interp)
    if masks is None:
        return out_image, None
    if isinstance(masks, np.ndarray):
        return out_image, apply(masks, cv2.INTER_NEAREST_EXACT)
    return out_image, [apply(np.asarray(m), cv2.INTER_NEAREST_EXACT) for m in masks]

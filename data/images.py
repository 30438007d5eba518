"""Reading images and masks.

`read_image` always returns 8-bit RGB (H, W, 3), whatever the file holds:
- EXIF orientation is honoured (OpenCV's decoder applies it for JPEG, PNG, WebP and TIFF);
- grayscale is replicated to three channels; grey+alpha and RGBA lose their alpha channel
  (the colour values are kept as stored, like PIL's `convert("RGB")`);
- palette images are expanded through their palette;
- 16-bit images are scaled to 8 bits (value >> 8).

`read_mask` returns the stored values, untouched: a palette PNG gives its palette *indices*
(class-index masks are often saved that way), which needs Pillow (a torchvision dependency,
imported only for such files).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from defectsynth.errors import UserError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(UserError):
    """An image or mask file is missing, empty or cannot be decoded; the message names the file."""


def _read_bytes(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"{path}: file is empty")
    return data


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any image file as uint8 RGB (H, W, 3), EXIF orientation applied (see module doc)."""
    path = Path(path)
    data = _read_bytes(path)
    # IMREAD_COLOR: 8-bit, 3 channels, orientation applied. imdecode (not imread) so that
    # non-ASCII paths work and a decoding failure is reported here, not as a None later.
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageReadError(f"{path}: cannot decode as an image (corrupt or unsupported format)")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _png_color_type(data: np.ndarray) -> int | None:
    """The PNG colour type from the IHDR chunk (3 = palette), or None when not a PNG."""
    if data.size >= 26 and bytes(data[:8]) == b"\x89PNG\r\n\x1a\n" and bytes(data[12:16]) == b"IHDR":
        return int(data[25])
    return None


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask file with its stored values: (H, W) uint8/uint16, or (H, W, 3) uint8 RGB for a
    true-colour mask whose channels differ. Palette PNGs give palette indices. No EXIF rotation
    (mask files carry none; the image they belong to is checked for a matching size instead)."""
    path = Path(path)
    data = _read_bytes(path)
    if _png_color_type(data) == 3:
        from PIL import Image  # Pillow ships with torchvision; only palette masks need it

        try:
            with Image.open(path) as img:
                return np.array(img, dtype=np.uint8)
        except OSError as err:
            raise ImageReadError(f"{path}: cannot decode palette PNG ({err})") from err
    mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if mask is None:
        raise ImageReadError(f"{path}: cannot decode as a mask image (corrupt or unsupported format)")
    if mask.ndim == 3:
        mask = mask[:, :, :3]  # drop alpha
        if mask.shape[2] == 1 or (np.all(mask[:, :, 0] == mask[:, :, 1]) and np.all(mask[:, :, 1] == mask[:, :, 2])):
            mask = mask[:, :, 0]
        else:
            mask = np.ascontiguousarray(mask[:, :, ::-1])  # BGR -> RGB
    return mask


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of the image as `read_image` returns it (after EXIF orientation)."""
    height, width = read_image(path).shape[:2]
    return height, width


def list_images(folder: str | os.PathLike, recursive: bool = True,
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under `folder` (sorted, hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    pattern = "**/*" if recursive else "*"
    exts = {e.lower() for e in extensions}
    return sorted(p for p in folder.glob(pattern)
                  if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))


def to_float_tensor_range(image: np.ndarray, low: float, high: float):
    """uint8 (H, W, 3) -> torch float32 (3, H, W) scaled to [low, high]."""
    import torch

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()  # (H, W, 3) -> (3, H, W)
    return tensor * ((high - low) / 255.0) + low


def image_to_tensor(image: np.ndarray):
    """uint8 RGB (H, W, 3) -> float32 (3, H, W) in [-1, 1], the VAE's input range."""
    return to_float_tensor_range(image, -1.0, 1.0)


def tensor_to_image(tensor) -> np.ndarray:
    """float (3, H, W) in [-1, 1] -> uint8 RGB (H, W, 3) (values outside the range are clipped)."""
    array = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return array.permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)

"""Atomic file writes: everything data/ writes goes to a temporary name beside the target and is
renamed onto it only once complete, so an error never leaves a half-written output behind."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from defectsynth.errors import disk_full, is_disk_full


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` when the block ends
    without an exception, delete it otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as err:
        if is_disk_full(err):  # one line naming the file and its size (defectsynth/errors.py)
            raise disk_full(path, len(data)) from err
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """Serialise first (a non-JSON value raises before anything touches the disk), then write."""
    text = json.dumps(obj, indent=indent)
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def encode_image(image: np.ndarray, ext: str = ".png") -> bytes:
    """Encode an RGB (H, W, 3) or single-channel (H, W) uint8 array in the format of `ext`."""
    if image.dtype != np.uint8:
        raise ValueError(f"encode_image: expected uint8, got {image.dtype}")
    if image.ndim == 3:
        if image.shape[2] != 3:
            raise ValueError(f"encode_image: expected (H, W, 3) RGB, got shape {image.shape}")
        image = np.ascontiguousarray(image[:, :, ::-1])  # RGB -> BGR for OpenCV
    ok, buf = cv2.imencode(ext, image)
    if not ok:
        raise ValueError(f"encode_image: OpenCV cannot encode {ext!r}")
    return buf.tobytes()


def write_image_atomic(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an RGB uint8 (H, W, 3) or single-channel (H, W) image; the format follows the suffix."""
    path = Path(path)
    write_bytes_atomic(path, encode_image(image, path.suffix.lower() or ".png"))

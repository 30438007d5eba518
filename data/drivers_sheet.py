"""A PNG contact sheet of image | topological driver pairs, to look at the drivers a dataset gives.

    python -m data.drivers_sheet --data runs/mt/defects.json --out sheet.png --num 8 --seed 0

`--data` is a COCO file (annotated masks are painted) or a folder of images (defect-free drivers).
Drivers are computed at each image's own resolution, then both are fitted into square tiles.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from defectsynth.errors import UserError, command
from defectsynth.runconfig import config_from_args, parser_from_dataclass

from .coco import annotations_by_image, decode_instances
from .drivers import THRESHOLD_METHODS, UPSAMPLING, DriverConfig, render_driver
from .files import write_image_atomic
from .images import read_image


@dataclass(frozen=True)
class DriversSheetConfig:
    """Write a PNG sheet of image | topological driver pairs."""
    data: str = field(default="", metadata={"help": "COCO JSON or image folder (required)"})
    out: str = field(default="", metadata={"help": "output PNG (required)"})
    num: int = field(default=8, metadata={"help": "number of images (0: all)"})
    seed: int = field(default=0, metadata={"help": "which images are picked"})
    shuffle: bool = field(default=True, metadata={"help": "pick images at random (else the first ones)"})
    columns: int = field(default=2, metadata={"help": "image | driver pairs per row"})
    tile: int = field(default=256, metadata={"help": "tile side, pixels"})
    downscale: int = field(default=DriverConfig.downscale, metadata={"help": "driver: downscale factor"})
    threshold_method: str = field(default=DriverConfig.threshold_method, metadata={
        "help": "driver: adaptive threshold window", "choices": sorted(THRESHOLD_METHODS)})
    block_size: int = field(default=DriverConfig.block_size, metadata={"help": "driver: odd window side (downscaled px)"})
    threshold_c: float = field(default=DriverConfig.threshold_c, metadata={"help": "driver: constant C"})
    background_level: int = field(default=DriverConfig.background_level, metadata={"help": "driver: grey level of the map"})
    upsample: str = field(default=DriverConfig.upsample, metadata={
        "help": "driver: resize back with", "choices": sorted(UPSAMPLING)})


def fit_tile(image: np.ndarray, tile: int) -> np.ndarray:
    """Scale an (H, W, 3) image to fit a tile x tile square, centred on black."""
    height, width = image.shape[:2]
    scale = tile / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)
    out = np.zeros((tile, tile, 3), dtype=np.uint8)
    y0, x0 = (tile - new_h) // 2, (tile - new_w) // 2
    out[y0:y0 + new_h, x0:x0 + new_w] = resized
    return out


def make_sheet(pairs: list[tuple[np.ndarray, np.ndarray]], columns: int, tile: int, gap: int = 4) -> np.ndarray:
    """Rows of `columns` (image | driver) cells, `gap` grey pixels between tiles."""
    rows = (len(pairs) + columns - 1) // columns
    cell_w = 2 * tile + gap
    sheet = np.full((rows * (tile + gap) + gap, columns * (cell_w + gap) + gap, 3), 128, dtype=np.uint8)
    for index, (image, driver) in enumerate(pairs):
        r, c = divmod(index, columns)
        y, x = gap + r * (tile + gap), gap + c * (cell_w + gap)
        sheet[y:y + tile, x:x + tile] = fit_tile(image, tile)
        sheet[y:y + tile, x + tile + gap:x + 2 * tile + gap] = fit_tile(driver, tile)
    return sheet


def main(cfg: DriversSheetConfig) -> Path:
    from .importers import load_dataset

    if not cfg.data or not cfg.out:
        raise UserError("data.drivers_sheet: --data and --out are required")
    data = load_dataset(cfg.data, progress=False)
    driver_cfg = DriverConfig(downscale=cfg.downscale, threshold_method=cfg.threshold_method,
                              block_size=cfg.block_size, threshold_c=cfg.threshold_c,
                              background_level=cfg.background_level, upsample=cfg.upsample)
    images = list(data["images"])
    if not images:
        raise UserError(f"{cfg.data}: no images")
    if cfg.shuffle:
        images = [images[i] for i in np.random.default_rng(cfg.seed).permutation(len(images))]
    images = images[: cfg.num] if cfg.num > 0 else images
    by_image = annotations_by_image(data)
    pairs = []
    for img in tqdm(images, desc="drivers", disable=len(images) < 16):
        image = read_image(img["file_name"])
        pairs.append((image, render_driver(image, decode_instances(img, by_image[img["id"]]), driver_cfg)))
    out = Path(cfg.out)
    write_image_atomic(out, make_sheet(pairs, max(1, cfg.columns), cfg.tile))
    print(f"wrote {out} ({len(pairs)} pairs)")
    return out


def get_args_parser():
    return parser_from_dataclass(DriversSheetConfig, prog="python -m data.drivers_sheet")


@command("drivers")
def cli(argv: list[str] | None = None) -> int:
    main(config_from_args(DriversSheetConfig, get_args_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

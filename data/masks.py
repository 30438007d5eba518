"""Binary masks, COCO RLE and polygons (all through pycocotools), instances from connected
components, exact boxes and areas.

Conventions: a binary mask is (H, W) uint8 in {0, 1} (any nonzero input counts as 1); an RLE is the
COCO compressed form `{"size": [H, W], "counts": str}` (str, not bytes, so it is JSON-ready);
a box is COCO `[x, y, w, h]` covering whole pixels (x0, y0, x1 - x0 + 1, y1 - y0 + 1); an area is
the RLE's pixel count. Polygons from `mask_to_polygons` follow pixel edges and are exact except
for holes; RLE is exact always.
"""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

RLE = dict[str, Any]


def _binary(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D (H, W) mask, got shape {mask.shape}")
    return (mask != 0).astype(np.uint8)


def mask_to_rle(mask: np.ndarray) -> RLE:
    """Binary (H, W) mask -> compressed COCO RLE with str counts."""
    rle = mask_utils.encode(np.asfortranarray(_binary(mask)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _as_pycoco_rle(rle: RLE, height: int | None = None, width: int | None = None) -> RLE:
    """Compressed RLE (str or bytes counts) or uncompressed RLE (list counts) -> pycocotools form."""
    if isinstance(rle.get("counts"), list):
        h, w = rle["size"]
        return mask_utils.frPyObjects(rle, h, w)
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def rle_to_mask(rle: RLE) -> np.ndarray:
    """COCO RLE (compressed or uncompressed) -> binary (H, W) uint8 mask."""
    return np.ascontiguousarray(mask_utils.decode(_as_pycoco_rle(rle)))


def rle_area(rle: RLE) -> int:
    """Pixel count of an RLE."""
    return int(mask_utils.area(_as_pycoco_rle(rle)))


def rle_bbox(rle: RLE) -> list[float]:
    """Exact box [x, y, w, h] of the RLE's pixels ([0, 0, 0, 0] when empty)."""
    return [float(v) for v in mask_utils.toBbox(_as_pycoco_rle(rle))]


def polygons_to_rle(polygons: Sequence[Sequence[float]], height: int, width: int) -> RLE:
    """COCO polygons [[x1, y1, x2, y2, ...], ...] -> one merged compressed RLE.

    Polygons with exactly 4 numbers are rejected: pycocotools would read them as a box.
    """
    polygons = [list(map(float, p)) for p in polygons]
    for i, poly in enumerate(polygons):
        if len(poly) < 6 or len(poly) % 2:
            raise ValueError(f"polygon {i} has {len(poly)} numbers; need an even count >= 6 (3 points)")
    rles = mask_utils.frPyObjects(polygons, height, width)
    rle = mask_utils.merge(rles)
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    return rle_to_mask(polygons_to_rle(polygons, height, width))


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Binary mask -> COCO polygons tracing the pixel *edges*, one per outer contour.

    The mask is upsampled 2x (nearest) so that the contour of the upsampled mask, mapped back with
    ceil(x / 2), runs along pixel corners: pycocotools then rasterises the polygons back to exactly
    the input pixels, one-pixel-wide cracks included. Holes are filled (COCO polygons cannot hold
    them); use RLE when holes matter.
    """
    upsampled = np.kron(_binary(mask), np.ones((2, 2), dtype=np.uint8))  # (H, W) -> (2H, 2W)
    contours, _ = cv2.findContours(upsampled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        corners = (contour.reshape(-1, 2) + 1) // 2  # upsampled pixel centre -> pixel corner
        polygons.append([float(v) for v in corners.reshape(-1)])
    return polygons


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> RLE:
    """Any COCO segmentation (polygon list, uncompressed or compressed RLE) -> compressed RLE."""
    if isinstance(segmentation, dict):
        rle = _as_pycoco_rle(segmentation)
        counts = rle["counts"]
        return {"size": [int(s) for s in rle["size"]],
                "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
    return polygons_to_rle(segmentation, height, width)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    return rle_to_mask(segmentation_to_rle(segmentation, height, width))


def mask_bbox(mask: np.ndarray) -> list[float]:
    """Exact box [x, y, w, h] of the nonzero pixels ([0, 0, 0, 0] when empty)."""
    ys, xs = np.nonzero(np.asarray(mask))
    if xs.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def connected_instances(binary: np.ndarray, connectivity: int = 8, min_area: int = 1) -> list[np.ndarray]:
    """Split a binary mask into its connected components, each an (H, W) uint8 {0, 1} mask.

    8-connectivity (default) keeps thin diagonal cracks whole; 4-connectivity splits them at
    every diagonal step. Components smaller than `min_area` pixels are dropped. Order: by the
    component's first pixel in raster order (top to bottom, left to right).
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    count, labels, stats, _ = cv2.connectedComponentsWithStats(_binary(binary), connectivity=connectivity)
    instances = []
    for label in range(1, count):
        if stats[label, cv2.CC_STAT_AREA] >= min_area:
            instances.append((labels == label).astype(np.uint8))
    return instances


def label_map(instances: Sequence[tuple[np.ndarray, int]], shape: tuple[int, int]) -> np.ndarray:
    """(mask, category_id) pairs -> uint8 (H, W) map of category ids, later instances on top."""
    out = np.zeros(shape, dtype=np.uint8)
    for mask, category_id in instances:
        if not 0 < int(category_id) < 256:
            raise ValueError(f"category id {category_id} does not fit a uint8 label map (1..255)")
        out[np.asarray(mask) != 0] = int(category_id)
    return out


def crop_to_content(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Tight crop of a binary mask and the (y, x) of its top-left corner in the input."""
    x, y, w, h = (int(v) for v in mask_bbox(mask))
    return _binary(mask)[y:y + h, x:x + w].copy(), (y, x)

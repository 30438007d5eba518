"""The fixed class palette of the topological driver: one RGB colour per category id.

Ids 1-12 use the table below (saturated, far apart, every colour has a channel at 255 so no class
colour can be confused with the driver's grey topology levels 0..50). Ids 13-255 get colours
generated from a golden-ratio hue walk at full value; all 255 colours are distinct. 0 is the
background and has no colour.

    id  colour              id  colour
     1  (255,   0,   0) red        7  (255, 128,   0) orange
     2  (  0, 255,   0) green      8  (128,   0, 255) violet
     3  (  0,   0, 255) blue       9  (  0, 128, 255) azure
     4  (255, 255,   0) yellow    10  (255,   0, 128) rose
     5  (255,   0, 255) magenta   11  (128, 255,   0) lime
     6  (  0, 255, 255) cyan      12  (  0, 255, 128) spring green
"""
from __future__ import annotations

import colorsys

Color = tuple[int, int, int]

BASE_PALETTE: tuple[Color, ...] = (
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 128, 0), (128, 0, 255), (0, 128, 255), (255, 0, 128), (128, 255, 0), (0, 255, 128),
)

MAX_CATEGORY_ID = 255  # masks are uint8 label maps


def _generated_color(category_id: int) -> Color:
    k = category_id - len(BASE_PALETTE)
    hue = (k * 0.6180339887498949) % 1.0
    saturation = (1.0, 0.75, 0.5)[k % 3]
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, 1.0)
    return (round(r * 255), round(g * 255), round(b * 255))


def class_color(category_id: int) -> Color:
    """RGB colour of a category id (1..255)."""
    category_id = int(category_id)
    if not 1 <= category_id <= MAX_CATEGORY_ID:
        raise ValueError(f"category id {category_id} has no palette colour; ids run 1..{MAX_CATEGORY_ID}")
    if category_id <= len(BASE_PALETTE):
        return BASE_PALETTE[category_id - 1]
    return _generated_color(category_id)


# The full table, index = category id (row 0 = background, black).
PALETTE: tuple[Color, ...] = ((0, 0, 0),) + tuple(class_color(i) for i in range(1, MAX_CATEGORY_ID + 1))

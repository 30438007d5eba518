"""Line plots of training curves as PNG, drawn with OpenCV (matplotlib is not a dependency).

    plot_curves([Curve("loss", steps, losses), Curve("adherence", val_steps, scores, (0, 1))],
                "runs/condition/curves.png")

One panel per curve, side by side: the axes box, the y range's ends and middle and the x range's
ends as numbers, the values as a polyline (dots when there are few points).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from data.files import write_image_atomic

INK, GRID, LINE = (40, 40, 40), (225, 225, 225), (31, 119, 180)  # RGB
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class Curve:
    """One panel: values y over x (same length); y_range None = the data's range."""
    title: str
    x: Sequence[float]
    y: Sequence[float]
    y_range: tuple[float, float] | None = None


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def _panel(curve: Curve, width: int, height: int) -> np.ndarray:
    """One curve drawn on a white RGB uint8 (height, width, 3) canvas."""
    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 60, 15, 30, 35
    cv2.putText(canvas, curve.title, (left, 20), FONT, 0.5, INK, 1, cv2.LINE_AA)
    points = [(float(x), float(y)) for x, y in zip(curve.x, curve.y, strict=True) if math.isfinite(float(y))]
    if curve.y_range is not None:
        y_low, y_high = curve.y_range
    elif points:
        y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    else:
        y_low, y_high = 0.0, 1.0
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    x_low = min((p[0] for p in points), default=0.0)
    x_high = max((p[0] for p in points), default=1.0)
    if x_high - x_low < 1e-12:
        x_low, x_high = x_low - 0.5, x_high + 0.5
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_pixel(x: float, y: float) -> tuple[int, int]:
        u = left + (x - x_low) / (x_high - x_low) * plot_w
        v = top + (1.0 - (y - y_low) / (y_high - y_low)) * plot_h
        return int(round(u)), int(round(v))

    for fraction in (0.0, 0.5, 1.0):  # horizontal grid lines with their values
        value = y_low + fraction * (y_high - y_low)
        _, v = to_pixel(x_low, value)
        cv2.line(canvas, (left, v), (left + plot_w, v), GRID, 1)
        cv2.putText(canvas, _label(value), (4, v + 4), FONT, 0.35, INK, 1, cv2.LINE_AA)
    cv2.rectangle(canvas, (left, top), (left + plot_w, top + plot_h), INK, 1)
    for value, anchor in ((x_low, left), (x_high, left + plot_w - 30)):
        cv2.putText(canvas, _label(value), (anchor, top + plot_h + 15), FONT, 0.35, INK, 1, cv2.LINE_AA)
    cv2.putText(canvas, "step", (left + plot_w // 2 - 12, height - 6), FONT, 0.4, INK, 1, cv2.LINE_AA)
    if points:
        pixels = np.array([to_pixel(x, y) for x, y in points], np.int32)
        cv2.polylines(canvas, [pixels.reshape(-1, 1, 2)], False, LINE, 2, cv2.LINE_AA)
        if len(pixels) <= 50:
            for u, v in pixels:
                cv2.circle(canvas, (int(u), int(v)), 3, LINE, -1, cv2.LINE_AA)
    return canvas


def plot_curves(curves: Sequence[Curve], path: str | os.PathLike, panel_size: tuple[int, int] = (420, 300)) -> Path:
    """Write the curves side by side as one PNG (atomically); returns the path."""
    width, height = panel_size
    image = np.concatenate([_panel(c, width, height) for c in curves], axis=1)  # panels left to right
    write_image_atomic(path, image)
    return Path(path)


def plot_metrics(metrics_path: str | os.PathLike, terms: Sequence[str], path: str | os.PathLike) -> Path | None:
    """curves.png of a training stage: one panel per loss term over steps, read from its
    metrics.jsonl (the whole run, resumed parts included); None if there is nothing to plot."""
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return None
    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    curves = [Curve(term.replace("_", " "), [r["step"] for r in records if term in r],
                    [r[term] for r in records if term in r]) for term in terms]
    curves = [c for c in curves if len(c.x)]
    return plot_curves(curves, path) if curves else None

"""Report helpers: Markdown tables, number formatting and PNG bar charts drawn with OpenCV.

Charts need no matplotlib: `bar_chart` draws grouped bars (one colour per series, a legend, value
labels, a 0-based y axis with 5 grid lines) on a white canvas and writes it atomically.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from data.files import write_bytes_atomic, write_image_atomic

# Distinct colours (RGB) for series, colour-blind friendly (Okabe-Ito).
PALETTE = ((0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0),
           (240, 228, 66), (0, 0, 0))


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers to `digits` decimals, None / NaN as "n/a", strings as they are."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style Markdown table; cells go through `fmt` unless already strings."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def json_ready(value: Any) -> Any:
    """A copy with NaN / infinite floats as None (strict JSON has no NaN) and tuples as lists."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _text(canvas: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45, color=(40, 40, 40),
          thickness: int = 1, center: bool = False) -> None:
    if center:
        (w, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        org = (org[0] - w // 2, org[1])
    cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thickness, cv2.LINE_AA)


def bar_chart(path: str | os.PathLike, groups: Sequence[str], series: dict[str, Sequence[float]], title: str,
              ylabel: str = "", width: int = 900, height: int = 480, digits: int = 2) -> Path:
    """Grouped bar chart: one group of bars per entry of `groups`, one bar per series.

    series: name -> values (len(groups)); NaN / None values are drawn as "n/a" without a bar.
    """
    names = list(series)
    for name in names:
        if len(series[name]) != len(groups):
            raise ValueError(f"bar_chart {title!r}: series {name!r} has {len(series[name])} values "
                             f"for {len(groups)} groups")
    values = np.array([[np.nan if v is None else float(v) for v in series[n]] for n in names], dtype=np.float64)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    top *= 1.15  # headroom for the value labels
    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, upper, lower = 70, 20, 60, 70
    plot_w, plot_h = width - left - right, height - upper - lower
    _text(canvas, title, (width // 2, 28), 0.6, thickness=1, center=True)
    if ylabel:
        _text(canvas, ylabel, (8, upper - 12), 0.45)
    for i in range(6):  # y grid and tick labels
        y = upper + plot_h - int(plot_h * i / 5)
        cv2.line(canvas, (left, y), (left + plot_w, y), (225, 225, 225), 1)
        _text(canvas, f"{top * i / 5:.{digits}f}", (6, y + 4), 0.4)
    cv2.line(canvas, (left, upper), (left, upper + plot_h), (0, 0, 0), 1)
    cv2.line(canvas, (left, upper + plot_h), (left + plot_w, upper + plot_h), (0, 0, 0), 1)
    group_w = plot_w / max(len(groups), 1)
    bar_w = group_w * 0.8 / max(len(names), 1)
    for g, group in enumerate(groups):
        x0 = left + g * group_w + group_w * 0.1
        for s, name in enumerate(names):
            value = values[s, g]
            bx = int(x0 + s * bar_w)
            color = PALETTE[s % len(PALETTE)]
            if np.isfinite(value):
                by = upper + plot_h - int(plot_h * max(value, 0.0) / top)
                cv2.rectangle(canvas, (bx + 1, by), (int(bx + bar_w) - 1, upper + plot_h), color, -1)
                _text(canvas, f"{value:.{digits}f}", (int(bx + bar_w / 2), by - 4), 0.35, center=True)
            else:
                _text(canvas, "n/a", (int(bx + bar_w / 2), upper + plot_h - 4), 0.35, center=True)
        _text(canvas, group, (int(left + (g + 0.5) * group_w), upper + plot_h + 20), 0.42, center=True)
    lx = left + 10
    for s, name in enumerate(names):  # legend below the axis
        cv2.rectangle(canvas, (lx, height - 30), (lx + 14, height - 16), PALETTE[s % len(PALETTE)], -1)
        _text(canvas, name, (lx + 20, height - 18), 0.42)
        (w, _), _ = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.42, 1)
        lx += w + 45
    path = Path(path)
    write_image_atomic(path, canvas)  # canvas colours are RGB, as write_image_atomic expects
    return path

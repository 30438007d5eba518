"""What a training loop shows and guards: JSONL metrics, the progress bar, PNG grids, the
non-finite-loss stop and the SIGTERM/SIGINT save-and-exit request."""
from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from torchvision.io import encode_png
from torchvision.utils import make_grid
from tqdm.auto import tqdm


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and every loss term."""


def check_finite(step: int, terms: dict[str, float]) -> None:
    """Stop the run if any loss term is NaN/inf. `step`: the optimizer step being computed,
    counted from 1 as in the logs and checkpoint names."""
    if not all(math.isfinite(v) for v in terms.values()):
        detail = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        raise NonFiniteLossError(
            f"non-finite loss at optimizer step {step}: {detail}. Nothing of this step was applied; "
            f"lower the lr, use bf16 instead of fp16, or resume from the last checkpoint.")


REPORT_TO = ("none", "tensorboard")


def window_mean(history: list[dict[str, float]], done: int, log_every: int) -> dict[str, float]:
    """The mean of every loss term over the logging window ending at step `done`: the steps after
    the previous multiple of `log_every` (a run's last, shorter window included). Only steps this
    process ran are in `history`, so the first window after a resume starts at the resume."""
    since = (done - 1) // log_every * log_every
    window = [h for h in history if since < h["step"] <= done]
    keys = [k for k in window[-1] if k != "step"] if window else []
    return {k: sum(h[k] for h in window) / len(window) for k in keys} | {"window_steps": len(window)}


def _tensorboard_writer(folder: Path):
    """torch's SummaryWriter, which needs the optional tensorboard package (extra "tensorboard")."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        from defectsynth.errors import UserError
        raise UserError(f"--report-to tensorboard needs the tensorboard package ({err}); install it with "
                        f"pip install tensorboard (or the extra: pip install -e .[tensorboard]), "
                        f"or use --report-to none") from err
    return SummaryWriter(log_dir=str(folder))


class MetricsLog:
    """Append-only JSONL file of metric records (one JSON object per line, flushed each time).

    On resume from step s, records with step > s (written after that checkpoint by the
    interrupted run) are dropped first, so the file reads as one uninterrupted run. With
    `report_to="tensorboard"` every numeric field of a record is also a TensorBoard scalar (event
    files in the folder of the JSONL file, under tensorboard/; `tensorboard --logdir OUT`).
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, enabled: bool = True,
                 report_to: str = "none"):
        self.path = Path(path)
        self.enabled = enabled
        self._board = None
        if report_to not in REPORT_TO:
            raise ValueError(f"--report-to must be one of {REPORT_TO}, got {report_to!r}")
        if not enabled:
            return
        if report_to == "tensorboard":
            self._board = _tensorboard_writer(self.path.parent / "tensorboard")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = []
            if resume_step is not None:
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash
                    if record.get("step", 0) <= resume_step:
                        kept.append(line)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            if self._board is not None and "step" in record:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self._board.add_scalar(key, value, record["step"])
                self._board.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._board is not None:
                self._board.close()


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> tqdm:
    """A tqdm bar counting optimizer steps (it/s = optimizer steps per second); the loop sets
    loss / lr with `bar.set_postfix(...)`."""
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                unit="step")


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write images (N, 3, H, W) in [-1, 1] as one PNG grid, atomically (temporary name, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(((images.detach().float().cpu() + 1) / 2).clamp(0, 1), nrow=nrow, padding=2)
    data = encode_png((grid * 255).round().to(torch.uint8))  # (3, H', W') uint8 -> PNG bytes
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.numpy().tobytes())
    os.replace(tmp, path)
    return path


class StopSignal:
    """Turns SIGTERM / SIGINT into a request the loop polls after each optimizer step, so the run
    finishes the step, saves a checkpoint and exits cleanly. A second Ctrl-C stops immediately.

        with StopSignal() as stop:
            for step in ...:
                ...
                if stop.requested: save; break
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested = False
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.received = signum

    def __enter__(self) -> "StopSignal":
        # Handlers can only be installed from the main thread (tests may run main() elsewhere).
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

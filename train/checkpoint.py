"""Training checkpoints: atomic folders with a completion marker, keep-last-K, resume.

Layout of one checkpoint (`<out>/checkpoints/step_00000400/`):

    weights.safetensors   trainable weights, float32, keys prefixed by network ("unet.", ...)
    state.pt              optimizer, grad scaler, EMA, step, RNG states of every rank, data
                          position, resolved config dict (torch.save; loads with weights_only)
    config.json           the resolved run config (defectsynth.runconfig.save_config_json)
    COMPLETE              marker: JSON {step, file sizes}, written last

Everything is written into a hidden temporary folder, the marker last, and the folder is then
renamed into place, so a folder named step_* is complete unless its files were damaged later;
`list_checkpoints` also checks the sizes the marker recorded. A save interrupted at any point
leaves only the temporary folder, which `--resume latest` never looks at and the next save
removes.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from defectsynth.errors import UserError
from defectsynth.runconfig import config_to_dict, save_config_json

MARKER = "COMPLETE"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------- RNG states

def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Python, NumPy, torch CPU and CUDA global RNG states plus the named explicit generators
    (noise, timesteps, ...), as tensors and plain values so `torch.load(weights_only=True)` reads
    them back."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of `capture_rng_state`; every named generator must be present in the state."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": np_state["bit_generator"],
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"checkpoint RNG state has no generator {name!r}; "
                           f"it holds {sorted(state['generators'])}")
        g.set_state(state["generators"][name])


def _as_tuple(value: Any) -> Any:
    """random.setstate wants nested tuples; a round trip may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


# ---------------------------------------------------------------------------------- save / list

def save_checkpoint(root: str | os.PathLike, step: int, weights: dict[str, torch.Tensor],
                    state: dict, config: Any, keep_last: int = 0) -> Path:
    """Write checkpoint `step` under `root` atomically and prune to the newest `keep_last`
    complete checkpoints (0 keeps all). Returns the checkpoint folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{checkpoint_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
    torch.save(state, tmp / STATE_FILE)
    save_config_json(config, tmp / CONFIG_FILE)
    files = {name: (tmp / name).stat().st_size for name in (WEIGHTS_FILE, STATE_FILE, CONFIG_FILE)}
    for name in files:
        _fsync(tmp / name)
    # The marker is written last: its presence certifies the files listed in it.
    (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}) + "\n", encoding="utf-8")
    _fsync(tmp / MARKER)

    if final.exists():  # an older, possibly damaged copy of the same step
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    prune_checkpoints(root, keep_last)
    return final


def is_complete(folder: Path) -> bool:
    """The marker exists and every file it lists has the recorded size."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size
               for name, size in info.get("files", {}).items()) and bool(info.get("files"))


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftover temporary
    folders of interrupted saves."""
    for stale in root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def resolve_resume(root: str | os.PathLike, resume: str) -> Path | None:
    """`--resume` value -> checkpoint folder: "" -> None (fresh run); "latest" -> the newest
    complete checkpoint under `root`, or None if there is none yet; else a path, which must be
    a complete checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not is_complete(path):
        raise UserError(f"--resume {resume}: not a complete checkpoint folder "
                                f"(expected {WEIGHTS_FILE}, {STATE_FILE}, {CONFIG_FILE} and the {MARKER} marker)")
    return path


def load_checkpoint(folder: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable weights, state) of a checkpoint folder written by `save_checkpoint`."""
    folder = Path(folder)
    weights = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return weights, state


def with_prefix(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"unet." + key: tensor}: several networks' weights in one checkpoint file."""
    return {prefix + k: v for k, v in state.items()}


def strip_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one network from a `with_prefix` dict, prefix removed."""
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def check_resume_config(saved: dict[str, Any], cfg: Any, path: str | os.PathLike,
                        may_change: set[str] | frozenset[str] = frozenset()) -> None:
    """A resumed run must train the same thing: fields outside `may_change` (bookkeeping such
    as --steps or logging intervals) must equal the checkpoint's; the error names the others."""
    current = config_to_dict(cfg)
    changed = sorted(k for k in current if k not in may_change and saved.get(k) != current[k])
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise UserError(f"--resume {path}: the checkpoint was trained with a different config ({detail}); "
                         f"start a new --out folder or use the checkpoint's settings")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from defectsynth.errors import UserError, disk_full, is_disk_full
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
    for stale in root.glob(".step_*.tmp"):  # interrupted saves: free their space before writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
        torch.save(state, tmp / STATE_FILE)
        save_config_json(config, tmp / CONFIG_FILE)
        files = {name: (tmp / name).stat().st_size for name in (WEIGHTS_FILE, STATE_FILE, CONFIG_FILE)}
        for name in files:
            _fsync(tmp / name)
        # The marker is written last: its presence certifies the files listed in it.
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}) + "\n", encoding="utf-8")
        _fsync(tmp / MARKER)
    except (OSError, RuntimeError) as err:
        # torch.save reports a full disk as "unexpected pos N vs M", safetensors as an I/O error.
        if not (is_disk_full(err) or "unexpected pos" in str(err)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        # About the weights plus AdamW's two moments: the size of a checkpoint of this run.
        needed = 3 * sum(v.numel() * v.element_size() for v in weights.values())
        raise disk_full(tmp, needed) from err

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
        for folder in reversed(list_checkpoints(root)):
            damage = checkpoint_damage(folder)
            if damage is None:
                return folder
            print(f"--resume latest: skipping damaged checkpoint {folder} ({damage}); trying the previous one")
        return None
    path = Path(resume)
    if not is_complete(path):
        raise UserError(f"--resume {resume}: not a complete checkpoint folder "
                                f"(expected {WEIGHTS_FILE}, {STATE_FILE}, {CONFIG_FILE} and the {MARKER} marker)")
    damage = checkpoint_damage(path)
    if damage is not None:
        raise UserError(f"--resume {resume}: the checkpoint is damaged ({damage}); resume from an earlier one")
    return path


def checkpoint_damage(folder: Path) -> str | None:
    """Why a complete-looking checkpoint cannot be read (its header or archive is damaged), else
    None. Cheap: the safetensors header and the state.pt archive index, no tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as err:
        return f"{folder / WEIGHTS_FILE}: {err}"
    try:
        torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable archive is damage, named with its path
        return f"{folder / STATE_FILE}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def load_checkpoint(folder: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable weights, state) of a checkpoint folder written by `save_checkpoint`."""
    from safetensors import SafetensorError

    folder = Path(folder)
    try:
        weights = load_file(str(folder / WEIGHTS_FILE), device=str(device))
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"{folder}: damaged checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                        f"resume from an earlier one") from err
    return weights, state


def with_prefix(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"unet." + key: tensor}: several networks' weights in one checkpoint file."""
    return {prefix + k: v for k, v in state.items()}


def strip_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one network from a `with_prefix` dict, prefix removed."""
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


RUN_FILES = ("config.json", "checkpoints", "metrics.jsonl")  # what marks a folder as holding a run
ARCHIVE = "previous_runs"


def run_in_folder(out: str | os.PathLike) -> list[str]:
    """The files of a training run found in `out` (config, checkpoints, metrics), e.g. ["config.json"]."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()] + \
        sorted(p.name for p in out.glob("*metrics.jsonl") if p.name != "metrics.jsonl") if out.is_dir() else []


def refuse_to_overwrite(out: str | os.PathLike, resume: str, overwrite: bool) -> None:
    """A fresh run (no --resume) into a folder that holds a run is refused unless --overwrite:
    the old run's metrics, config and checkpoints would be replaced or mixed with the new ones.
    Call before anything is loaded or written."""
    found = run_in_folder(out)
    if found and not resume and not overwrite:
        steps = list_checkpoints(Path(out) / "checkpoints")
        last = f", last checkpoint {steps[-1].name}" if steps else ""
        raise UserError(f"--out {out} already holds a run ({', '.join(found)}{last}); continue it with "
                        f"--resume latest, or pass --overwrite to move it to {Path(out) / ARCHIVE}/ and "
                        f"start over, or choose another --out")


def archive_previous_run(out: str | os.PathLike, resume: str, overwrite: bool, keep: tuple[str, ...] = ()) -> Path | None:
    """With --overwrite and no --resume: move everything in `out` except `keep` (and earlier
    archives) to OUT/previous_runs/<UTC time>/ and say so. Call after every input check passed."""
    out = Path(out)
    if resume or not overwrite or not run_in_folder(out):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = out / ARCHIVE / stamp
    suffix = 1
    while target.exists():
        target, suffix = out / ARCHIVE / f"{stamp}_{suffix}", suffix + 1
    target.mkdir(parents=True)
    moved = []
    for entry in sorted(out.iterdir()):
        if entry.name in (ARCHIVE, *keep):
            continue
        os.replace(entry, target / entry.name)
        moved.append(entry.name)
    print(f"--overwrite: moved the previous run in {out} ({', '.join(moved)}) to {target}")
    return target


def _relative_to_out(value: Any, out: Any) -> Any:
    """A path inside OUT as 'OUT/...', so a run folder resumes after it was moved."""
    if isinstance(value, str) and isinstance(out, str) and out:
        root = os.path.normpath(out)
        normal = os.path.normpath(value) if value else value
        if normal == root:
            return "OUT"
        if normal and normal.startswith(root + os.sep):
            return "OUT/" + normal[len(root) + 1:]
    return value


def check_resume_config(saved: dict[str, Any], cfg: Any, path: str | os.PathLike,
                        may_change: set[str] | frozenset[str] = frozenset()) -> None:
    """A resumed run must train the same thing: fields outside `may_change` (bookkeeping such
    as --steps or logging intervals) must equal the checkpoint's; the error names the others.
    Paths inside the output folder compare relative to it, so a moved run folder resumes."""
    current = config_to_dict(cfg)
    saved = {k: _relative_to_out(v, saved.get("out")) for k, v in saved.items()}
    current = {k: _relative_to_out(v, current.get("out")) for k, v in current.items()}
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

"""Where a result came from: package version, git commit, torch version, device.

`provenance(device)` is the record every stage's config.json, run_config.json and report.md carry
(under the key "provenance"; loading a config ignores it). The git commit is read only when the
package runs from a git checkout and `git` is installed; otherwise it is absent, never guessed.
Standard library only at import time (torch is imported when a record is built).
"""
from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from defectsynth import __version__

SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the checkout (or site-packages) holding the packages


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout the code runs from, with "+dirty" when tracked files changed;
    None when it is not a git checkout or git is unavailable."""
    if not (SOURCE_ROOT / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(SOURCE_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit or None


def device_name(device: Any) -> str:
    """'cuda:0 (NVIDIA H100 80GB HBM3)' / 'cpu (x86_64)': the device and what it is."""
    import torch
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return str(device)  # e.g. an unresolved "auto": recorded as given
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.machine() or 'unknown'})"
    return str(device)


def provenance(device: Any = None) -> dict[str, Any]:
    """{"defectsynth", "git_commit" (if known), "torch", "python", "device" (if given)}."""
    import torch
    record: dict[str, Any] = {"defectsynth": __version__}
    commit = git_commit()
    if commit:
        record["git_commit"] = commit
    record["torch"] = torch.__version__
    record["python"] = platform.python_version()
    if device is not None:
        record["device"] = device_name(device)
    return record


def version_line() -> str:
    """What `defectsynth --version` prints: 'defectsynth 0.1.0 (git abc123..., torch 2.x, python 3.x)'."""
    import torch
    commit = git_commit()
    parts = ([f"git {commit}"] if commit else []) + [f"torch {torch.__version__}",
                                                     f"python {platform.python_version()}"]
    return f"defectsynth {__version__} ({', '.join(parts)})"

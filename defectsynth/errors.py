"""One error path for every command: expected mistakes print one line and exit 2.

An *expected* error is the user's to fix: a bad flag, a file that is missing, damaged or of the
wrong kind, data that breaks a contract, a full disk. Code that detects one raises `UserError`
(a ValueError, so existing `except ValueError` keeps working) with a message that names the file,
key or field, what was expected and what to do. Every stage's `cli(argv)` is wrapped by
`@command("<stage>")`, which turns such an error into

    defectsynth <stage>: <message on one line>

on stderr and exit status 2. Anything else (a bug) keeps its traceback. An OSError (no such file,
permission denied, a directory where a file was expected: the environment, not the code) is
expected too, and ENOSPC becomes "disk full while writing PATH". Standard library only: every package imports it.
"""
from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

EXIT_USAGE = 2


class UserError(ValueError):
    """An expected mistake (bad flag, file, data or disk): the CLI prints one line and exits 2."""


class DiskFullError(UserError):
    """Writing a file failed with ENOSPC; the message names it and how much space was needed."""
    errno = errno.ENOSPC


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_full(path: str | os.PathLike, needed_bytes: int | None = None) -> DiskFullError:
    """The error to raise when writing `path` ran out of space (needed_bytes: an estimate)."""
    facts = [f"needed about {max(1, -(-needed_bytes // 2**20))} MB"] if needed_bytes else []
    try:
        facts.append(f"{shutil.disk_usage(_existing_parent(Path(path))).free / 2**20:.0f} MB free")
    except OSError:
        pass
    detail = f" ({', '.join(facts)})" if facts else ""
    return DiskFullError(f"disk full while writing {path}{detail}; free some space or write to another disk")


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) or \
        "No space left on device" in str(err)


def one_line(text: str) -> str:
    """A possibly multi-line message as one line (lines joined with '; ')."""
    parts = [line.strip() for line in str(text).splitlines() if line.strip()]
    joined = ""
    for part in parts:
        joined += ("" if not joined else " " if joined.endswith(":") else "; ") + part
    return joined or "error"


_MODULE_PREFIX = re.compile(r"^(?:train|sample|data|eval|weights|defectsynth)\.[a-z_]+: ")


def message_for(err: BaseException) -> str | None:
    """The one-line message of an expected error, or None for a bug (which keeps its traceback)."""
    if isinstance(err, UserError):
        return _MODULE_PREFIX.sub("", one_line(str(err)))
    if isinstance(err, OSError):
        if is_disk_full(err):
            return one_line(str(disk_full(err.filename or "the output folder")))
        if err.filename is not None:
            return f"{err.filename}: {err.strerror or err}"
        return one_line(str(err)) if str(err) else None  # e.g. the FID weights not on disk
    return None


def report(stage: str, err: BaseException) -> int | None:
    """Print the one line for an expected error and return 2; None for any other error."""
    text = message_for(err)
    if text is None:
        return None
    print(f"defectsynth {stage}: {text}", file=sys.stderr)
    return EXIT_USAGE


def command(stage: str) -> Callable:
    """Decorator for a stage's `cli(argv) -> int`: expected errors become one line and exit 2."""
    def decorate(cli: Callable) -> Callable:
        @functools.wraps(cli)
        def wrapped(argv: list[str] | None = None) -> int:
            try:
                return cli(argv)
            except (UserError, OSError) as err:
                code = report(stage, err)
                if code is None:
                    raise
                return code
        wrapped.stage = stage
        return wrapped
    return decorate


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that a bad flag raises UserError (one line, exit 2 through `command`)
    instead of printing the usage block; --help still prints the full help."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")

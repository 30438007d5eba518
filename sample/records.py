"""Per-image records of a synthesis run, model file hashes, and the COCO file and contact sheet
assembled from the records (so the dataset is built without recomputing anything).

Records are JSON lines appended to one file per shard (`records/shard-III-of-NNN.jsonl`). A batch's
records go out in one write, flushed and fsynced, after its PNGs were renamed into place, so a
record always means a finished image. A crash can tear only the last line of a file: readers skip
it, and the next append cuts it off first. Image ids are global, so records from different shard
layouts (a rerun with other --num-shards) merge by id.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from data.coco import Coco, new_coco
from defectsynth.errors import UserError

RECORDS_DIR = "records"


def records_path(out: Path, shard: int, num_shards: int) -> Path:
    return out / RECORDS_DIR / f"shard-{shard:03d}-of-{num_shards:03d}.jsonl"


class RecordLog:
    """Append-only JSONL file of per-image records."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # torn by a crash: drop the partial line
                with open(self.path, "r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def read_records(out: Path) -> dict[int, dict[str, Any]]:
    """image id -> record, from every shard file under OUT/records (a torn last line is skipped)."""
    records: dict[int, dict[str, Any]] = {}
    folder = Path(out) / RECORDS_DIR
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        lines = path.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if number == len(lines):  # the unterminated last line of a crashed append
                    continue
                raise UserError(f"{path}:{number}: not a JSON record ({err})") from err
            records.setdefault(int(record["image_id"]), record)
    return records


# ---------------------------------------------------------------------------------------------
# File hashes (sha256), cached by path + size + mtime
# ---------------------------------------------------------------------------------------------

def file_sha256(path: Path, cache: dict[str, dict[str, Any]]) -> str:
    """sha256 of a file; `cache` (path -> {size, mtime_ns, ino, sha256}) is read and updated. The
    inode is part of the key: a file replaced by an atomic rename within one tick of the file
    system's coarse clock keeps its size and mtime but not its inode."""
    path = Path(path).resolve()
    stat = path.stat()
    hit = cache.get(str(path))
    if hit and hit["size"] == stat.st_size and hit["mtime_ns"] == stat.st_mtime_ns and hit.get("ino") == stat.st_ino:
        return hit["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    cache[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ino": stat.st_ino,
                        "sha256": digest.hexdigest()}
    return digest.hexdigest()


def model_sha256(path: Path, cache: dict[str, dict[str, Any]]) -> str:
    """sha256 of a checkpoint file, or of a folder (diffusers): the hash of the sorted lines
    "<relative path> <file sha256>" of its files (hidden files skipped)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path, cache)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                          p.relative_to(path).parts))
    if not files:
        raise UserError(f"{path}: no files to hash")
    lines = "".join(f"{p.relative_to(path).as_posix()} {file_sha256(p, cache)}\n" for p in files)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# The COCO dataset and the contact sheet
# ---------------------------------------------------------------------------------------------

IMAGE_KEYS = ("condition_id", "pair_id", "sample_index", "seed", "prompt", "source_image", "variant")


def assemble_coco(records: dict[int, dict[str, Any]], categories: list[dict], out: Path,
                  info: dict[str, Any] | None = None) -> Coco:
    """The SADF COCO dataset from finished records: every "ok" image in id order with its masks
    (RLE, exact area and box, as recorded); annotation ids 1..M in image order. File names are
    absolute here (data.coco convention); `save_coco` stores them relative to the JSON's folder."""
    data = new_coco(categories)
    if info:
        data["info"].update(info)
    for image_id in sorted(records):
        record = records[image_id]
        if record["status"] != "ok":
            continue
        data["images"].append({"id": image_id, "file_name": str((Path(out) / record["file_name"]).resolve()),
                               "height": record["height"], "width": record["width"],
                               **{key: record[key] for key in IMAGE_KEYS}})
        for ann in record["annotations"]:
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": image_id, **ann})
    return data


def contact_sheet(rows: list[tuple[np.ndarray, list[np.ndarray | None]]], columns: int, pad: int = 2) -> np.ndarray:
    """A uint8 (H', W', 3) sheet: one row per (hint, samples) with the hint first, then up to
    `columns` samples (None or a missing sample leaves a grey cell), white padding."""
    height, width = rows[0][0].shape[:2]
    sheet = np.full((pad + len(rows) * (height + pad), pad + (columns + 1) * (width + pad), 3), 255, np.uint8)
    for r, (hint, samples) in enumerate(rows):
        cells = [hint, *list(samples)[:columns]]
        cells += [None] * (columns + 1 - len(cells))
        for c, cell in enumerate(cells):
            y, x = pad + r * (height + pad), pad + c * (width + pad)
            sheet[y:y + height, x:x + width] = 128 if cell is None else cell
    return sheet

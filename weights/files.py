"""Checkpoint files as key -> tensor sources: safetensors, torch pickles, sharded files, manifests.

A `TensorFile` answers `keys()`, `shape(key)`, `dtype(key)` without reading tensor data where the
format allows it (safetensors headers, memory-mapped torch zip files, manifests), and `get(key)`
reads one tensor. Loaders read and convert one tensor at a time, so a 4 GB file never needs two
copies in memory.

Pickle-based files (`.ckpt`, `.pth`, `.bin`) are only ever opened with
`torch.load(weights_only=True)`. The one non-tensor global that real SD checkpoints need is
Lightning's `ModelCheckpoint` class (old `.ckpt` files store callback states in a dict keyed by
that class); it is allow-listed under its exact name as an inert stand-in. Anything else that
would need a Python global is refused: there is no fallback to unsafe loading.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch

from defectsynth.errors import UserError, disk_full, is_disk_full

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")

# The safetensors dtype names (header strings) of the torch dtypes that SD files use.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Manifest dtype strings are torch names without "torch.".
_MANIFEST_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32}

LIGHTNING_MODEL_CHECKPOINT = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


class CheckpointError(UserError):
    """A checkpoint file or folder that cannot be read or loaded; the message names the file."""


class LightningModelCheckpointStandIn:
    """Inert stand-in for `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`.

    Old SD `.ckpt` files (sd-v1-4.ckpt, v1-5-pruned.ckpt) hold `{"callbacks": {ModelCheckpoint:
    {...}}}`: the class itself is a dict key, so unpickling must resolve that global. This class
    has no methods, no `__setstate__` and no `__reduce__`; if a file pickled an *instance*, the
    unpickler only fills its `__dict__` with plain data (tensors, numbers, strings, containers).
    """


# (object, full pickle name): torch's weights_only unpickler resolves globals by this exact name.
ALLOWED_PICKLE_GLOBALS = [(LightningModelCheckpointStandIn, LIGHTNING_MODEL_CHECKPOINT)]


class TensorFile:
    """Read access to the tensors of one checkpoint (file, shard set or manifest)."""

    path: str
    metadata: dict[str, str]   # safetensors `__metadata__` (empty for other formats)
    info: dict[str, object]    # non-tensor top-level entries of a pickle (global_step, epoch, ...)

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the key's shape and dtype: layout checks need no data."""
        return torch.empty(self.shape(key), dtype=self.dtype(key), device="meta")

    def __contains__(self, key: str) -> bool:
        return key in self._key_set()

    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache



class SafetensorsFile(TensorFile):
    """A memory-mapped `.safetensors` file: the header gives keys, shapes and dtypes; data is read per key."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.path = str(path)
        try:
            self._handle = safe_open(self.path, framework="pt", device="cpu")
            self._keys = list(self._handle.keys())
            self._slices = {k: self._handle.get_slice(k) for k in self._keys}
            self.metadata = dict(self._handle.metadata() or {})
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({err})") from err
        self.info = {}

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slices[key].get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._slices[key].get_dtype()
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {name}")
        return _SAFETENSORS_DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return self._handle.get_tensor(key)
        except SafetensorError as err:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r} ({err})") from err


class DictFile(TensorFile):
    """Tensors already in memory (an unpickled state dict, or meta tensors from a manifest)."""

    def __init__(self, path: str, tensors: Mapping[str, torch.Tensor],
                 info: Mapping[str, object] | None = None, metadata: Mapping[str, str] | None = None):
        self.path = str(path)
        self._tensors = dict(tensors)
        self.info = dict(info or {})
        self.metadata = dict(metadata or {})

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


class ShardedFile(TensorFile):
    """Several files behind a `*.index.json` weight map (transformers / diffusers sharding)."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = str(index_path)
        try:
            weight_map = json.loads(Path(index_path).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{self.path}: not a valid shard index ({err})") from err
        folder = Path(index_path).parent
        self._files = {name: open_tensor_file(folder / name) for name in sorted(set(weight_map.values()))}
        self._where = {key: self._files[name] for key, name in weight_map.items()}
        for name, shard in self._files.items():
            missing = sorted(set(k for k, n in weight_map.items() if n == name) - set(shard.keys()))
            if missing:
                raise CheckpointError(f"{self.path}: shard {name} lacks {len(missing)} indexed key(s), "
                                      f"e.g. {missing[:3]}")
        self.info, self.metadata = {}, {}

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(key)

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get(key)


def _torch_load(path: str, mmap: bool) -> object:
    with torch.serialization.safe_globals(ALLOWED_PICKLE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_pickle(path: str | os.PathLike) -> DictFile:
    """A `.ckpt` / `.pth` / `.bin` file through `torch.load(weights_only=True)` only.

    Zip-format files are memory-mapped; legacy (pre-1.6) files are read whole. A `state_dict`
    entry (Lightning `.ckpt`) is unwrapped; other top-level entries that are not tensors
    (`global_step`, `epoch`, `callbacks`, ...) are kept in `.info`.
    """
    path = str(path)
    try:
        try:
            obj = _torch_load(path, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = _torch_load(path, mmap=False)  # legacy (non-zip) serialization cannot be mapped
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"the Python global {found.group(1)}" if found else "a Python object"
        # torch's message also suggests weights_only=False; pass on only the line naming the problem.
        detail = next((line.strip() for line in str(err).splitlines()
                       if re.search(r"GLOBAL|reduce|build|allowlist", line) and "weights_only" not in line), "")
        raise CheckpointError(
            f"{path}: refused to unpickle: the file needs {what}, which is not on the allow-list "
            f"(tensors, plain containers and Lightning's ModelCheckpoint class only). weights/ never "
            f"falls back to unsafe loading; if you trust the file, convert it to .safetensors with a "
            f"tool you trust." + (f" ({detail})" if detail else "")
        ) from err
    except Exception as err:  # noqa: BLE001 - torch's unpickler on a non-checkpoint raises anything (IndexError, ...)
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    info: dict[str, object] = {}
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        info = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    tensors = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        tensors[str(key)] = value
    return DictFile(path, tensors, info=info)


def read_manifest(path: str | os.PathLike) -> DictFile:
    """A key manifest (`key -> [shape, dtype]`, see ../shared/manifests) as meta tensors."""
    path = str(path)
    opener = __import__("gzip").open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            entries = json.load(handle)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable manifest ({err})") from err
    tensors = {}
    for key, entry in entries.items():
        try:
            shape, dtype = entry
            tensors[key] = torch.empty(shape, dtype=_MANIFEST_DTYPES[dtype], device="meta")
        except (ValueError, TypeError, KeyError) as err:
            raise CheckpointError(f"{path}: entry {key!r} = {entry!r} is not [shape, dtype] "
                                  f"with dtype in {sorted(_MANIFEST_DTYPES)}") from err
    return DictFile(path, tensors)


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _refuse_lfs_pointer(path: Path) -> None:
    """A git-lfs pointer (a ~130-byte text file where the weights should be) is named as one;
    otherwise it reads as a corrupt header or an unsafe pickle."""
    with open(path, "rb") as handle:
        head = handle.read(len(LFS_POINTER))
    if head == LFS_POINTER:
        raise CheckpointError(f"{path}: a git-lfs pointer file ({path.stat().st_size} bytes), not the weights; "
                              f"run `git lfs pull` in its repository or download the file itself")


def open_tensor_file(path: str | os.PathLike) -> TensorFile:
    """Open one weights file by its suffix (.safetensors, .ckpt/.pth/.pt/.bin, *.index.json)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    _refuse_lfs_pointer(path)
    name = path.name
    if name.endswith(".index.json"):
        return ShardedFile(path)
    if name.endswith(SAFETENSORS_SUFFIXES):
        return SafetensorsFile(path)
    if name.endswith(PICKLE_SUFFIXES):
        return read_pickle(path)
    raise CheckpointError(f"{path}: unknown weights file type; expected one of "
                          f"{SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES} or a *.index.json shard index")


def atomic_path(path: str | os.PathLike) -> Path:
    """The temporary name a file is written to before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write a `.safetensors` file atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except Exception as err:
        if is_disk_full(err):  # safetensors reports ENOSPC as its own error type; say which file
            raise disk_full(path, sum(v.numel() * v.element_size() for v in tensors.values())) from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def save_json(data: object, path: str | os.PathLike) -> None:
    """Write JSON atomically, in the indented, key-sorted style diffusers uses for config.json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_text(text: str, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


class MergedFile(TensorFile):
    """Several tensor sources seen as one; `prefixes[i]` is prepended to the keys of `files[i]`."""

    def __init__(self, path: str, files: list[TensorFile], prefixes: list[str]):
        self.path = str(path)
        self._where: dict[str, tuple[TensorFile, str]] = {}
        for file, prefix in zip(files, prefixes):
            for key in file.keys():
                if prefix + key in self._where:
                    raise CheckpointError(f"{file.path}: key {key!r} also exists in "
                                          f"{self._where[prefix + key][0].path}")
                self._where[prefix + key] = (file, key)
        self.info = dict(files[0].info)
        self.metadata = dict(files[0].metadata)
        self.files = list(files)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        file, inner = self._where[key]
        return file.shape(inner)

    def dtype(self, key: str) -> torch.dtype:
        file, inner = self._where[key]
        return file.dtype(inner)

    def get(self, key: str) -> torch.Tensor:
        file, inner = self._where[key]
        return file.get(inner)

"""Run configs as frozen dataclasses: argparse parsers built from them, JSON round trips.

Every script has a run-config dataclass. Its fields are the command-line flags (`lr` ->
`--lr`, `num_class_images` -> `--num-class-images`), its defaults are the documented defaults,
and the field's `metadata["help"]` is the help text. `main(cfg)` takes the dataclass, so tests
build configs directly and never go through argv.

    @dataclass(frozen=True)
    class GenerateConfig:
        prompt: str = field(default="", metadata={"help": "text prompt"})
        steps: int = 20
        sampler: str = field(default="ddim", metadata={"choices": ["ddpm", "ddim", "dpmpp"]})

    parser = parser_from_dataclass(GenerateConfig, description="...")
    cfg = config_from_args(GenerateConfig, parser.parse_args())
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from defectsynth.errors import OneLineParser, UserError

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); `int` -> (int, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _str2bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one flag per field of the dataclass `cls` to `parser`.

    Booleans become `--flag / --no-flag`; `tuple[X, ...]` fields take several values
    (`--seeds 1 2 3`); `X | None` fields accept `none`. Required fields (no default) become
    required flags.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", "")}
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            text = kwargs["help"]
            if has_default and isinstance(default, bool):
                text = f"{text} (default: {'on' if default else 'off'})".strip()
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=text)
            continue
        origin = typing.get_origin(tp)
        if origin in (tuple, list):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kwargs["nargs"] = "*"
            kwargs["type"] = item
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        if optional:
            base = kwargs["type"]
            kwargs["type"] = lambda text, base=base: None if text.lower() == "none" else base(text)
            if None in kwargs.get("choices", ()):  # spelled "none" on the command line
                kwargs["metavar"] = "{" + ",".join("none" if c is None else str(c) for c in kwargs["choices"]) + "}"
        if has_default:
            kwargs["default"] = default
            if kwargs["help"] is not None and default not in (None, "", ()):
                kwargs["help"] = f"{kwargs['help']} (default: {default})".strip()
        else:
            kwargs["required"] = True
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def parser_from_dataclass(cls: type, description: str | None = None,
                          prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of `cls` (see `add_dataclass_arguments`)."""
    parser = OneLineParser(  # a bad flag is one line and exit 2 (defectsynth/errors.py)
        description=description or (cls.__doc__ or "").strip().split("\n")[0], prog=prog)
    return add_dataclass_arguments(parser, cls)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build the dataclass from parsed arguments (tuple fields become tuples)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        tp, _ = _unwrap_optional(hints[f.name])
        if typing.get_origin(tp) is tuple and value is not None:
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) dataclass; tuples become lists, paths strings."""
    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value
    return convert(cfg)


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Rebuild a dataclass from `config_to_dict` output; unknown fields are an error naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; "
                         f"expected some of {sorted(names)}")
    values = {}
    for name, value in data.items():
        tp, _ = _unwrap_optional(hints[name])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = config_from_dict(tp, value, source=f"{source}.{name}")
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def save_config_json(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON, atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config_to_dict(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_config_json(cls: type[T], path: str | os.PathLike) -> T:
    """Read a config written by `save_config_json`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err
    return config_from_dict(cls, data, source=str(path))

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

Spellings (docs/coming_from.md has the table): every flag also answers to its underscore spelling
(`--num_class_images`); the familiar names of diffusers' and kohya's scripts in `FAMILIAR` are
aliases of our field with the same meaning (`--learning_rate` -> `--lr`), hidden from `--help`
but listed in its epilog. A field renamed in the past names its old spellings in
`metadata["formerly"]`: old flags keep working with a deprecation line on stderr, and old JSON
configs keep loading (same line), unless `metadata["refuse_formerly"]` says why the old flag would
be misread, in which case the old flag is an error saying what to use. Every parser built by
`parser_from_dataclass` also takes `--config FILE` (a JSON of field values, e.g. a stage's saved
config.json; flags given on the command line override it) and `--print-config`.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from defectsynth.errors import OneLineParser, UserError

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_flag(f: dataclasses.Field) -> str:
    """A field's canonical flag: from its name, or from `metadata["flag"]` where the command line
    spells the concept differently from the Python field (GenerateConfig.batch is --batch-size)."""
    return _flag(f.metadata.get("flag", f.name))


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


# Familiar flag -> (our field, value translation or None). Names from diffusers' example scripts
# (train_dreambooth.py, train_controlnet.py, their pipelines' call arguments) and kohya's sd-scripts
# (train_db.py, gen_img.py), accepted only where the meaning is ours too; a stage gets an alias
# only if it has the field. docs/coming_from.md lists them, and what is not supported and why.
FAMILIAR: dict[str, tuple[str, dict[str, str] | None]] = {
    # model, data, output
    "pretrained_model_name_or_path": ("ckpt", None),
    "output_dir": ("out", None),
    "instance_data_dir": ("data", None),
    "train_data_dir": ("data", None),            # kohya
    "class_data_dir": ("class_dir", None),
    "reg_data_dir": ("class_dir", None),         # kohya: regularisation = class images
    # prompts and sampling
    "num_inference_steps": ("steps", None),
    "guidance_scale": ("guidance", None),
    "cfg_scale": ("guidance", None),             # kohya gen_img
    "num_images_per_prompt": ("num", None),
    "controlnet_conditioning_scale": ("control_scale", None),
    "controlnet_model_name_or_path": ("control", None),
    "control_guidance_start": ("control_start", None),
    "control_guidance_end": ("control_end", None),
    # optimisation
    "learning_rate": ("lr", None),
    "train_batch_size": ("batch_size", None),
    "max_train_steps": ("steps", None),
    "gradient_accumulation_steps": ("grad_accum", None),
    "lr_scheduler": ("lr_schedule", None),
    "adam_epsilon": ("adam_eps", None),
    "adam_weight_decay": ("weight_decay", None),
    "mixed_precision": ("precision", {"no": "fp32"}),
    "with_prior_preservation": ("with_prior", None),
    "sample_batch_size": ("class_batch_size", None),
    "use_ema": ("ema", None),
    # run
    "checkpointing_steps": ("checkpoint_every", None),
    "save_every_n_steps": ("checkpoint_every", None),   # kohya
    "checkpoints_total_limit": ("keep_last", None),
    "resume_from_checkpoint": ("resume", None),
    "sample_every_n_steps": ("validate_every", None),  # kohya
    "save_precision": ("save_dtype", {"float": "fp32"}),  # kohya
    "log_with": ("report_to", None),                    # kohya
}

# The program name `--help` shows: `defectsynth <stage>` when the umbrella command dispatched it.
_PROG: contextvars.ContextVar[str | None] = contextvars.ContextVar("defectsynth_prog", default=None)


@contextlib.contextmanager
def invoked_as(prog: str):
    """Parsers built inside this block call themselves `prog` (e.g. "defectsynth concept")."""
    token = _PROG.set(prog)
    try:
        yield
    finally:
        _PROG.reset(token)


def _spellings(name: str) -> list[str]:
    """'num_class_images' -> ['--num-class-images', '--num_class_images'] (one entry if no '_')."""
    return list(dict.fromkeys(["--" + name.replace("_", "-"), "--" + name]))


def _deprecation(prog: str, old: str, new: str) -> str:
    return f"{prog}: {old} is deprecated, use {new} (it reads the same field)"


class _Alias(argparse.Action):
    """Another spelling of a flag (hidden from --help): stores into the canonical flag's field.

    Values are converted (after `value_map`) with the canonical flag's type and checked against its
    choices. `constant` makes a no-value switch (boolean spellings); `note` prints a deprecation
    line on stderr; `refuse` makes the spelling an error that says what to use instead."""

    def __init__(self, option_strings, dest, canonical: argparse.Action, value_map=None, constant=None,
                 note: str = "", refuse: str = "", **kwargs):
        nargs = 0 if constant is not None else canonical.nargs
        super().__init__(option_strings, dest, nargs=nargs, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                         metavar=canonical.metavar)
        self.canonical, self.value_map, self.constant = canonical, value_map or {}, constant
        self.note, self.refuse = note, refuse

    def _convert(self, parser: argparse.ArgumentParser, text: str, option: str):
        text = self.value_map.get(text, text)
        try:
            value = self.canonical.type(text) if self.canonical.type else text
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            parser.error(f"argument {option}: invalid value {text!r} ({err})")
        if self.canonical.choices is not None and value not in self.canonical.choices:
            parser.error(f"argument {option}: invalid choice {text!r} (choose from "
                         f"{', '.join(map(str, self.canonical.choices))})")
        return value

    def __call__(self, parser, namespace, values, option_string=None):
        if self.refuse:
            parser.error(f"{option_string}: {self.refuse}")
        if self.note:
            print(self.note.format(prog=parser.prog, old=option_string), file=sys.stderr)
        if self.constant is not None:
            value = self.constant
        elif isinstance(values, list):
            value = [self._convert(parser, v, option_string) for v in values]
        else:
            value = self._convert(parser, values, option_string)
        setattr(namespace, self.dest, value)


def _add_spellings(parser: argparse.ArgumentParser, f: dataclasses.Field, canonical: argparse.Action,
                   familiar: list[tuple[str, dict[str, str] | None]]) -> list[str]:
    """Register the underscore spelling, the familiar aliases and the former names of field `f`
    (those not already taken by another flag); return the familiar spellings added."""
    taken = parser._option_string_actions
    flag = _field_flag(f)
    name = f.metadata.get("flag", f.name)
    is_bool = isinstance(canonical, argparse.BooleanOptionalAction)
    refuse = f.metadata.get("refuse_formerly", "")

    def add(strings: list[str], **kwargs) -> list[str]:
        strings = [s for s in strings if s not in taken]
        if strings:
            parser.add_argument(*strings, dest=f.name, action=_Alias, canonical=canonical, **kwargs)
        return strings

    if is_bool:
        add([s for s in _spellings(name) if s != flag], constant=True)
        add(["--no_" + name, "--no-" + name], constant=False)
    else:
        add([s for s in _spellings(name) if s != flag])
    for old in f.metadata.get("formerly", ()):  # before the familiar names: a former flag warns
        note = "" if refuse else "{prog}: {old} is deprecated, use " + flag + " (same setting)"
        add(_spellings(old), note=note, refuse=refuse, constant=True if is_bool else None)
        if is_bool and not refuse:
            add(["--no-" + old.replace("_", "-"), "--no_" + old], note=note, constant=False)
    added = []
    for alias, value_map in familiar:
        added += add(_spellings(alias), value_map=value_map, constant=True if is_bool else None)
    return added


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one flag per field of the dataclass `cls` to `parser`.

    Booleans become `--flag / --no-flag`; `tuple[X, ...]` fields take several values
    (`--seeds 1 2 3`); `X | None` fields accept `none`. Required fields (no default) become
    required flags.
    """
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    familiar: dict[str, list[tuple[str, dict[str, str] | None]]] = {}
    for name, (target, value_map) in FAMILIAR.items():
        if target in names and name not in names:
            familiar.setdefault(target, []).append((name, value_map))
    for f in fields:
        canonical = _add_field_argument(parser, f, hints)
        _add_spellings(parser, f, canonical, familiar.get(f.name, []))
    return parser


def _add_field_argument(parser: argparse.ArgumentParser, f: dataclasses.Field, hints: dict) -> argparse.Action:
    """The canonical `--hyphen-name` flag of field `f`; returns its argparse action."""
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
        return parser.add_argument(_field_flag(f), action=argparse.BooleanOptionalAction, default=default,
                                   help=text)
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
    return parser.add_argument(_field_flag(f), **kwargs)


class StageParser(OneLineParser):
    """A stage's parser: `--config FILE` loads field values as the defaults, so flags given on the
    command line override the file (a bad flag is one line and exit 2, see defectsynth/errors.py)."""

    config_class: type | None = None

    def parse_known_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        path = _config_path(argv)
        if path and self.config_class is not None:
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except OSError as err:
                self.error(f"--config {path}: cannot read it ({err.strerror or err})")
            except json.JSONDecodeError as err:
                self.error(f"--config {path}: not valid JSON ({err})")
            if not isinstance(data, dict):
                self.error(f"--config {path}: expected a JSON object of {self.config_class.__name__} fields")
            values = _field_values(self.config_class, data, source=path)
            self.set_defaults(**values)
            for action in self._actions:  # a required flag the file gives is no longer required
                if action.dest in values:
                    action.required = False
        return super().parse_known_args(argv, namespace)


def _config_path(argv: list[str]) -> str:
    """The value of `--config PATH` / `--config=PATH` in argv ('' if absent)."""
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return ""


def parser_from_dataclass(cls: type, description: str | None = None,
                          prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of `cls` (see `add_dataclass_arguments`), plus
    `--config` and `--print-config`. `prog` yields to the name set by `invoked_as` (the umbrella
    command sets "defectsynth <stage>")."""
    familiar = sorted(name for name, (target, _) in FAMILIAR.items()
                      if target in {f.name for f in dataclasses.fields(cls)})
    epilog = ("Every flag also takes its underscore spelling (--num_class_images). Familiar names accepted: "
              + ", ".join("--" + name for name in familiar) + " (docs/coming_from.md)") if familiar else (
        "Every flag also takes its underscore spelling (--num_class_images).")
    parser = StageParser(description=description or (cls.__doc__ or "").strip().split("\n")[0],
                         prog=_PROG.get() or prog, epilog=epilog)
    parser.config_class = cls
    parser.add_argument("--config", default="", metavar="FILE", help=(
        "a JSON of this stage's settings (e.g. its saved config.json, or --print-config's output); "
        "flags given on the command line override it"))
    parser.add_argument("--print-config", "--print_config", action="store_true",
                        help="print the config these flags give as JSON and exit")
    return add_dataclass_arguments(parser, cls)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build the dataclass from parsed arguments (tuple fields become tuples). With
    `--print-config` it prints the config as JSON and exits (status 0), as `--help` does."""
    cfg = _config_from_namespace(cls, args)
    if getattr(args, "print_config", False):
        print(json.dumps(config_to_dict(cfg), indent=2, sort_keys=True))
        raise SystemExit(0)
    return cfg


def _config_from_namespace(cls: type[T], args: argparse.Namespace) -> T:
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


# A key a saved config.json may carry beside the fields: where the run came from (versions,
# device, commit; see defectsynth/provenance.py). It is read back by nobody and ignored here.
PROVENANCE_KEY = "provenance"


def _field_values(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    """`data` with former field names read as the current ones (one deprecation line on stderr
    each) and the provenance record dropped; unknown fields are an error naming them."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    formerly = {old: f.name for f in fields for old in f.metadata.get("formerly", ())}
    values = {}
    for key, value in data.items():
        if key == PROVENANCE_KEY and key not in names:
            continue
        if key in formerly and key not in names:
            print(f"{source}: key {key!r} is deprecated, read as {formerly[key]!r} (rename it in the file)",
                  file=sys.stderr)
            if formerly[key] in data:
                raise UserError(f"{source}: both {key!r} (its former name) and {formerly[key]!r} are set; "
                                f"keep only {formerly[key]!r}")
            key = formerly[key]
        values[key] = value
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; "
                        f"expected some of {sorted(names)}")
    return values


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Rebuild a dataclass from `config_to_dict` output; unknown fields are an error naming them.
    Former field names (`metadata["formerly"]`) load with a deprecation line on stderr."""
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in _field_values(cls, data, source).items():
        tp, _ = _unwrap_optional(hints[name])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = config_from_dict(tp, value, source=f"{source}.{name}")
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def save_config_json(cfg: Any, path: str | os.PathLike, provenance: bool = False) -> None:
    """Write the resolved config as JSON, atomically (temporary name, then rename). With
    `provenance=True` the file also records package version, git commit, torch version and the
    device (`cfg.device`) under the key "provenance", which loading ignores."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config_to_dict(cfg)
    if provenance:
        from defectsynth.provenance import provenance as record  # imports torch
        data[PROVENANCE_KEY] = record(getattr(cfg, "device", None))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_config_json(cls: type[T], path: str | os.PathLike) -> T:
    """Read a config written by `save_config_json`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err
    return config_from_dict(cls, data, source=str(path))

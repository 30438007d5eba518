"""python -m weights.convert SRC DST --to ldm|diffusers [--dtype fp32|fp16|bf16] [--ema] [--base MODEL]

SRC is one of three things, recognised in this order:

1. A training checkpoint folder (OUT/checkpoints/step_N of train.concept or train.condition:
   weights.safetensors holds only the trained tensors, config.json the run's resolved config).
   Its tensors are put into the base model the run started from (config.json's `ckpt`, or
   `--base`): a concept checkpoint becomes a whole SD model, a condition checkpoint a ControlNet
   (carrying the condition record of the run's exported control.safetensors, when there is one).
2. A ControlNet (LDM `control_model.*` file, ControlNet 1.0 full file, or diffusers
   ControlNetModel folder): written as an LDM control file or a diffusers ControlNetModel folder.
3. An SD 1.x / 2.x model (LDM single file .safetensors/.ckpt, or diffusers folder): written as
   an LDM single `.safetensors` file or a diffusers pipeline folder.

Sources load strictly (the same checks as `python -m weights.inspect`), so a conversion never
drops or invents weights silently; the chosen prediction type and its reason are printed and
written into the output (safetensors metadata and, for SD 2.x, the .yaml beside an LDM file; the
scheduler config of a diffusers folder). `--dtype fp16` halves the file (SD 1.5: ~2 GB).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from data.hints import CONDITION_METADATA_KEY, DIFFUSERS_CONDITION_FILE, read_condition_metadata
from defectsynth.errors import UserError, command
from defectsynth.runconfig import config_from_args, parser_from_dataclass
from model.controlnet import ControlNet
from model.stable_diffusion import StableDiffusion, preset
from weights.controlnet import load_control, save_control
from weights.files import save_json
from weights.load import open_checkpoint, load_pipeline
from weights.save import DTYPES, save_diffusers, save_ldm

# A training checkpoint folder (train/checkpoint.py writes these names; weights/ does not import train/).
CHECKPOINT_WEIGHTS, CHECKPOINT_CONFIG = "weights.safetensors", "config.json"


@dataclass(frozen=True)
class ConvertConfig:
    """Convert an SD checkpoint between the LDM single-file and diffusers folder layouts."""
    src: str = field(default="", metadata={"help": "source file or diffusers folder (also positional)"})
    dst: str = field(default="", metadata={"help": "destination .safetensors file or folder (also positional)"})
    to: str = field(default="ldm", metadata={"help": "output layout", "choices": ["ldm", "diffusers"]})
    dtype: str = field(default="fp32", metadata={"help": "floating-point dtype written", "choices": list(DTYPES)})
    ema: bool = field(default=False, metadata={"help": "take the UNet from the source's model_ema.* weights"})
    prediction_type: str | None = field(default=None, metadata={
        "help": "override the prediction type (default: decided from the source, see weights/load.py)",
        "choices": [None, "epsilon", "v_prediction"]})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing destination"})
    base: str = field(default="", metadata={
        "help": "a training checkpoint's base model (default: the 'ckpt' of its config.json)"})


def get_args_parser():
    parser = parser_from_dataclass(ConvertConfig, prog="python -m weights.convert")
    parser.add_argument("positional", nargs="*", metavar="SRC DST", help="source and destination")
    return parser


def is_training_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / CHECKPOINT_WEIGHTS).is_file() and (path / CHECKPOINT_CONFIG).is_file()


def is_controlnet(path: Path) -> bool:
    """A ControlNet file or ControlNetModel folder (not an SD model that holds none)."""
    if path.is_dir():
        config = path / "config.json"
        return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "ControlNetModel"
    return "controlnet" in open_checkpoint(path, only=("controlnet",)).parts


def _base_model(run: dict, cfg: ConvertConfig, folder: Path) -> StableDiffusion:
    """The model the run started from, on the CPU in float32."""
    prediction_type = cfg.prediction_type or (None if run.get("prediction_type", "auto") == "auto"
                                              else run["prediction_type"])
    base = cfg.base or ("" if run.get("random_weights") else run.get("ckpt", ""))
    if base:
        if not Path(base).exists():
            raise UserError(f"{folder}: its base model {base} (config.json 'ckpt') is not there; give --base MODEL")
        return load_pipeline(base, prediction_type=prediction_type)
    if run.get("random_weights") and "class_noun" in run:  # train.concept's random base: seeded, reproducible
        overrides = {} if prediction_type is None else {"prediction_type": prediction_type}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run["seed"])
            return StableDiffusion(preset(run["preset"], **overrides))
    raise UserError(f"{folder}: the run has no base model file (--random-weights); give --base MODEL")


def _load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str, partial: bool = False) -> None:
    """Copy `tensors` into `module` strictly (partial: a subset of its keys, e.g. the UNet decoder)."""
    state = module.state_dict()
    unknown = sorted(set(tensors) - set(state))
    missing = [] if partial else sorted(set(state) - set(tensors))
    if unknown or missing:
        raise UserError(f"{source}: the checkpoint does not fit its base (unexpected {unknown[:5]}, "
                        f"missing {missing[:5]}); give the right --base")
    module.load_state_dict({**state, **tensors}, strict=True)


def convert_checkpoint(cfg: ConvertConfig, folder: Path, dst: Path, dtype: torch.dtype) -> str:
    """A training checkpoint folder -> an SD model (concept) or a ControlNet (condition)."""
    run = json.loads((folder / CHECKPOINT_CONFIG).read_text(encoding="utf-8"))
    weights = load_file(str(folder / CHECKPOINT_WEIGHTS))
    part = {prefix: {k[len(prefix):]: v.float() for k, v in weights.items() if k.startswith(prefix)}
            for prefix in ("unet.", "text_encoder.", "control.")}
    model = _base_model(run, cfg, folder)
    source = str(folder / CHECKPOINT_WEIGHTS)
    if not part["control."]:  # train.concept: the UNet (and text encoder) replace the base's
        _load_into(model.unet, part["unet."], source)
        if part["text_encoder."]:
            _load_into(model.text_encoder, part["text_encoder."], source)
        (save_ldm if cfg.to == "ldm" else save_diffusers)(model, dst, dtype=dtype)
        return f"SD model (base {cfg.base or run.get('ckpt') or 'random weights'} + the trained UNet" \
               f"{' and text encoder' if part['text_encoder.'] else ''})"
    # train.condition: the control copy (a fresh copy of the base gives the architecture), and the
    # UNet decoder it trained with --no-sd-locked.
    control = ControlNet.from_unet(model.unet, hint_channels=3, downsample_factor=model.config.vae.downsample_factor)
    _load_into(control, part["control."], source)
    if part["unet."]:
        _load_into(model.unet, part["unet."], source, partial=True)
        base_out = dst.with_name(dst.stem + "_base.safetensors")
        save_ldm(model, base_out, dtype=dtype)
        print(f"wrote {base_out}: the base with the UNet decoder the run trained (--no-sd-locked)")
    record = _run_record(folder, run)
    _save_control(control, dst, cfg.to, dtype, record)
    return "ControlNet" + (" with its condition record" if record else " (no condition record found: "
                                                                         "synthesis will assume the defaults)")


def _run_record(folder: Path, run: dict) -> dict | None:
    """The condition record of the run's exported control (OUT/control.safetensors), steps updated."""
    exported = Path(run.get("out", folder.parent.parent)) / "control.safetensors"
    if not exported.is_file():
        exported = folder.parent.parent / "control.safetensors"
    record = read_condition_metadata(exported) if exported.is_file() else None
    if record is not None:
        record = {**record, "steps": int(folder.name.split("_")[-1]) if folder.name.startswith("step_") else None}
    return record


def _save_control(control: ControlNet, dst: Path, to: str, dtype: torch.dtype, record: dict | None) -> None:
    if to == "ldm":
        metadata = {CONDITION_METADATA_KEY: json.dumps(record, sort_keys=True)} if record else None
        save_control(control, dst, dtype=dtype, metadata=metadata)
    else:
        save_control(control, dst, layout="diffusers", dtype=dtype)
        if record:
            save_json(record, dst / DIFFUSERS_CONDITION_FILE)


def main(cfg: ConvertConfig) -> int:
    if not cfg.src or not cfg.dst:
        raise UserError("give SRC and DST")
    dst = Path(cfg.dst)
    if dst.exists() and not cfg.overwrite:
        raise UserError(f"{dst} exists (pass --overwrite to replace it)")
    if cfg.to == "ldm" and dst.suffix != ".safetensors":
        raise UserError(f"an LDM destination must end with .safetensors, got {dst}")
    dtype = DTYPES[cfg.dtype]
    src = Path(cfg.src)
    if is_training_checkpoint(src):
        what = convert_checkpoint(cfg, src, dst, dtype)
        print(f"wrote {dst} ({cfg.to}, {cfg.dtype}): {what}")
        return 0
    if src.exists() and is_controlnet(src):
        control = load_control(src, dtype=torch.float32)
        record = read_condition_metadata(src) if src.is_dir() or src.suffix == ".safetensors" else None
        _save_control(control, dst, cfg.to, dtype, record)
        print(f"wrote {dst} ({cfg.to} ControlNet, {cfg.dtype})")
        return 0
    # A source that is unreadable, not strict or holds a NaN/inf weight raises CheckpointError
    # (a UserError): nothing is written.
    model, info = load_pipeline(cfg.src, dtype=dtype, prediction_type=cfg.prediction_type, ema=cfg.ema,
                                return_info=True)
    print(f"loaded {cfg.src}: {info.family}, {sum(p.numel() for p in model.parameters()):,} parameters"
          f"{', EMA UNet' if cfg.ema else ''}")
    print(f"prediction type: {info.prediction_type} ({info.prediction_reason})")
    if cfg.to == "ldm":
        save_ldm(model, dst, dtype=dtype)
    else:
        save_diffusers(model, dst, dtype=dtype)
    print(f"wrote {dst} ({cfg.to}, {cfg.dtype})")
    return 0


@command("convert")
def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.positional:
        if len(args.positional) != 2 or args.src or args.dst:
            raise UserError("give exactly SRC DST (positionally or with --src/--dst)")
        args.src, args.dst = args.positional
    return main(config_from_args(ConvertConfig, args))


if __name__ == "__main__":
    sys.exit(cli())

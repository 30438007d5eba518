"""python -m weights.convert SRC DST --to ldm|diffusers [--dtype fp32|fp16|bf16] [--ema]

Converts an SD 1.x / 2.x checkpoint (LDM single file .safetensors/.ckpt, or diffusers folder)
into an LDM single `.safetensors` file or a diffusers pipeline folder. The source is loaded
strictly (the same checks as `python -m weights.inspect`), so a conversion never drops or invents
weights silently; the chosen prediction type and its reason are printed and written into the
output (safetensors metadata / scheduler config).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from defectsynth.errors import UserError, command
from defectsynth.runconfig import config_from_args, parser_from_dataclass
from weights.load import load_pipeline
from weights.save import DTYPES, save_diffusers, save_ldm


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


def get_args_parser():
    parser = parser_from_dataclass(ConvertConfig, prog="python -m weights.convert")
    parser.add_argument("positional", nargs="*", metavar="SRC DST", help="source and destination")
    return parser


def main(cfg: ConvertConfig) -> int:
    if not cfg.src or not cfg.dst:
        raise UserError("give SRC and DST")
    dst = Path(cfg.dst)
    if dst.exists() and not cfg.overwrite:
        raise UserError(f"{dst} exists (pass --overwrite to replace it)")
    if cfg.to == "ldm" and dst.suffix != ".safetensors":
        raise UserError(f"an LDM destination must end with .safetensors, got {dst}")
    dtype = DTYPES[cfg.dtype]
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

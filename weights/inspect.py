"""python -m weights.inspect PATH | --manifest FILE.json [--ema] [--prediction-type ...]

Prints what a checkpoint holds and whether it loads strictly: format, family (SD 1.x / 2.x; for a
ControlNet, the family of the base it fits, plus its layout),
prediction type and how it was decided, each component's layout, config (and where it came from),
parameter count, and key coverage (matched / missing / shape mismatches / known extras /
unexpected), and whether every weight the load would use is finite. The layout check works on meta
tensors; the finiteness check reads each tensor once (chunked, no copies): `--no-check-values`
skips it and reads no weights at all.
A key manifest of ../shared/manifests (key -> [shape, dtype]) inspects the same way.

Exit status: 0 loads strictly, 1 would not load (missing, unexpected or mismatched keys, integer
dtypes where floats belong, NaN/inf weights),
2 unreadable or unsupported (not a checkpoint, SDXL, inpainting, unsafe pickle, ...).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from defectsynth.errors import UserError, command
from defectsynth.runconfig import config_from_args, parser_from_dataclass
from weights.controlnet import controlnet_summary
from weights.load import LoadInfo, inspect_checkpoint


@dataclass(frozen=True)
class InspectConfig:
    """Inspect a checkpoint file, diffusers folder or key manifest without loading weights."""
    path: str = field(default="", metadata={"help": "checkpoint file or folder (also accepted positionally)"})
    manifest: str = field(default="", metadata={"help": "a key manifest JSON (key -> [shape, dtype]) to inspect instead"})
    ema: bool = field(default=False, metadata={"help": "judge the UNet's model_ema.* weights instead of the raw ones"})
    check_values: bool = field(default=True, metadata={
        "help": "read every weight the load would use and refuse NaN/inf values (reads the whole file; "
                "--no-check-values looks at the header only)"})
    prediction_type: str | None = field(default=None, metadata={
        "help": "override the prediction type (default: decided from the checkpoint, see weights/load.py)",
        "choices": [None, "epsilon", "v_prediction"]})


def get_args_parser():
    parser = parser_from_dataclass(InspectConfig, prog="python -m weights.inspect")
    parser.add_argument("positional_path", nargs="?", default=None, metavar="PATH",
                        help="checkpoint file or folder")
    return parser


def main(cfg: InspectConfig) -> int:
    target = cfg.manifest or cfg.path
    if not target:
        raise UserError("give a checkpoint PATH or --manifest FILE.json")
    # CheckpointError (unreadable, unsupported, non-finite, ...) is a UserError: one line, exit 2.
    info: LoadInfo = inspect_checkpoint(target, ema=cfg.ema, prediction_type=cfg.prediction_type,
                                        check_values=cfg.check_values)
    print(info.summary())
    if "controlnet" in info.components:
        print(controlnet_summary(info))
    return 0 if info.ok else 1


@command("inspect")
def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.positional_path:
        if args.path:
            raise UserError("give PATH or --path, not both")
        args.path = args.positional_path
    return main(config_from_args(InspectConfig, args))


if __name__ == "__main__":
    sys.exit(cli())

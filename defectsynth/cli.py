"""`defectsynth <stage> ...`: one command that dispatches to the stage scripts.

Each stage is a module with `cli(argv)` (parse flags from its run-config dataclass, call
`main(cfg)`), so `defectsynth concept --help` and `python -m train.concept --help` are the same.
Expected mistakes print `defectsynth <stage>: <one line>` and exit 2 (defectsynth/errors.py).
"""
from __future__ import annotations

import importlib
import sys

from defectsynth.errors import command
from defectsynth.runconfig import invoked_as

# stage name -> (module, one-line summary). Modules are imported only when their stage runs.
STAGES: dict[str, tuple[str, str]] = {
    "run": ("defectsynth.run", "the whole pipeline: (demo data ->) (tiny prior ->) concept -> condition -> "
                               "synthesize -> evaluate -> report"),
    "prior": ("train.prior", "train the tiny prior that stands in for SD (the demo's base model)"),
    "import": ("data.importers", "convert a mask-folder or LabelMe dataset to COCO"),
    "drivers": ("data.drivers_sheet", "write a PNG sheet of image | topological driver pairs"),
    "demo-data": ("data.demo", "write the procedural demo dataset"),
    "concept": ("train.concept", "learn the concept: DreamBooth with prior preservation"),
    "condition": ("train.condition", "learn the condition: train the control copy"),
    "generate": ("sample.generate", "text-to-image and driver-to-image generation"),
    "synthesize": ("sample.synthesize", "synthesize the self-annotated (SADF) COCO dataset"),
    "evaluate": ("eval.paper", "the paper's evaluation tables (FID, Mask R-CNN, diversity)"),
    "inspect": ("weights.inspect", "inspect a checkpoint file, folder or manifest"),
    "convert": ("weights.convert", "convert a checkpoint between LDM and diffusers layouts"),
}


def usage() -> str:
    width = max(len(name) for name in STAGES)
    lines = ["usage: defectsynth <stage> [options]   (defectsynth <stage> --help for its options)",
             "       defectsynth --version", "",
             "stages:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from defectsynth.provenance import version_line
        print(version_line())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"defectsynth: unknown stage {stage!r}; expected one of {', '.join(STAGES)} "
              f"(defectsynth --help lists them)", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    # Each stage's cli is wrapped by defectsynth.errors.command: an expected error (bad flag,
    # file, data, full disk) is one line on stderr and exit 2; a bug keeps its traceback.
    with invoked_as(f"defectsynth {stage}"):  # --help and errors say `defectsynth <stage>`
        result = command(stage)(module.cli)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The umbrella package: the `defectsynth <stage>` dispatcher and the end-to-end run.

Two modules here are imported by the stage packages: `defectsynth.runconfig` (standard library
only) turns a run-config dataclass into an argparse parser and back, and `defectsynth.benchmark`
(torch only) holds what the speed benchmarks of train/ and eval/ share (`python -m train.speed`,
`python -m eval.speed`), so that eval/ need not import train/.
"""

__version__ = "0.1.0"  # setup.py reads it from here; `defectsynth --version` prints it

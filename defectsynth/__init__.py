"""The umbrella package: the `defectsynth <stage>` dispatcher and the end-to-end run.

`defectsynth.runconfig` is the one module here that the stage packages import (it depends only on
the standard library): it turns a run-config dataclass into an argparse parser and back.
"""

"""Shared pytest setup: deterministic, small, CPU-only."""
import os
import sys

import pytest
import torch

# The repository root on sys.path, so tests run from a plain checkout as well as an editable install.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _auto_precision_is_fp32():
    """`--precision auto` / `--dtype auto` pick bf16 on CPUs with native bf16 (sample.runtime): pin
    them to fp32 so every test computes the same numbers on every CPU. Tests of bf16 ask for it
    explicitly (or inject the CPU's answer, tests/test_precision_cpu.py). Session scope: module
    fixtures (e.g. test_synthesize's reference run) are set up before any function-scoped fixture,
    and must see the pin too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEFECTSYNTH_CPU_BF16", "0")
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks gain nothing from intra-op threads, and on a shared 2-core machine spinning
    OpenMP threads slow them several-fold. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """4 defective 64x64 images of the procedural demo dataset (a COCO folder)."""
    from data.demo import DemoConfig, make_demo_dataset
    folder = tmp_path_factory.mktemp("demo")
    make_demo_dataset(DemoConfig(out=str(folder), size=64, num_defective=4, num_free=0), progress=False)
    return folder

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

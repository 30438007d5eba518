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

"""train.prior's VAE adherence ceiling: the adherence of the VAE's reconstructions of annotated
images to their originals' drivers. A perfect decoder scores what the originals score; one that
erases the image scores less."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from data.demo import DemoConfig, make_demo_dataset
from train.prior import vae_adherence


class FakeVAE(nn.Module):
    """encode(x).mean = x; decode returns x (`erase`: the image's mean colour everywhere)."""

    def __init__(self, erase: bool = False):
        super().__init__()
        self.erase = erase

    def encode(self, x):
        return SimpleNamespace(mean=x)

    def decode(self, z):
        return z.mean(dim=(2, 3), keepdim=True).expand_as(z) if self.erase else z


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    root = tmp_path_factory.mktemp("ceiling")
    make_demo_dataset(DemoConfig(out=str(root), size=64, num_defective=3, num_free=0, seed=2), progress=False)
    return str(root / "annotations.json")


def test_a_perfect_decoder_reaches_the_originals_and_an_eraser_does_not(annotated):
    perfect = vae_adherence(FakeVAE(), annotated, 64, torch.device("cpu"))
    assert perfect["images"] == 3
    assert perfect["reconstructions"] == pytest.approx(perfect["originals"], abs=1e-6)
    assert perfect["originals"] > 0.8
    erased = vae_adherence(FakeVAE(erase=True), annotated, 64, torch.device("cpu"))
    assert erased["reconstructions"] < 0.5 * perfect["reconstructions"]
    assert vae_adherence(FakeVAE(), annotated, 128, torch.device("cpu")) is None  # no image at that size

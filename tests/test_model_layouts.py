"""Our UNet / VAE state_dict layouts vs the real SD checkpoint layouts, on the meta device.

The fixtures are the official LDM key manifests (tests/fixtures/README.md), so an exact match
here means an original SD 1.x / 2.x single file loads into our modules with strict=True once its
prefix is stripped. Meta tensors: no weights, no memory, well under a second each.
"""
import gzip
import json
from pathlib import Path

import pytest
import torch

from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig

FIXTURES = Path(__file__).parent / "fixtures"


def load_layout(name: str) -> list[tuple[str, list[int]]]:
    with gzip.open(FIXTURES / name, "rt", encoding="utf-8") as f:
        return [(key, shape) for key, shape in json.load(f)]


def our_layout(module: torch.nn.Module) -> list[tuple[str, list[int]]]:
    return [(key, list(t.shape)) for key, t in module.state_dict().items()]


def describe_difference(ours: list, ref: list) -> str:
    ours_d, ref_d = dict(ours), dict(ref)
    missing = [k for k in ref_d if k not in ours_d]
    extra = [k for k in ours_d if k not in ref_d]
    shapes = [f"{k}: ours {ours_d[k]} vs {ref_d[k]}" for k in ref_d if k in ours_d and ours_d[k] != ref_d[k]]
    return f"missing {missing[:10]}, unexpected {extra[:10]}, shape mismatches {shapes[:10]}"


CASES = [
    ("unet-sd15", lambda: UNet(UNetConfig.sd15()), "ldm_unet_sd15.json.gz"),
    ("unet-sd21", lambda: UNet(UNetConfig.sd21()), "ldm_unet_sd21.json.gz"),
    ("vae-sd", lambda: AutoencoderKL(VAEConfig.sd()), "ldm_vae.json.gz"),
]


@pytest.mark.parametrize("name,build,fixture", CASES, ids=[c[0] for c in CASES])
def test_state_dict_matches_ldm_layout(name, build, fixture):
    with torch.device("meta"):
        module = build()
    ours, ref = our_layout(module), load_layout(fixture)
    assert dict(ours) == dict(ref), f"{name}: {describe_difference(ours, ref)}"
    # Same order too, so files we write list tensors as the originals do.
    assert [k for k, _ in ours] == [k for k, _ in ref], f"{name}: same keys, different order"


@pytest.mark.parametrize("name,build,fixture", CASES, ids=[c[0] for c in CASES])
def test_meta_build_then_strict_assign_load(name, build, fixture):
    """The weights/ loading path: build on meta, load_state_dict(strict=True, assign=True)."""
    with torch.device("meta"):
        module = build()
    assert not list(module.buffers()), f"{name}: buffers would be missing from checkpoint files"
    # Meta tensors stand in for the file's (the SD 1.5 UNet would be 3.4 GB of zeros).
    tensors = {key: torch.empty(shape, device="meta") for key, shape in load_layout(fixture)}
    module.load_state_dict(tensors, strict=True, assign=True)
    params = dict(module.named_parameters())
    assert all(params[key].shape == t.shape for key, t in tensors.items())


def test_sd15_and_sd21_unets_differ_only_in_attention_projections():
    """A check on the fixtures themselves: SD 2.x changes the context width (1024) and makes
    proj_in/proj_out Linears; everything else is the same tensor for tensor."""
    sd15, sd21 = dict(load_layout("ldm_unet_sd15.json.gz")), dict(load_layout("ldm_unet_sd21.json.gz"))
    assert sd15.keys() == sd21.keys()
    changed = {k for k in sd15 if sd15[k] != sd21[k]}
    assert changed and all(".proj_in.weight" in k or ".proj_out.weight" in k or
                           ".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)

"""Layout tests on the real key manifests (tests/fixtures/manifest_*.json.gz, copied from
../shared/manifests): every SD layout loads on meta tensors with no missing / unexpected keys and
matching shapes, and our writers reproduce the manifests' key sets and shapes exactly."""
import gzip
import json
from pathlib import Path

import pytest
import torch

from model.schedule import NoiseSchedule
from model.stable_diffusion import StableDiffusion, preset
from weights import inspect_checkpoint, layouts
from weights.load import open_checkpoint
from weights.save import diffusers_text_tensors, ldm_state_dict
from weights.components import COMPONENTS
from weights.keymap import to_theirs

FIXTURES = Path(__file__).parent / "fixtures"


def manifest_path(name: str) -> Path:
    return FIXTURES / f"manifest_{name}.json.gz"


def manifest(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    with gzip.open(manifest_path(name), "rt", encoding="utf-8") as handle:
        return {k: (tuple(shape), dtype) for k, (shape, dtype) in json.load(handle).items()}


def meta_model(name: str) -> StableDiffusion:
    with torch.device("meta"):
        model = StableDiffusion(preset(name))
    model.schedule = NoiseSchedule()  # real betas: the LDM schedule buffers are computed from them
    return model


def shapes_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in tensors.items()}


# (manifest, ema, expected components, expected known-extra groups -> count)
CASES = [
    ("sd15_ldm", False, ("unet", "vae", "text_encoder"), {"schedule buffers": 12, "position_ids": 1}),
    ("sd15_ldm_with_ema", False, ("unet", "vae", "text_encoder"),
     {"schedule buffers": 12, "position_ids": 1, "EMA bookkeeping": 2, "EMA weights (ema=False)": 686}),
    ("sd15_ldm_with_ema", True, ("unet", "vae", "text_encoder"),
     {"schedule buffers": 12, "position_ids": 1, "EMA bookkeeping": 2, "non-EMA UNet weights (ema=True)": 686}),
    ("sd21_v_ldm", False, ("unet", "vae", "text_encoder"), {"schedule buffers": 12}),
    ("diffusers_sd15_unet", False, ("unet",), {}),
    ("diffusers_sd15_vae", False, ("vae",), {}),
    ("diffusers_sd15_vae_legacy_attn", False, ("vae",), {}),
    ("diffusers_sd15_text", False, ("text_encoder",), {"position_ids": 1}),
    ("diffusers_sd15_text_transformers5", False, ("text_encoder",), {}),
]


@pytest.mark.parametrize("name, ema, components, extras", CASES, ids=[f"{c[0]}-ema{c[1]}" for c in CASES])
def test_manifest_loads_strictly_on_meta(name, ema, components, extras):
    info = inspect_checkpoint(manifest_path(name), ema=ema)
    assert info.ok, info.problems()
    assert tuple(info.components) == components
    for report in info.components.values():
        assert report.missing == [] and report.mismatched == [] and report.errors == []
        assert report.matched == report.keys > 0
    assert info.unexpected == []
    assert {group: len(keys) for group, keys in info.known_extras.items()} == extras
    # Every key of the manifest is accounted for: consumed by a rule or a known extra.
    consumed = info.file_keys - sum(extras.values())
    assert consumed == len(manifest(name)) - sum(extras.values())


def test_full_size_configs_inferred_from_shapes_are_the_presets():
    sd15 = open_checkpoint(manifest_path("sd15_ldm")).parts
    assert sd15["unet"].config == preset("sd15").unet
    assert sd15["vae"].config == preset("sd15").vae
    assert sd15["text_encoder"].config == preset("sd15").text
    sd21 = open_checkpoint(manifest_path("sd21_v_ldm")).parts
    assert sd21["unet"].config == preset("sd21").unet
    assert sd21["text_encoder"].config == preset("sd21").text
    assert open_checkpoint(manifest_path("diffusers_sd15_unet")).parts["unet"].config == preset("sd15").unet
    assert open_checkpoint(manifest_path("diffusers_sd15_vae_legacy_attn")).parts["vae"].config == preset("sd15").vae


def test_family_and_prediction_type_of_manifests():
    info = inspect_checkpoint(manifest_path("sd15_ldm"))
    assert (info.family, info.prediction_type) == ("sd1", "epsilon")
    info = inspect_checkpoint(manifest_path("sd21_v_ldm"))
    assert info.family == "sd2"
    assert info.prediction_type == "v_prediction" and "file name" in info.prediction_reason
    info = inspect_checkpoint(manifest_path("sd21_v_ldm"), prediction_type="epsilon")
    assert (info.prediction_type, info.prediction_reason) == ("epsilon", "given explicitly")


# Keys a manifest has that our LDM writer deliberately does not write.
LDM_EXPORT_OPTIONAL = {
    "sd15_ldm": set(),
    "sd21_v_ldm": set(),
    # EMA copies and their bookkeeping: we write one (the loaded) set of UNet weights.
    "sd15_ldm_with_ema": {"model_ema.*"},
}


@pytest.mark.parametrize("name, preset_name", [("sd15_ldm", "sd15"), ("sd21_v_ldm", "sd21-v"),
                                               ("sd15_ldm_with_ema", "sd15")])
def test_ldm_export_on_meta_reproduces_manifest(name, preset_name):
    expected = manifest(name)
    optional = LDM_EXPORT_OPTIONAL[name]
    expected = {k: v for k, v in expected.items() if not layouts.matches(k, tuple(optional))}
    tensors, written = ldm_state_dict(meta_model(preset_name))
    assert written == preset(preset_name)
    assert shapes_of(tensors) == expected


def test_diffusers_export_on_meta_reproduces_manifests():
    model = meta_model("sd15")
    for component, name in (("unet", "diffusers_sd15_unet"), ("vae", "diffusers_sd15_vae")):
        state = getattr(model, component).state_dict()
        layout = COMPONENTS[component].layout("diffusers", getattr(model.config, component))
        assert shapes_of(to_theirs(layout.rules(list(state)), state)) == manifest(name)
    legacy = COMPONENTS["vae"].layout("diffusers-legacy", model.config.vae)
    state = model.vae.state_dict()
    assert shapes_of(to_theirs(legacy.rules(list(state)), state)) == manifest("diffusers_sd15_vae_legacy_attn")
    text, extra, layers = diffusers_text_tensors(model.text_encoder)
    assert (extra, layers) == ({}, 12)
    assert shapes_of(text) == manifest("diffusers_sd15_text")
    # transformers 5 writes the same tensors without the prefix and without position_ids.
    v5 = {k[len("text_model."):]: v for k, v in manifest("diffusers_sd15_text").items()
          if k != "text_model.embeddings.position_ids"}
    assert v5 == manifest("diffusers_sd15_text_transformers5")


def test_sd2_diffusers_text_export_drops_what_diffusers_drops():
    """SD 2.x: diffusers keeps 23 of 24 OpenCLIP blocks and no projection; we keep the rest aside."""
    text, extra, layers = diffusers_text_tensors(meta_model("sd21").text_encoder)
    assert layers == 23
    assert not any(k.startswith("text_model.encoder.layers.23.") for k in text)
    assert sorted({k.split(".")[2] for k in extra if k.startswith("encoder.layers.")}) == ["23"]
    assert {"text_projection", "logit_scale"} <= set(extra)


def test_ema_names_are_the_flat_ldm_names():
    ours = list(meta_model("sd15").unet.state_dict())
    rules = layouts.unet_ema_layout().rules(ours)
    ema_keys = {k for k in manifest("sd15_ldm_with_ema") if k.startswith("model_ema.diffusion_model")}
    assert {r.theirs[0] for r in rules} == ema_keys
    assert rules[0].theirs[0] == "model_ema.diffusion_modeltime_embed0weight"


@pytest.mark.parametrize("file_name, expected", [
    ("v2-1_768-ema-pruned.safetensors", "v_prediction"), ("768-v-ema.ckpt", "v_prediction"),
    ("v2-1_512-ema-pruned.safetensors", "epsilon"), ("512-base-ema.ckpt", "epsilon"),
    ("my-finetune.safetensors", "v_prediction"),
])
def test_sd2_prediction_type_heuristic(file_name, expected):
    from weights import decide_prediction_type
    from weights.load import Checkpoint

    checkpoint = Checkpoint(f"/models/{file_name}", "single file", {}, [])
    chosen, reason = decide_prediction_type("sd2", checkpoint)
    assert chosen == expected and "guess" in reason
    assert decide_prediction_type("sd1", checkpoint)[0] == "epsilon"
    assert decide_prediction_type("sd2", checkpoint, explicit="epsilon") == ("epsilon", "given explicitly")

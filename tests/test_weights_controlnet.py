"""ControlNet files: the real layouts (manifests) load on meta tensors and our writers reproduce
them; exact round trips through every layout we write; base-model checks; inspect output; diffusers
loads what we write.

Fixtures (tests/fixtures/README.md): manifest_controlnet_sd15 (1.1 layout), manifest_diffusers_controlnet,
and the ControlNet 1.0 full-file layout composed from manifest_sd15_ldm + `logvar` + the control keys
(checked, when the fixtures were cut, to equal controlnet_sd15_full_ldm.json key for key, in order).
"""
import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.controlnet import ControlNet, ControlNetConfig
from model.schedule import NoiseSchedule
from model.stable_diffusion import StableDiffusion, preset
from model.unet import UNet, UNetConfig
from weights import CheckpointError, inspect_checkpoint, load_control, load_pipeline, save_control, save_ldm
from weights.controlnet import diffusers_control_tensors, ldm_control_state_dict
from weights.controlnet_keys import controlnet_config_to_diffusers
from weights.inspect import cli as inspect_cli
from weights.load import open_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


def manifest(name: str) -> dict[str, list]:
    with gzip.open(FIXTURES / f"manifest_{name}.json.gz", "rt", encoding="utf-8") as handle:
        return json.load(handle)


def full_ldm_manifest() -> dict[str, list]:
    """controlnet_sd15_full_ldm.json: ControlLDM's state_dict = SD 1.5 LDM (schedule buffers,
    then logvar, then model / first_stage_model / cond_stage_model) + control_model.*."""
    sd = list(manifest("sd15_ldm").items())
    return dict(sd[:12] + [("logvar", [[1000], "float32"])] + sd[12:] + list(manifest("controlnet_sd15").items()))


def write_manifest(entries: dict, path: Path) -> Path:
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def shapes_of(tensors: dict[str, torch.Tensor]) -> list:
    return [(k, [list(v.shape), str(v.dtype).replace("torch.", "")]) for k, v in tensors.items()]


def meta_control(config: ControlNetConfig) -> ControlNet:
    with torch.device("meta"):
        return ControlNet(config)


def random_control(config: ControlNetConfig = ControlNetConfig.tiny(), seed: int = 0) -> ControlNet:
    """Every tensor random (zero convs too), so a dropped or swapped tensor shows in a round trip."""
    torch.manual_seed(seed)
    control = ControlNet(config)
    with torch.no_grad():
        for p in control.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return control.eval()


def assert_same(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------
# Real layouts on meta tensors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["1.1", "1.0-full", "comfyui", "diffusers"])
def test_manifest_layouts_load_strictly_on_meta(tmp_path, layout):
    if layout == "1.1":
        path, components = FIXTURES / "manifest_controlnet_sd15.json.gz", ("controlnet",)
    elif layout == "1.0-full":
        path = write_manifest(full_ldm_manifest(), tmp_path / "control_sd15_full.json")
        components = ("unet", "vae", "text_encoder", "controlnet")
    elif layout == "comfyui":
        entries = {"model." + k: v for k, v in manifest("controlnet_sd15").items()}
        path, components = write_manifest(entries, tmp_path / "comfy.json"), ("controlnet",)
    else:
        path, components = FIXTURES / "manifest_diffusers_controlnet.json.gz", ("controlnet",)
    info = inspect_checkpoint(path)
    assert info.ok, info.problems()
    assert tuple(info.components) == components
    assert info.unexpected == [] and info.family == "sd1"
    report = info.components["controlnet"]
    assert report.matched == report.keys == 340 and report.parameters == 361_279_120
    assert report.config == ControlNetConfig.sd15()  # inferred from the shapes alone
    if layout == "1.0-full":
        assert {g: len(k) for g, k in info.known_extras.items()} == {"schedule buffers": 12, "logvar": 1,
                                                                     "position_ids": 1}
        assert info.judged_as == "load_pipeline + load_control"
    else:
        assert info.known_extras == {} and info.judged_as == "load_control"


def test_ldm_export_on_meta_reproduces_the_manifests_in_order():
    control = meta_control(ControlNetConfig.sd15())
    assert shapes_of(ldm_control_state_dict(control)) == list(manifest("controlnet_sd15").items())
    with torch.device("meta"):
        base = StableDiffusion(preset("sd15"))
    base.schedule = NoiseSchedule()
    assert shapes_of(ldm_control_state_dict(control, base)) == list(full_ldm_manifest().items())


def test_diffusers_export_on_meta_reproduces_the_manifest():
    tensors = diffusers_control_tensors(meta_control(ControlNetConfig.sd15()))
    assert dict(shapes_of(tensors)) == manifest("diffusers_controlnet")


def test_diffusers_config_is_the_reference_field_set():
    """The keys of lllyasviel/sd-controlnet-canny's config.json, with SD 1.5 values."""
    config = controlnet_config_to_diffusers(ControlNetConfig.sd15())
    assert config["_class_name"] == "ControlNetModel"
    assert config["block_out_channels"] == [320, 640, 1280, 1280]
    assert config["conditioning_embedding_out_channels"] == [16, 32, 96, 256]
    assert config["cross_attention_dim"] == 768 and config["attention_head_dim"] == 8
    assert "up_block_types" not in config and "sample_size" not in config and "out_channels" not in config


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [ControlNetConfig.tiny(), ControlNetConfig.tiny_sd2()], ids=["sd1", "sd2"])
def test_round_trips_are_exact(tmp_path, config):
    control = random_control(config)
    unet = UNet(config.unet)
    # ControlNet 1.1 layout, with and without our metadata (then the config comes from shapes + base).
    save_control(control, tmp_path / "control.safetensors")
    assert all(k.startswith("control_model.") for k in load_file(tmp_path / "control.safetensors"))
    assert_same(load_control(tmp_path / "control.safetensors"), control)
    save_file(load_file(tmp_path / "control.safetensors"), str(tmp_path / "bare_meta.safetensors"))
    loaded = load_control(tmp_path / "bare_meta.safetensors", unet=unet)
    assert loaded.config == config
    assert_same(loaded, control)
    # ComfyUI's prefix, a .pth pickle.
    torch.save({"model." + k: v for k, v in load_file(tmp_path / "control.safetensors").items()},
               tmp_path / "comfy.pth")
    assert_same(load_control(tmp_path / "comfy.pth", unet=unet), control)
    # diffusers folder, and a pipeline folder holding it as controlnet/.
    save_control(control, tmp_path / "pipe" / "controlnet", layout="diffusers")
    assert_same(load_control(tmp_path / "pipe" / "controlnet", unet=unet), control)
    assert_same(load_control(tmp_path / "pipe"), control)
    # fp16 file, loaded in the dtype asked for.
    save_control(control, tmp_path / "half.safetensors", dtype="fp16")
    half = load_control(tmp_path / "half.safetensors", dtype=torch.float32)
    assert next(half.parameters()).dtype == torch.float32
    assert all(torch.equal(half.state_dict()[k], v.half().float()) for k, v in control.state_dict().items())


def test_extra_metadata_is_written_and_cannot_replace_our_config(tmp_path):
    from safetensors import safe_open
    control = random_control(ControlNetConfig.tiny())
    path = save_control(control, tmp_path / "control.safetensors",
                        metadata={"defectsynth.condition": '{"kind": "driver"}', "format": "not-pt"})
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert header["defectsynth.condition"] == '{"kind": "driver"}' and header["format"] == "pt"
    assert_same(load_control(path), control)  # the config keys are still ours: an exact reload
    with pytest.raises(ValueError, match="metadata= is for the LDM file"):
        save_control(control, tmp_path / "folder", layout="diffusers", metadata={"a": "b"})


def test_controlnet_10_full_file_loads_as_pipeline_and_control(tmp_path):
    torch.manual_seed(0)
    base = StableDiffusion(preset("tiny")).eval()
    control = random_control()
    save_control(control, tmp_path / "full.safetensors", base=base)
    keys = set(load_file(tmp_path / "full.safetensors"))  # (safetensors stores keys sorted)
    assert keys == set(ldm_control_state_dict(control, base)) and "logvar" in keys
    pipeline = load_pipeline(tmp_path / "full.safetensors")
    assert_same(pipeline, base)
    assert_same(load_control(tmp_path / "full.safetensors", unet=pipeline.unet), control)
    with pytest.raises(ValueError, match="does not match the base UNet"):
        save_control(random_control(ControlNetConfig.tiny_sd2()), tmp_path / "x.safetensors", base=base)


def test_device_and_dtype_follow_the_base_unet(tmp_path):
    control = random_control()
    save_control(control, tmp_path / "c.safetensors")
    unet = UNet(UNetConfig.tiny()).to(torch.bfloat16)
    assert next(load_control(tmp_path / "c.safetensors", unet=unet).parameters()).dtype == torch.bfloat16
    loaded = load_control(tmp_path / "c.safetensors", unet=unet, dtype=torch.float32)
    assert next(loaded.parameters()).dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------

def test_a_control_for_another_family_is_refused_by_name():
    """An SD 1.5 ControlNet (context 768) on an SD 2.x UNet (1024): refused before reading weights."""
    with torch.device("meta"):
        sd21_unet = UNet(UNetConfig.sd21())
    with pytest.raises(CheckpointError) as err:
        load_control(FIXTURES / "manifest_controlnet_sd15.json.gz", unet=sd21_unet)
    message = str(err.value)
    assert "context_dim: control 768 vs base 1024" in message
    assert "SD 1.x" in message and "SD 2.x" in message and "use_linear_proj" in message


def test_missing_and_unexpected_control_keys_are_named(tmp_path):
    state = {"control_model." + k: v for k, v in random_control().state_dict().items()}
    broken = dict(state)
    del broken["control_model.zero_convs.3.0.weight"]
    save_file(broken, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"zero_convs\.3\.0\.weight"):
        load_control(tmp_path / "missing.safetensors")
    save_file(dict(state, **{"control_model.zero_convs.99.0.weight": torch.zeros(1)}),
              str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"zero_convs\.99\.0\.weight"):
        load_control(tmp_path / "extra.safetensors")
    save_ldm(StableDiffusion(preset("tiny")), tmp_path / "sd.safetensors")
    with pytest.raises(CheckpointError, match="no ControlNet found"):
        load_control(tmp_path / "sd.safetensors")


def test_bgr_diffusers_controls_are_refused_with_the_field(tmp_path):
    save_control(random_control(), tmp_path / "c", layout="diffusers")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["controlnet_conditioning_channel_order"] = "bgr"
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="controlnet_conditioning_channel_order"):
        load_control(tmp_path / "c")


# ----------------------------------------------------------------------------------------------
# inspect, and diffusers reading our files
# ----------------------------------------------------------------------------------------------

def test_inspect_says_controlnet_layout_and_base_family(tmp_path, capsys):
    assert inspect_cli(["--manifest", str(FIXTURES / "manifest_controlnet_sd15.json.gz")]) == 0
    out = capsys.readouterr().out
    for expected in ("ControlNet:      yes, ControlNet 1.1 layout", "prefix control_model.", "base family:   sd1",
                     "judged as:       load_control", "340/340 matched", "loads strictly"):
        assert expected in out, expected
    assert inspect_cli(["--manifest", str(FIXTURES / "manifest_diffusers_controlnet.json.gz")]) == 0
    assert "ControlNet:      yes, diffusers ControlNetModel" in capsys.readouterr().out
    full = write_manifest(full_ldm_manifest(), tmp_path / "control_sd15_full.json")
    assert inspect_cli(["--manifest", str(full)]) == 0
    out = capsys.readouterr().out
    assert "ControlNet 1.0 full file" in out and "logvar: 1" in out and "family:          sd1" in out
    save_control(random_control(ControlNetConfig.tiny_sd2()), tmp_path / "c2.safetensors")
    assert inspect_cli([str(tmp_path / "c2.safetensors")]) == 0
    assert "ControlNet:      yes" in capsys.readouterr().out


def test_diffusers_loads_our_folder_with_the_same_residuals(tmp_path):
    from diffusers import ControlNetModel

    control = random_control()
    save_control(control, tmp_path / "controlnet", layout="diffusers")
    reference = ControlNetModel.from_pretrained(tmp_path / "controlnet").eval()
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    hint, t = torch.rand(2, 3, 64, 64, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        down, mid = reference(x, t, context, controlnet_cond=hint, return_dict=False)
        ours = control(x, t, context, hint)
    assert max((a - b).abs().max() for a, b in zip(ours, list(down) + [mid])) <= 1e-5


def test_config_inferred_from_shapes_for_tiny_and_sd15():
    parts = open_checkpoint(FIXTURES / "manifest_controlnet_sd15.json.gz").parts
    assert parts["controlnet"].config == ControlNetConfig.sd15()
    assert parts["controlnet"].config_source == "tensor shapes"

"""Bad input: every refusal is a CheckpointError naming the file and the key or problem, and no
pickle ever runs code."""
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.stable_diffusion import StableDiffusion, preset
from weights import CheckpointError, inspect_checkpoint, load_pipeline, load_unet, load_vae, save_ldm
from weights import layouts
from weights.save import ldm_state_dict


@pytest.fixture(scope="module")
def tiny_tensors():
    torch.manual_seed(0)
    tensors, _ = ldm_state_dict(StableDiffusion(preset("tiny")))
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def write(tmp_path, name, tensors):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def raises(path, call=load_pipeline, **kwargs) -> str:
    with pytest.raises(CheckpointError) as caught:
        call(path, **kwargs)
    message = str(caught.value)
    assert str(path) in message, message
    return message


def test_truncated_safetensors(tmp_path, tiny_tensors):
    data = write(tmp_path, "full.safetensors", tiny_tensors).read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    message = raises(path)
    assert "not a readable safetensors file" in message


def test_corrupt_header(tmp_path, tiny_tensors):
    data = bytearray(write(tmp_path, "full.safetensors", tiny_tensors).read_bytes())
    data[8:16] = b"{garbage"
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(bytes(data))
    assert "not a readable safetensors file" in raises(path)


def test_tensor_of_the_wrong_shape_names_key_and_both_shapes(tmp_path, tiny_tensors):
    tensors = dict(tiny_tensors)
    key = layouts.LDM_UNET + "out.2.weight"
    tensors[key] = torch.zeros(4, 32, 3, 1)
    message = raises(write(tmp_path, "shape.safetensors", tensors), prediction_type="epsilon")
    assert key in message and "(4, 32, 3, 1)" in message and "(4, 32, 3, 3)" in message


def test_wrong_shape_through_a_transform_names_both_keys(tmp_path):
    tensors, _ = ldm_state_dict(StableDiffusion(preset("tiny-sd2")))
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    key = layouts.LDM_OPENCLIP + "transformer.resblocks.0.attn.in_proj_weight"
    tensors[key] = torch.zeros(95, 32)
    message = raises(write(tmp_path, "qkv.safetensors", tensors), prediction_type="epsilon")
    assert key in message and "encoder.layers.0.self_attn.q_proj.weight" in message and "(95, 32)" in message


def test_missing_key_is_named_with_counts(tmp_path, tiny_tensors):
    tensors = dict(tiny_tensors)
    gone = [layouts.LDM_VAE + "quant_conv.weight", layouts.LDM_VAE + "quant_conv.bias"]
    for key in gone:
        del tensors[key]
    message = raises(write(tmp_path, "missing.safetensors", tensors), prediction_type="epsilon")
    assert "vae: 2 missing key(s)" in message and all(key in message for key in gone)


def test_unexpected_key_is_named(tmp_path, tiny_tensors):
    tensors = dict(tiny_tensors, **{"model.diffusion_model.extra_head.weight": torch.zeros(3)})
    message = raises(write(tmp_path, "extra.safetensors", tensors), prediction_type="epsilon")
    assert "1 unexpected key(s)" in message and "model.diffusion_model.extra_head.weight" in message


def test_unknown_layout(tmp_path):
    path = write(tmp_path, "resnet.safetensors", {"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.bias": torch.zeros(4)})
    message = raises(path)
    assert "unknown layout" in message and "conv1.weight" in message


def test_inpainting_unet_is_refused_with_the_reason(tmp_path, tiny_tensors):
    tensors = dict(tiny_tensors)
    key = layouts.LDM_UNET + "input_blocks.0.0.weight"
    tensors[key] = torch.zeros(32, 9, 3, 3)
    message = raises(write(tmp_path, "inpaint.safetensors", tensors))
    assert "inpainting" in message and key in message
    raises(tmp_path / "inpaint.safetensors", call=load_unet)


def test_sdxl_like_key_sets_are_refused_with_the_reason(tmp_path, tiny_tensors):
    tensors = dict(tiny_tensors)
    tensors["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.zeros(4)
    message = raises(write(tmp_path, "sdxl.safetensors", tensors))
    assert "SDXL" in message and "conditioner.embedders.0" in message
    tensors = dict(tiny_tensors, **{layouts.LDM_UNET + "label_emb.0.0.weight": torch.zeros(4, 4)})
    message = raises(write(tmp_path, "label.safetensors", tensors))
    assert "label_emb" in message and "SDXL" in message
    diffusers_like = {"conv_in.weight": torch.zeros(4, 4, 3, 3), "add_embedding.linear_1.weight": torch.zeros(4, 4)}
    message = raises(write(tmp_path, "xl_unet.safetensors", diffusers_like), call=load_unet)
    assert "add_embedding" in message


class _Payload:
    """Unpickling this would create the marker file (and could do anything else)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("payload", [_Payload, _ExecPayload])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"betas": torch.zeros(3)}, "hook": payload(marker)}, path)
    message = raises(path)
    assert not marker.exists(), "the pickle ran code"
    assert "refused to unpickle" in message and "never falls back to unsafe loading" in message
    assert re.search(r"(posix\.system|builtins\.exec|exec)", message), message
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        inspect_checkpoint(path)
    assert not marker.exists()


def test_non_tensor_entry_in_state_dict_is_refused(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"encoder.conv_in.weight": torch.zeros(1), "note": "hello"}, path)
    message = raises(path, call=load_vae)
    assert "'note'" in message and "not a tensor" in message


def test_ema_requested_but_absent(tmp_path, tiny_tensors):
    message = raises(write(tmp_path, "pruned.safetensors", tiny_tensors), ema=True)
    assert "no EMA weights" in message and "model_ema.diffusion_model" in message


def test_missing_component_is_named(tmp_path, tiny_tensors):
    unet_only = {k: v for k, v in tiny_tensors.items() if k.startswith(layouts.LDM_UNET)}
    message = raises(write(tmp_path, "unet_only.safetensors", unet_only))
    assert "no vae" in message and "no text_encoder" in message
    assert load_unet(tmp_path / "unet_only.safetensors") is not None


def test_not_a_checkpoint_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert "unknown weights file type" in raises(path)
    assert "no such file" in raises(tmp_path / "absent.safetensors")
    folder = tmp_path / "empty"
    folder.mkdir()
    assert "neither a diffusers pipeline folder" in raises(folder)


def test_unsupported_diffusers_config_is_rejected_with_the_field(tmp_path):
    import json

    from weights import save_diffusers
    model = StableDiffusion(preset("tiny"))
    folder = save_diffusers(model, tmp_path / "pipe")
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["resnet_time_scale_shift"] = "scale_shift"
    config_path.write_text(json.dumps(config))
    message = raises(folder / "unet", call=load_unet)
    assert "resnet_time_scale_shift" in message and "scale_shift" in message
    config["resnet_time_scale_shift"] = "default"
    config["in_channels"] = 9
    config_path.write_text(json.dumps(config))
    assert "inpainting" in raises(folder / "unet", call=load_unet)


def test_written_file_is_never_left_half_written(tmp_path, monkeypatch):
    """save_ldm writes to a temporary name; a failure leaves neither a partial file nor the temporary."""
    import safetensors.torch

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError):
        save_ldm(StableDiffusion(preset("tiny")), tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    path = save_ldm(StableDiffusion(preset("tiny")), tmp_path / "model.safetensors")
    assert load_file(str(path))

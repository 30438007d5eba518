"""Generation habits: --seeds, the control window (control_guidance_start / _end) and the A1111
`parameters` PNG chunk read back."""
import numpy as np
import pytest
import torch

from data.files import write_image_atomic
from model.controlnet import ControlNet
from sample.generate import GenerateConfig, main
from sample.pipeline import generate, random_pipeline
from sample.png_info import model_hash, parse_a1111_parameters, read_text_chunks
from weights import save_control, save_ldm

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_control(sd):
    """A ControlNet whose zero convs are random, so it changes the image."""
    control = ControlNet.from_unet(sd.unet)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in control.named_parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return control.eval()


def test_control_window_turns_the_control_on_only_for_its_steps():
    sd = random_pipeline("tiny", seed=1)
    control = trained_control(sd)
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    common = dict(seeds=[3], steps=2, guidance=3.0)
    plain = generate(sd, "x", **common)
    full = generate(sd, "x", control=control, hints=hint, **common)
    same_full = generate(sd, "x", control=control, hints=hint, control_start=0.0, control_end=1.0, **common)
    # 2 steps: step i is on when i/2 >= start and (i+1)/2 <= end (diffusers' rule)
    none_on = generate(sd, "x", control=control, hints=hint, control_start=0.9, control_end=1.0, **common)
    first_only = generate(sd, "x", control=control, hints=hint, control_start=0.0, control_end=0.5, **common)
    assert torch.equal(full, same_full) and torch.equal(none_on, plain)
    # the first step's control moves the image a lot, the last step's (t = 1 of DDIM) a little, but surely
    assert (first_only - plain).abs().max() > 1e-2 and (first_only - full).abs().max() > 1e-4
    with pytest.raises(ValueError, match="control_start < control_end"):
        generate(sd, "x", control=control, hints=hint, control_start=0.6, control_end=0.5, **common)


def test_png_parameters_chunk_reads_back_the_call_settings(tmp_path):
    sd = random_pipeline("tiny", seed=3)
    save_ldm(sd, tmp_path / "tiny.safetensors")
    control = trained_control(sd)
    save_control(control, tmp_path / "control.safetensors")
    write_image_atomic(tmp_path / "hint.png", (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    cfg = GenerateConfig(ckpt=str(tmp_path / "tiny.safetensors"), prompt="an image of a sks, with a crack",
                         negative_prompt="blurry", seeds=(11, 42), sampler="dpmpp", steps=3, guidance=5.5,
                         control=str(tmp_path / "control.safetensors"), hint=str(tmp_path / "hint.png"),
                         control_scale=0.8, control_start=0.0, control_end=0.5, batch=2, out=str(tmp_path / "o"),
                         progress=False, device="cpu", dtype="fp32")
    result = main(cfg)
    assert list(result.seeds) == [11, 42] and len(result.images) == 2
    import json
    record = json.loads((tmp_path / "o" / "generate.json").read_text())
    assert record["provenance"]["torch"] == torch.__version__ and record["provenance"]["device"].startswith("cpu")
    for path, seed in zip(result.images, [11, 42]):
        prompt, negative, settings = parse_a1111_parameters(read_text_chunks(path)["parameters"])
        assert (prompt, negative) == ("an image of a sks, with a crack", "blurry")
        assert settings["Steps"] == "3" and settings["Sampler"] == "DPM++ 2M" and settings["CFG scale"] == "5.5"
        assert settings["Seed"] == str(seed) and settings["Size"] == "64x64"
        assert settings["Model hash"] == model_hash(tmp_path / "tiny.safetensors") and settings["Model"] == "tiny"
        assert f"[{model_hash(tmp_path / 'control.safetensors')}]" in settings["ControlNet 0"]
        assert "Weight: 0.8, Guidance Start: 0.0, Guidance End: 0.5" in settings["ControlNet 0"]
    # the chunk does not change the pixels: the same seed through --seeds gives the same image
    again = main(GenerateConfig(**{**cfg.__dict__, "seeds": (42,), "png_info": False, "out": str(tmp_path / "p")}))
    import cv2
    assert np.array_equal(cv2.imread(str(again.images[0])), cv2.imread(str(result.images[1])))
    assert "parameters" not in read_text_chunks(again.images[0])

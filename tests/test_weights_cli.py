"""python -m weights.inspect / weights.convert through main(cfg) and cli(argv)."""
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.stable_diffusion import StableDiffusion, preset
from weights import layouts, load_pipeline, save_ldm
from weights.convert import ConvertConfig, cli as convert_cli, main as convert_main
from weights.inspect import InspectConfig, cli as inspect_cli, main as inspect_main

FIXTURES = Path(__file__).parent / "fixtures"


def test_inspect_manifest_prints_family_prediction_components_and_coverage(capsys):
    code = inspect_main(InspectConfig(manifest=str(FIXTURES / "manifest_sd15_ldm_with_ema.json.gz"), ema=True))
    out = capsys.readouterr().out
    assert code == 0
    for expected in ("family:          sd1", "prediction type: epsilon", "ema weights:     yes",
                     "unet", "859,520,964 parameters", "686/686 matched", "EMA bookkeeping: 2",
                     "non-EMA UNet weights (ema=True): 686", "unexpected:      0", "loads strictly"):
        assert expected in out, expected


def test_inspect_exit_codes(tmp_path, capsys):
    assert inspect_cli([str(FIXTURES / "manifest_sd21_v_ldm.json.gz")]) == 0
    assert "v_prediction" in capsys.readouterr().out
    # Unsupported or unreadable: 2, with the reason.
    sdxl = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    assert inspect_cli([str(tmp_path / "sdxl.safetensors")]) == 2
    assert "SDXL" in capsys.readouterr().err
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert inspect_cli([str(tmp_path / "garbage.safetensors")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    # Would not load (a missing key): 1, naming it.
    tensors = {k: v.contiguous() for k, v in save_and_read(tmp_path).items()
               if k != layouts.LDM_UNET + "out.2.bias"}
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    assert inspect_cli([str(tmp_path / "broken.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "WOULD NOT LOAD" in out and layouts.LDM_UNET + "out.2.bias" in out
    assert inspect_cli([]) == 2


def save_and_read(tmp_path):
    torch.manual_seed(0)
    return load_file(str(save_ldm(StableDiffusion(preset("tiny")), tmp_path / "tiny.safetensors")))


def test_convert_ldm_to_diffusers_and_back_is_exact(tmp_path, capsys):
    torch.manual_seed(0)
    model = StableDiffusion(preset("tiny-sd2"))
    src = save_ldm(model, tmp_path / "src.safetensors")
    assert convert_cli([str(src), str(tmp_path / "pipe"), "--to", "diffusers"]) == 0
    out = capsys.readouterr().out
    assert "prediction type: epsilon" in out and "wrote" in out
    assert convert_main(ConvertConfig(src=str(tmp_path / "pipe"), dst=str(tmp_path / "back.safetensors"), to="ldm")) == 0
    original, back = load_file(str(src)), load_file(str(tmp_path / "back.safetensors"))
    assert set(original) == set(back) and all(torch.equal(original[k], back[k]) for k in original)
    # Refuses to overwrite; fp16 output on request.
    assert convert_cli([str(src), str(tmp_path / "back.safetensors")]) == 2
    assert convert_cli([str(src), str(tmp_path / "half.safetensors"), "--dtype", "fp16"]) == 0
    assert load_file(str(tmp_path / "half.safetensors"))[layouts.LDM_UNET + "out.2.weight"].dtype == torch.float16
    assert load_pipeline(tmp_path / "half.safetensors").config == model.config


def test_umbrella_command_dispatches_to_inspect(capsys):
    from defectsynth.cli import main

    assert main(["inspect", str(FIXTURES / "manifest_diffusers_sd15_vae_legacy_attn.json.gz")]) == 0
    assert "legacy attention names" in capsys.readouterr().out

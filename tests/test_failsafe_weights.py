"""Issue 15, weights: NaN/inf weights, integer dtypes and git-lfs pointers are refused with one line
naming the file and tensor; inspect reports them; convert writes nothing."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.stable_diffusion import StableDiffusion, preset
from sample.generate import cli as generate_cli
from weights import save_ldm
from weights.convert import cli as convert_cli
from weights.inspect import cli as inspect_cli
from weights.checks import count_non_finite
from weights.load import inspect_checkpoint, load_pipeline

UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    return save_ldm(StableDiffusion(preset("tiny")), tmp_path_factory.mktemp("w") / "tiny.safetensors")


def damaged(src, dst, change):
    """A copy of `src` with `change(tensors)` applied, saved with the same metadata."""
    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as handle:
        metadata = handle.metadata()
    change(tensors)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def all_nan_unet(tensors):
    for key, value in tensors.items():
        if key.startswith(UNET) and value.is_floating_point():
            value.fill_(float("nan"))


def one_inf(tensors):
    tensors[UNET + "out.2.weight"].view(-1)[3] = float("inf")


def integer_weight(tensors):
    tensors[UNET + "out.2.weight"] = tensors[UNET + "out.2.weight"].to(torch.int64)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("change, key", [(all_nan_unet, UNET + "time_embed.0.weight"), (one_inf, UNET + "out.2.weight")])
def test_non_finite_weights_refused_everywhere(tiny_file, tmp_path, capsys, change, key):
    bad = damaged(tiny_file, tmp_path / "bad.safetensors", change)
    # Before: inspect said "loads strictly", generate wrote a black PNG, convert a NaN file.
    assert inspect_cli([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "WOULD NOT LOAD" in out and key in out and "NaN/inf" in out
    with pytest.raises(ValueError, match=f"{bad}.*{key}.*NaN/inf"):
        load_pipeline(bad)
    assert generate_cli(["--ckpt", str(bad), "--out", str(tmp_path / "gen"), "--steps", "1", "--num", "1",
                         "--no-progress", "--device", "cpu", "--dtype", "fp32"]) == 2
    line = one_line_error(capsys)
    assert line.startswith("defectsynth generate: ") and str(bad) in line and key in line
    assert not (tmp_path / "gen").exists()
    assert convert_cli([str(bad), str(tmp_path / "out.safetensors")]) == 2
    assert key in one_line_error(capsys)
    assert not (tmp_path / "out.safetensors").exists()


def test_integer_weights_refused_at_load_and_by_inspect(tiny_file, tmp_path, capsys):
    bad = damaged(tiny_file, tmp_path / "int.safetensors", integer_weight)
    info = inspect_checkpoint(bad)  # meta only: the dtype is in the header
    assert not info.ok and "int64" in info.problems() and UNET + "out.2.weight" in info.problems()
    assert generate_cli(["--ckpt", str(bad), "--out", str(tmp_path / "gen"), "--steps", "1", "--num", "1",
                         "--no-progress", "--device", "cpu", "--dtype", "fp32"]) == 2
    line = one_line_error(capsys)
    assert "int64" in line and "floating-point" in line and not (tmp_path / "gen").exists()


def test_git_lfs_pointer_is_named_as_one(tmp_path, capsys):
    for name in ("model.safetensors", "model.ckpt"):
        pointer = tmp_path / name
        pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 4265146304\n")
        assert inspect_cli([str(pointer)]) == 2
        line = one_line_error(capsys)
        assert "git-lfs pointer" in line and str(pointer) in line and "git lfs pull" in line


def test_finiteness_check_is_chunked_and_counts():
    tensor = torch.zeros(3 * (1 << 22) + 5)
    tensor[-1], tensor[7] = float("nan"), float("-inf")
    assert count_non_finite(tensor) == 2
    assert count_non_finite(torch.zeros(4, dtype=torch.int64)) == 0
    assert count_non_finite(torch.ones(2, 3, dtype=torch.float16)) == 0


def test_a_clean_file_still_inspects_and_loads(tiny_file, capsys):
    assert inspect_cli([str(tiny_file)]) == 0
    assert "loads strictly" in capsys.readouterr().out
    assert inspect_checkpoint(tiny_file, check_values=True).non_finite == []

"""The *-dtypes benchmarks (ours and diffusers in fp32 and bf16, interleaved in one process) on
tiny sizes: each runs and reports every side; the ratios' arithmetic is checked on fixed times."""
from __future__ import annotations

import math

import pytest

from defectsynth import benchmark
from defectsynth.benchmark import SpeedConfig, compare_dtypes, config_from_argv

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--batch", "1", "--latent", "8", "--repeats", "1", "--warmup", "0", "--clock", "process"]
SIDES = ("ours_fp32", "reference_fp32", "ours_bf16", "reference_bf16")


def test_ratios_and_speedups_from_the_medians(monkeypatch, capsys):
    times = {"ours_fp32": 80.0, "reference_fp32": 100.0, "ours_bf16": 40.0, "reference_bf16": 90.0}
    monkeypatch.setattr(benchmark, "median_ms", lambda runs, *args: {name: times[name] for name in runs})
    runs = {(impl, dtype): None for impl in ("ours", "reference") for dtype in ("fp32", "bf16")}
    result = compare_dtypes(runs, SpeedConfig(dtypes=("fp32", "bf16")), "label", unit="ms/image", per=2.0)
    assert result["ratio_fp32"] == 0.8 and result["ratio_bf16"] == pytest.approx(40 / 90)
    assert result["ours_bf16_speedup"] == 2.0 and result["reference_bf16_speedup"] == pytest.approx(100 / 90)
    assert result["ours_fp32_ms"] == 40.0  # divided by `per`
    assert "fp32: ours 40.0 ms/image, diffusers 50.0 ms/image, ours/diffusers 0.800" in capsys.readouterr().out


def finite_sides(result: dict) -> bool:
    return all(math.isfinite(result[f"{side}_ms"]) and result[f"{side}_ms"] > 0 for side in SIDES)


def test_unet_dtypes_runs_all_four_sides():
    from eval.speed import get_args_parser, main

    result = main(config_from_argv(get_args_parser(), ["unet-dtypes", *TINY]))
    assert result["benchmark"] == "unet-dtypes" and finite_sides(result)
    assert result["params"] > 5_000_000  # the small UNet, not tiny (1.4M)


@pytest.mark.parametrize("name", ["train-step-dtypes", "control-step-dtypes"])
def test_step_dtypes_train_the_same_network_on_both_sides(name):
    from train.speed import get_args_parser, main

    result = main(config_from_argv(get_args_parser(), [name, *TINY]))
    assert result["benchmark"] == name and finite_sides(result)
    assert result["params"] == result["reference_params"] > 0


@pytest.mark.slow
def test_synth_dtypes_runs_all_four_sides():
    from eval.speed import get_args_parser, main

    result = main(config_from_argv(get_args_parser(), ["synth-dtypes", "--batch", "1", "--latent", "8",
                                                       "--repeats", "1", "--warmup", "0", "--clock", "process"]))
    assert result["benchmark"] == "synth-dtypes" and finite_sides(result)
    assert result["images_per_run"] == 2 and result["ours_bf16_images_per_s"] > 0

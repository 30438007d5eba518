"""The speed benchmarks on tiny networks: eval.speed in this process, train.speed and the GPU suite
(.ci/gpu) as scripts. They check that each benchmark runs, that ours and diffusers agree where a
difference is reported, and that --results collects one JSON line per run; the times themselves
are not asserted (a shared CPU machine measures its load)."""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from defectsynth.benchmark import SpeedConfig, run_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--latent", "8", "--repeats", "1", "--warmup", "0", "--clock", "process"]


def read_results(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]  # every line must be valid JSON


def finite_positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def run_eval_speed(argv: list[str]) -> dict:
    from eval.speed import get_args_parser, main

    from defectsynth.benchmark import config_from_argv
    return main(config_from_argv(get_args_parser(), argv))


def check_step(result: dict, name: str, params_key: str) -> None:
    """A train.speed result: the same network on both sides, positive finite times and memory."""
    assert result["benchmark"] == name and result["model"] == "tiny"
    assert result[params_key] == result[f"reference_{params_key}"] > 0
    assert finite_positive(result["ours_ms"], result["reference_ms"], result["time_ratio"],
                           result["ours_peak_mib"], result["reference_peak_mib"], result["memory_ratio"])
    # Both build the same networks: a large memory gap would mean one side measures something else.
    assert 0.5 < result["memory_ratio"] < 2.0


# ----------------------------------------------------------------------------------------------
# eval.speed, in this process
# ----------------------------------------------------------------------------------------------

def test_unet_tiny_parity_and_results_file(tmp_path):
    results = tmp_path / "out" / "speed.jsonl"  # the folder does not exist yet
    first = run_eval_speed(["unet-tiny", "--batch", "2", *TINY, "--results", str(results)])
    second = run_eval_speed(["unet-tiny", "--batch", "1", *TINY, "--results", str(results)])
    assert first["benchmark"] == "unet-tiny" and first["batch"] == 2
    assert finite_positive(first["ours_ms"], first["reference_ms"], first["ratio"])
    assert first["max_abs_diff"] < 1e-5  # the tiny-config parity tolerance (docs/testing.md)
    assert read_results(results) == [first, second]  # appended, one line per run


def test_t2i_tiny(tmp_path):
    result = run_eval_speed(["t2i", "--batch", "2", *TINY])
    assert result["preset"] == "tiny" and result["size"] == 64
    assert finite_positive(result["ours_ms_per_image"], result["reference_ms_per_image"], result["ratio"])
    assert result["max_abs_image_diff"] < 1e-4  # images in [0, 1] after 20 DDIM steps


def test_synth_tiny(tmp_path):
    result = run_eval_speed(["synth", "--batch", "2", *TINY])
    assert result["preset"] == "tiny" and result["images_per_run"] == 4
    assert finite_positive(result["ours_images_per_s"], result["ours_generate_images_per_s"],
                           result["reference_images_per_s"], result["throughput_ratio"])
    assert result["max_abs_image_diff"] < 1e-4


def test_demo_data_build_is_timed():
    result = run_eval_speed(["demo-data", "--repeats", "1", "--warmup", "0", "--clock", "process"])
    assert result["benchmark"] == "demo-data" and finite_positive(result["demo_ms"])


def test_options_are_checked():
    from eval.speed import BENCHMARKS

    with pytest.raises(ValueError, match="--repeats"):
        run_benchmark(SpeedConfig(benchmark="unet-tiny", repeats=0), BENCHMARKS, "eval.speed")
    with pytest.raises(ValueError, match="unknown benchmark 'train-step-tiny'"):  # lives in train.speed
        run_benchmark(SpeedConfig(benchmark="train-step-tiny"), BENCHMARKS, "eval.speed")


# ----------------------------------------------------------------------------------------------
# train.speed: the step of each side in this process; the fresh processes through the GPU suite
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_step_child_trains_the_same_unet_on_both_sides(checkpointing):
    """What a fresh process of train-step-tiny(-ckpt) runs, here in this process (8 fresh processes
    would cost ~70 s of imports on this machine; control-step-tiny runs them below, through the
    same run_in_fresh_processes). This process's peak RSS is not the step's, so memory is not checked."""
    from train.speed import step_child

    options = dict(vars(SpeedConfig(benchmark="train-step-tiny", batch=2, latent=8, repeats=1, warmup=0,
                                    clock="process")))
    ours = step_child("ours", "unet", "tiny", checkpointing, options)
    reference = step_child("reference", "unet", "tiny", checkpointing, options)
    assert ours["params"] == reference["params"] == 1427012  # UNetConfig.tiny()
    assert finite_positive(ours["ms"], reference["ms"], ours["saved_bytes"], reference["saved_bytes"])
    if not checkpointing:  # the same layers keep the same tensors for backward, byte for byte
        assert ours["saved_bytes"] == reference["saved_bytes"]



def run_suite(tmp_path: Path, *entries: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / ".ci" / "gpu"), *entries], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "GPU_SUITE_DEVICE": "cpu", "GPU_SUITE_TINY": "1",
                                            "OUT": str(tmp_path / "gpu"), "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
def test_gpu_suite_tiny_runs_control_step_and_survives_a_failure(tmp_path):
    # A python that fails for the unet-b8 entry only: the suite must record it and go on.
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    'if [ "$1 $2 $3" = "-m eval.speed unet-tiny" ]; then case " $* " in *" --batch 8 "*)\n'
                    '  echo "injected failure" >&2; exit 3;; esac; fi\n'
                    f'exec {shlex.quote(sys.executable)} "$@"\n')
    fake.chmod(0o755)
    proc = run_suite(tmp_path, "unet-b8", "control-step", PYTHON=str(fake))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # 1: an entry failed

    environment, failed, control_step = read_results(tmp_path / "gpu" / "results.jsonl")
    assert environment["benchmark"] == "environment" and environment["device"] == "cpu"
    assert failed["entry"] == "unet-b8" and failed["failed"] is True and failed["returncode"] == 3
    assert "injected failure" in failed["error"]
    check_step(control_step, "control-step-tiny", "control_params")
    assert control_step["dtype"] == "fp32" and control_step["batch"] == 4  # the tiny options replace bf16
    assert "control-step-tiny tiny cpu fp32 batch 4 latent 8: ours" in proc.stdout  # the benchmark's own line


def test_gpu_suite_records_what_the_budget_skips_and_rejects_unknown_entries(tmp_path):
    proc = run_suite(tmp_path, "unet-fp32", "synth", GPU_SUITE_BUDGET_S="5")
    assert proc.returncode == 1
    records = read_results(tmp_path / "gpu" / "results.jsonl")
    assert [r.get("entry") for r in records] == [None, "unet-fp32", "synth"]
    assert all(r["skipped"] is True for r in records[1:])
    assert run_suite(tmp_path, "no-such-entry").returncode == 2

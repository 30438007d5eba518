"""bf16 on the CPU: what `--precision auto` / `--dtype auto` resolve to (the CPU's bf16 support is
injected, so the tests are the same on every machine), and bf16 autocast against float32 on the
tiny networks and one sampler loop.

Tolerances. bf16 keeps 8 significant bits: one rounding is at most 2^-9 = 0.2% relative, and
autocast rounds the inputs and weights of every matmul and convolution while GroupNorm, softmax and
the sums stay float32. Measured on these tiny networks (max |bf16 - fp32| / max |fp32|): UNet 0.4%,
ControlNet residuals 1.0%, VAE round trip 2.4% (encoder and decoder chained, 2x the layers), the
UNet's gradient 0.2% (norm of the difference over the norm); a 10-step DDIM loop with CFG ends within
0.009 (max) / 0.0013 (mean) of the float32 images in [0, 1], where another seed differs by 0.15 on
average. Each bound below is about 2-5x the measurement: loose enough for other CPUs' summation
orders, tight enough that a float32-only path that silently fell back (0) or a broken cast (an
error as large as the output itself) fails.
"""
import math

import pytest
import torch

from model.controlnet import ControlNet
from model.unet import UNetConfig
from sample import runtime
from sample.pipeline import generate, random_pipeline
from sample.runtime import auto_low_precision, cpu_bf16_features, cpu_bf16_supported, resolve_dtype
from tests.test_controlnet import inputs, randomise_zero_inits, random_unet
from tests.test_unet import tiny_inputs, tiny_unet
from tests.test_vae import images, tiny_vae
from train.precision import autocast, resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().float() - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------------------- auto resolution

def test_auto_resolves_to_bf16_on_a_cpu_with_bf16_and_fp32_without(capsys):
    assert resolve_precision("auto", CPU, cpu_bf16=True, announce="train.x") == "bf16"
    assert "train.x: precision auto -> bf16 (CPU with native bf16" in capsys.readouterr().out
    assert resolve_precision("auto", CPU, cpu_bf16=False, announce="train.x") == "fp32"
    assert "train.x: precision auto -> fp32 (CPU without native bf16)" in capsys.readouterr().out
    assert resolve_dtype("auto", CPU, cpu_bf16=True, announce="sample.x") == torch.bfloat16
    assert "sample.x: dtype auto -> bf16" in capsys.readouterr().out
    assert resolve_dtype("auto", CPU, cpu_bf16=False) == torch.float32
    # An explicit choice is kept whatever the CPU can do.
    assert resolve_precision("fp32", CPU, cpu_bf16=True) == "fp32"
    assert resolve_precision("bf16", CPU, cpu_bf16=False) == "bf16"
    assert resolve_dtype("bf16", CPU, cpu_bf16=False) == torch.bfloat16


def test_detection_reads_the_cpu_features_and_the_environment_overrides_it(monkeypatch):
    monkeypatch.delenv(runtime.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: {"avx512_bf16": False, "amx_bf16": True})
    assert cpu_bf16_features() == ["amx_bf16"] and cpu_bf16_supported()
    assert auto_low_precision(CPU) == (True, "CPU with native bf16 (AMX / AVX-512 BF16)")
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: {"avx512_f": True, "avx512_bf16": False})
    assert cpu_bf16_features() == [] and not cpu_bf16_supported()  # AVX-512 alone emulates bf16: slower
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")
    assert cpu_bf16_supported() and resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "0")
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: {"avx512_bf16": True})
    assert not cpu_bf16_supported() and resolve_precision("auto", CPU) == "fp32"


def test_detection_falls_back_to_proc_cpuinfo_flags(monkeypatch):
    def missing():
        raise AttributeError("old PyTorch")

    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", missing)
    flags = "flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
    monkeypatch.setattr(runtime.Path, "read_text", lambda self, *a, **k: flags)
    assert cpu_bf16_features() == ["avx512_bf16"]
    monkeypatch.setattr(runtime.Path, "read_text", lambda self, *a, **k: "flags\t\t: fpu sse avx2 avx512f\n")
    assert cpu_bf16_features() == []


# ------------------------------------------------------------------------------ bf16 parity

def test_unet_forward_and_gradient_under_bf16_autocast_match_fp32():
    config = UNetConfig.tiny()
    unet = tiny_unet(config)
    x, t, context = tiny_inputs(config)
    ref = unet(x, t, context)
    (ref ** 2).mean().backward()
    grads = {name: p.grad.clone() for name, p in unet.named_parameters()}
    unet.zero_grad()
    with autocast(CPU, "bf16"):
        out = unet(x, t, context)
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in unet.parameters())  # master weights stay float32
    (out.float() ** 2).mean().backward()
    assert relative_error(out, ref.detach()) < 0.02
    diff = math.sqrt(sum(float((p.grad - grads[n]).norm()) ** 2 for n, p in unet.named_parameters()))
    norm = math.sqrt(sum(float(g.norm()) ** 2 for g in grads.values()))
    assert all(p.grad.dtype == torch.float32 for p in unet.parameters())
    assert 0 < diff / norm < 0.01


@torch.no_grad()
def test_vae_round_trip_under_bf16_autocast_matches_fp32():
    vae = tiny_vae()
    x = images(2)
    ref = vae.decode(vae.encode(x).mean)
    with autocast(CPU, "bf16"):
        out = vae.decode(vae.encode(x).mean)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert 0 < relative_error(out, ref) < 0.06


@torch.no_grad()
def test_controlnet_residuals_under_bf16_autocast_match_fp32():
    config = UNetConfig.tiny()
    control = randomise_zero_inits(ControlNet.from_unet(random_unet(config)))
    x, t, context, hint = inputs(config)
    ref = control(x, t, context, hint)
    with autocast(CPU, "bf16"):
        out = control(x, t, context, hint)
    assert len(out) == len(ref) and all(o.dtype == torch.bfloat16 for o in out)
    assert 0 < max(relative_error(o, r) for o, r in zip(out, ref)) < 0.04


@pytest.mark.parametrize("weights_in_bf16", [False, True], ids=["autocast", "bf16-weights"])
def test_ddim_loop_in_bf16_matches_fp32(weights_in_bf16):
    """generate(): autocast over float32 weights (training's validation images) and weights stored in
    bf16 (what --dtype bf16 loads for synthesis); the sampler maths stays float32 in both."""
    sd = random_pipeline("tiny", seed=0)
    kwargs = dict(seeds=[1, 2], steps=10, guidance=3.0, height=64, width=64)
    ref = generate(sd, "an image of a crack", **kwargs)
    if weights_in_bf16:
        out = generate(sd.to(torch.bfloat16), "an image of a crack", **kwargs)
    else:
        out = generate(sd, "an image of a crack", dtype=torch.bfloat16, **kwargs)
    diff = (out - ref).abs()
    assert out.dtype == torch.float32
    assert 0 < float(diff.mean()) < 0.005 and float(diff.max()) < 0.03

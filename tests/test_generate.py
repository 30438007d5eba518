"""sample/pipeline.generate and the `python -m sample.generate` CLI on the tiny preset (random weights).

Batch-size independence: a sample's random numbers depend on its seed alone, exactly (tested on
x_T and on the per-step noise of the stochastic samplers). The images themselves agree to ~1e-6,
not bit for bit: CPU kernels are chosen by batch size (a batch-1 Linear is a GEMV, oneDNN blocks
small convolutions by batch), so the float results differ in the last bits, which can move a PNG
pixel by one grey level in a rare pixel.
"""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data.files import write_image_atomic
from model.controlnet import ControlNet
from sample.generate import GenerateConfig, cli, main
from sample.noise import generators_from_seeds, randn_per_sample
from sample.pipeline import SAMPLERS, generate, random_pipeline
from weights import save_control, save_ldm


@pytest.fixture(scope="module")
def sd():
    return random_pipeline("tiny", seed=0)


def read_png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def randomise_zero_convs(control: ControlNet) -> ControlNet:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in [*control.zero_convs, control.middle_block_out, control.input_hint_block[-1]]:
            for p in m.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return control


# ----------------------------------------------------------------------------------------------
# generate()
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_generate_shape_range_and_batch_independence(sd, sampler):
    seeds = [11, 12, 13]
    together = generate(sd, "a test", seeds=seeds, sampler=sampler, steps=3)
    assert together.shape == (3, 3, 64, 64) and together.dtype == torch.float32
    assert together.min() >= 0 and together.max() <= 1 and together.std() > 0.05
    alone = torch.cat([generate(sd, "a test", seeds=[s], sampler=sampler, steps=3) for s in seeds])
    assert (together - alone).abs().max() < 1e-4
    again = generate(sd, "a test", seeds=seeds, sampler=sampler, steps=3)
    assert torch.equal(together, again)  # same call, same bits
    assert (together[0] - together[1]).abs().max() > 0.05  # different seeds, different images


def test_random_numbers_depend_on_the_sample_seed_only():
    batch = randn_per_sample((3, 4, 8, 8), generators_from_seeds([1, 2, 3]))
    single = torch.cat([randn_per_sample((1, 4, 8, 8), generators_from_seeds([s])) for s in (1, 2, 3)])
    assert torch.equal(batch, single)


def test_contexts_prompts_and_component_overrides_agree(sd):
    """What train.concept needs: cached (1, 77, D) contexts and its own frozen unet / vae copies."""
    by_prompt = generate(sd, "a test", seeds=[3, 4], negative_prompts="blurry", steps=2)
    cond, uncond = sd.encode_prompts(["a test", "blurry"]).chunk(2)
    by_context = generate(sd, seeds=[3, 4], cond=cond, uncond=uncond, steps=2, unet=sd.unet, vae=sd.vae)
    assert torch.equal(by_prompt, by_context)
    per_row = generate(sd, ["a test", "other"], seeds=[3, 4], negative_prompts="blurry", steps=2)
    assert (per_row[0] - by_prompt[0]).abs().max() < 1e-5 and (per_row[1] - by_prompt[1]).abs().max() > 1e-3
    unguided = generate(sd, "a test", seeds=[3], guidance=1.0, steps=2)
    assert (unguided - by_prompt[:1]).abs().max() > 1e-3


def test_mixed_precision_and_half_weights(sd):
    reference = generate(sd, "a test", seeds=[7], steps=1)
    autocast = generate(sd, "a test", seeds=[7], steps=1, dtype=torch.bfloat16)
    assert autocast.dtype == torch.float32 and (autocast - reference).abs().max() < 0.1
    half = random_pipeline("tiny", seed=0).to(torch.bfloat16)
    out = generate(half, "a test", seeds=[7], steps=1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and (out - reference).abs().max() < 0.1


def test_v_prediction_models_sample(sd):
    v_model = random_pipeline("tiny", seed=0, prediction_type="v_prediction")
    assert v_model.prediction_type == "v_prediction"
    eps_out = generate(sd, "a test", seeds=[1], steps=2)
    v_out = generate(v_model, "a test", seeds=[1], steps=2)
    assert (v_out - eps_out).abs().max() > 1e-3  # the same network read as v gives other images


def test_control_zero_init_changes_nothing_and_trained_control_does(sd):
    control = ControlNet.from_unet(sd.unet).eval()
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = generate(sd, "a test", seeds=[1, 2], steps=3)
    assert torch.equal(generate(sd, "a test", seeds=[1, 2], steps=3, control=control, hints=hint), plain)
    randomise_zero_convs(control)
    driven = generate(sd, "a test", seeds=[1, 2], steps=3, control=control, hints=hint)
    assert (driven - plain).abs().max() > 1e-2
    weaker = generate(sd, "a test", seeds=[1, 2], steps=3, control=control, hints=hint, control_scale=0.0)
    assert torch.equal(weaker, plain)
    guess = generate(sd, "a test", seeds=[1, 2], steps=3, control=control, hints=hint, guess_mode=True)
    assert (guess - driven).abs().max() > 1e-3


def test_argument_errors_name_the_problem(sd):
    with pytest.raises(ValueError, match="multiples of 16"):  # tiny: 8x VAE x 2x UNet (SD: 64)
        generate(sd, "x", seeds=[0], height=72, steps=1)
    with pytest.raises(ValueError, match="eta"):
        generate(sd, "x", seeds=[0], sampler="ddpm", eta=0.5, steps=1)
    with pytest.raises(ValueError, match="2 entries for 3 seeds"):
        generate(sd, ["a", "b"], seeds=[0, 1, 2], steps=1)
    control = ControlNet.from_unet(sd.unet)
    with pytest.raises(ValueError, match="hints are"):
        generate(sd, "x", seeds=[0], steps=1, control=control, hints=torch.rand(1, 3, 128, 128))
    with pytest.raises(ValueError, match="needs hints"):
        generate(sd, "x", seeds=[0], steps=1, control=control)


# ----------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------

def cli_config(out: Path, **overrides) -> GenerateConfig:
    values = dict(random_weights=True, preset="tiny", prompt="an image of a sks", steps=3, num=4, batch=4,
                  seed=1, out=str(out), progress=False, device="cpu")
    values.update(overrides)
    return GenerateConfig(**values)


def test_cli_writes_what_it_promises_and_batch_size_does_not_matter(tmp_path):
    result = main(cli_config(tmp_path / "b4"))
    names = sorted(p.name for p in (tmp_path / "b4").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png", "generate.json", "grid.png"]
    assert [p.name for p in result.images] == names[:4] and result.grid == tmp_path / "b4" / "grid.png"
    image = read_png(result.images[0])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.std() > 5
    assert read_png(result.grid).shape == (2 + 2 * 66, 2 + 2 * 66, 3)  # 2 x 2 sheet, 2 px padding
    assert not list((tmp_path / "b4").glob(".*"))  # no temporary files left behind
    # Batch 1 and a ragged batch 3 give the same images for the same seeds.
    for batch in (1, 3):
        other = main(cli_config(tmp_path / f"b{batch}", batch=batch))
        assert other.seeds == result.seeds
        for a, b in zip(result.images, other.images):
            pa, pb = read_png(a).astype(int), read_png(b).astype(int)
            assert np.abs(pa - pb).max() <= 1 and (pa != pb).mean() < 1e-3


def test_batch_invariant_images_are_bit_identical_for_any_batch(tmp_path):
    # --batch-invariant runs the networks per sample: the same seed gives the same bytes.
    result = main(cli_config(tmp_path / "b4", batch_invariant=True))
    for batch in (1, 3):
        other = main(cli_config(tmp_path / f"b{batch}", batch=batch, batch_invariant=True))
        for a, b in zip(result.images, other.images):
            assert np.array_equal(read_png(a), read_png(b))


def test_batch_invariant_generate_equals_one_call_per_seed():
    sd = random_pipeline("tiny", seed=2)
    prompts = ["an image of a sks", "an image of a cat", "a crack"]
    together = generate(sd, prompts, seeds=[5, 6, 7], steps=2, batch_invariant=True)
    alone = torch.cat([generate(sd, [p], seeds=[s], steps=2) for p, s in zip(prompts, [5, 6, 7])])
    assert torch.equal(together, alone)


def test_cli_with_a_saved_control_and_hint(tmp_path):
    sd = random_pipeline("tiny", seed=1)  # the model the CLI builds from --seed 1
    control = ControlNet.from_unet(sd.unet)
    save_control(control, tmp_path / "control.safetensors")
    hint = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    write_image_atomic(tmp_path / "hint.png", hint)
    plain = main(cli_config(tmp_path / "plain", num=2, batch=2))
    zero = main(cli_config(tmp_path / "zero", num=2, batch=2, control=str(tmp_path / "control.safetensors"),
                           hint=str(tmp_path / "hint.png")))
    for a, b in zip(plain.images, zero.images):
        assert np.array_equal(read_png(a), read_png(b))  # a fresh control changes nothing, exactly
    save_control(randomise_zero_convs(control), tmp_path / "trained.safetensors")
    driven = main(cli_config(tmp_path / "driven", num=2, batch=2, control=str(tmp_path / "trained.safetensors"),
                             hint=str(tmp_path / "hint.png"), control_scale=1.0))
    assert any(np.abs(read_png(a).astype(int) - read_png(b)).max() > 10 for a, b in zip(plain.images, driven.images))


def test_cli_parses_flags_and_needs_an_output(tmp_path):
    assert cli(["--random-weights", "--preset", "tiny", "--prompt", "x", "--steps", "1", "--num", "1",
                "--sampler", "dpmpp", "--dtype", "fp32", "--no-progress", "--no-grid",
                "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["000000.png", "generate.json"]
    with pytest.raises(ValueError, match="--out"):
        main(cli_config(""))
    with pytest.raises(ValueError, match="--control and --hint"):
        main(cli_config(tmp_path / "x", control="c.safetensors"))


def test_cli_loads_a_checkpoint(tmp_path):
    save_ldm(random_pipeline("tiny", seed=3), tmp_path / "tiny.safetensors")
    result = main(cli_config(tmp_path / "o", random_weights=False, ckpt=str(tmp_path / "tiny.safetensors"),
                             seed=3, num=1, batch=1))
    from_weights = main(cli_config(tmp_path / "r", seed=3, num=1, batch=1))
    # Same weights and seed -> the same image (the sample seed derives from --seed only).
    assert np.array_equal(read_png(result.images[0]), read_png(from_weights.images[0]))

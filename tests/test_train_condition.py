"""train/condition.py on the tiny preset (CPU): the zero-conv start, the frozen UNet, the loss going
down, prompt dropping, sd_locked / only_mid_control, the inpaint baseline, validation with the
adherence score, export round trips in both layouts, bit-exact resume, the non-finite stop, DDP."""
from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import signal
import subprocess
import types
import sys
from pathlib import Path

import pytest
import torch

import train.condition as condition
from data.adherence import estimate_polarity
from data.coco import load_coco
from data.datasets import ConditionDataset
from data.files import write_image_atomic
from data.hints import build_hint, read_condition_metadata
from data.images import read_image, tensor_to_image
from data.seeding import derive_seed
from model.controlnet import ControlNet
from sample.pipeline import random_pipeline
from train import checkpoint as ckpt
from train.condition import ConditionConfig, controlled_output, drop_prompts, item_hint, item_instances
from train.monitor import NonFiniteLossError
from weights import load_control, load_pipeline, save_ldm

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(data: Path, out: Path, **overrides) -> ConditionConfig:
    base = dict(preset="tiny", random_weights=True, data=str(data), out=str(out), steps=3, batch_size=2,
                log_every=1, checkpoint_every=0, validate_every=0, num_validation_images=0, progress=False, lr=1e-3)
    base.update(overrides)
    return ConditionConfig(**base)


def losses(result) -> list[float]:
    return [r["loss"] for r in result.history]


def random_inputs(seed: int = 3, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([5, 700][:batch]),
            torch.randn(batch, 77, 32, generator=g), torch.rand(batch, 3, 64, 64, generator=g))


# ------------------------------------------------------------------------------ the zero start

def test_fresh_control_leaves_the_unet_output_exact():
    unet = random_pipeline("tiny", seed=0).unet
    control = ControlNet.from_unet(unet)
    x, t, context, hint = random_inputs()
    with torch.no_grad():
        plain = unet(x, t, context)
        for only_mid in (False, True):
            assert torch.equal(controlled_output(unet, control, x, t, context, hint, only_mid), plain)
        # ... and a trained (non-zero) control does change it: the residuals really arrive.
        torch.nn.init.normal_(control.middle_block_out[0].weight, std=0.1)
        assert not torch.equal(controlled_output(unet, control, x, t, context, hint), plain)


def test_one_step_moves_the_zero_convs_and_leaves_the_unet_bit_exact(demo_data, tmp_path):
    fresh = random_pipeline("tiny", seed=0)
    result = condition.main(tiny_config(demo_data, tmp_path / "run", steps=1))
    control = result.control
    for i, zero in enumerate(control.zero_convs):
        assert zero[0].weight.abs().sum() > 0, f"zero_convs.{i} did not move"
    assert control.middle_block_out[0].weight.abs().sum() > 0
    # The hint encoder's last conv gets no gradient yet (everything after it is still zero).
    assert not control.input_hint_block[-1].weight.any()
    tuned = result.model.unet.state_dict()
    for name, value in fresh.unet.state_dict().items():
        assert torch.equal(value, tuned[name]), name
    assert not any(p.requires_grad for p in result.model.unet.parameters())


def test_unlocked_sd_trains_only_the_decoder_half(demo_data, tmp_path):
    fresh = random_pipeline("tiny", seed=0).unet.state_dict()
    result = condition.main(tiny_config(demo_data, tmp_path / "run", steps=2, sd_locked=False, decoder_lr=1e-3))
    tuned = result.model.unet.state_dict()
    for name, value in fresh.items():
        assert torch.equal(value, tuned[name]) != name.startswith(("output_blocks.", "out.")), name
    # The checkpoint holds the decoder; the exported base is the tuned UNet.
    weights, _ = ckpt.load_checkpoint(result.checkpoint)
    assert {k for k in weights if k.startswith("unet.")} == {"unet." + k for k in condition.decoder_parameters(
        result.model.unet)}
    base = load_pipeline(result.exported["base"]).unet.state_dict()
    assert all(torch.equal(base[k], v) for k, v in tuned.items())
    record = read_condition_metadata(result.exported["control"])
    assert record["sd_locked"] is False and record["polarity"]  # estimated even without validation rounds


def test_only_mid_control_keeps_the_skip_residuals_at_zero(demo_data, tmp_path):
    result = condition.main(tiny_config(demo_data, tmp_path / "run", steps=2, only_mid_control=True))
    assert all(not zero[0].weight.any() and not zero[0].bias.any() for zero in result.control.zero_convs)
    assert result.control.middle_block_out[0].weight.abs().sum() > 0


# ------------------------------------------------------------------------------- training

def test_training_lowers_the_loss(demo_data, tmp_path):
    cfg = tiny_config(demo_data, tmp_path / "run", steps=20, batch_size=4, lr=3e-3, drop_prompt_rate=0.0,
                      log_every=5)
    history = losses(condition.main(cfg))
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5  # measured: about 1.10 -> 0.75
    assert last < 0.85 * first, (first, last)


def test_prompts_are_dropped_at_the_seeded_rate(demo_data, tmp_path, monkeypatch):
    contexts = []
    real = condition.controlled_output

    def recording(unet, control, x, t, context, hint, only_mid_control=False):
        contexts.append(context.detach().clone())
        return real(unet, control, x, t, context, hint, only_mid_control)

    monkeypatch.setattr(condition, "controlled_output", recording)
    rate, batch, accum, steps = 0.3, 2, 2, 10
    result = condition.main(tiny_config(demo_data, tmp_path / "run", steps=steps, batch_size=batch,
                                        grad_accum=accum, drop_prompt_rate=rate, lr=0.0))
    # The documented stream, written out here (not drop_prompts): one CPU generator seeded
    # (seed, "drop_prompt", rank); per micro-batch B uniform draws, row i dropped when u_i < rate.
    g = torch.Generator().manual_seed(derive_seed(0, "drop_prompt", 0))
    expected = [torch.rand(batch, generator=g) < rate for _ in range(steps * accum)]
    assert 0 < int(torch.stack(expected).sum()) < steps * batch * accum  # both kinds of row occur
    counted = sum(r["dropped_prompts"] for r in result.history) * batch * accum
    assert round(counted) == int(torch.stack(expected).sum())
    # Dropped rows carry the "" context, kept rows a prompt's.
    empty = random_pipeline("tiny", seed=0).encode_prompts([""])[0]
    for context, dropped in zip(contexts, expected):
        for row, is_dropped in zip(context, dropped):
            assert torch.equal(row, empty) == bool(is_dropped)


@pytest.mark.parametrize("rate", [0.5, 0.1])
def test_drop_prompts_rate_is_pinned_by_many_draws(rate):
    """The empirical rate of drop_prompts over 200,000 draws is within 0.004 of the rate (binomial
    sigma <= 0.0011 at 0.5: a 3.5-sigma bound; half or double the rate is off by >= 0.05), and the
    mask is exactly u < rate for the generator's uniforms."""
    n = 200_000
    mask = drop_prompts(n, rate, torch.Generator().manual_seed(7))
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert abs(mask.float().mean().item() - rate) < 0.004
    assert torch.equal(mask, torch.rand(n, generator=torch.Generator().manual_seed(7)) < rate)
    assert not drop_prompts(1000, 0.0, torch.Generator()).any() and drop_prompts(1000, 1.0, torch.Generator()).all()


def test_uncached_augmented_batches_train_like_the_cache(demo_data, tmp_path):
    cached = condition.main(tiny_config(demo_data, tmp_path / "cached", steps=2))
    fresh = condition.main(tiny_config(demo_data, tmp_path / "fresh", steps=2, cache_latents=False))
    # Same draws from the same generators; only the VAE's batch size differs (float rounding).
    assert losses(fresh) == pytest.approx(losses(cached), rel=1e-5)
    augmented = condition.main(tiny_config(demo_data, tmp_path / "flip", steps=1, hflip=True))
    assert augmented.history and not json.loads((tmp_path / "flip" / "config.json").read_text())["cache_latents"]


# --------------------------------------------------------------- hints, validation, export

def test_validation_rounds_do_not_change_training(demo_data, tmp_path):
    plain = condition.main(tiny_config(demo_data, tmp_path / "plain", steps=2, hflip=True))
    validated = condition.main(tiny_config(demo_data, tmp_path / "validated", steps=2, hflip=True, validate_every=1,
                                           num_validation_images=1, validation_sampler_steps=1))
    assert [r["step"] for r in validated.validation] == [0, 1, 2]
    assert validated.history == plain.history
    assert all(torch.equal(a, b) for a, b in zip(plain.control.state_dict().values(),
                                                 validated.control.state_dict().values()))


@pytest.mark.parametrize("cache_latents", [True, False])
def test_each_row_trains_on_its_own_items_latents_and_hint(demo_data, tmp_path, monkeypatch, cache_latents):
    """Row i of every training batch carries the VAE posterior and the hint of the same item, the
    one the data order picked for that row (from the cache, or loaded per batch): a latent of one
    image trained against another image's driver would teach the control nothing."""
    taken, means, hints = [], [], []
    real_take, real_latents, real_output = condition.IndexStream.take_for_rank, condition.sample_latents, \
        condition.controlled_output

    def take(self, per_rank, rank, world_size):
        taken.append(real_take(self, per_rank, rank, world_size))
        return taken[-1]

    def latents(mean, std, scale, generator):
        means.append(mean.detach().clone())
        return real_latents(mean, std, scale, generator)

    def output(unet, control, x, t, context, hint, only_mid_control=False):
        hints.append(hint.detach().clone())
        return real_output(unet, control, x, t, context, hint, only_mid_control)

    monkeypatch.setattr(condition.IndexStream, "take_for_rank", take)
    monkeypatch.setattr(condition, "sample_latents", latents)
    monkeypatch.setattr(condition, "controlled_output", output)
    result = condition.main(tiny_config(demo_data, tmp_path / "run", steps=3, batch_size=3,
                                        cache_latents=cache_latents))
    dataset = ConditionDataset(load_coco(demo_data / "annotations.json", progress=False), 64, return_masks=True)
    assert len(taken) == len(means) == len(hints) == 3
    assert len({tuple(t) for t in taken}) > 1  # the order moves, so a fixed row -> item map cannot pass
    with torch.no_grad():
        for indices, mean, hint in zip(taken, means, hints):
            for row, index in enumerate(indices):
                item = dataset[index]
                assert torch.equal(hint[row], item_hint(item, "driver")), (indices, row)
                own = result.model.vae.encode(item["image"][None]).mean[0]
                torch.testing.assert_close(mean[row], own, atol=1e-5, rtol=0)  # batched vs alone: rounding
    assert len({tuple(h.flatten().tolist()) for h in hints[0]}) == 3  # the rows' hints differ


def test_inpaint_hints_come_from_data_hints(demo_data):
    dataset = ConditionDataset(load_coco(demo_data / "annotations.json", progress=False), 64, return_masks=True)
    item = dataset[0]
    image, instances = tensor_to_image(item["image"]), item_instances(item)
    assert torch.equal(item_hint(item, "inpaint"), build_hint("inpaint", image, instances))
    assert torch.equal(item_hint(item, "driver"), build_hint("driver", image, instances))


def test_inpaint_run_validates_exports_and_generates_again(demo_data, tmp_path):
    """--condition inpaint, with validation rounds: adherence records, grids, curves; the exported
    control (both layouts) and base load back with identical outputs and drive sample.generate."""
    tuned = tmp_path / "tuned.safetensors"
    save_ldm(random_pipeline("tiny", seed=5), tuned)
    cfg = tiny_config(demo_data, tmp_path / "run", steps=2, random_weights=False, ckpt=str(tuned),
                      condition="inpaint", validate_every=1, num_validation_images=2, validation_sampler_steps=2, ema=True,
                      export_ema=True, validation_data=str(demo_data / "annotations.json"))
    result = condition.main(cfg)
    out = tmp_path / "run"

    assert [r["step"] for r in result.validation] == [0, 1, 2]
    for record in result.validation:
        assert 0.0 <= record["adherence"] <= 1.0 and 0.0 <= record["adherence_topology"] <= 1.0
        assert record["adherence_source"] == 1.0  # the demo's defects stand out: the ceiling is reachable
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "adherence" in r] == [0, 1, 2]
    grid = read_image(out / "validation" / "step_00000002.png")
    assert grid.shape[1] == 3 * 64 + 4 * 2  # driver | hint | sample columns (make_grid padding 2)
    assert read_image(out / "curves.png").shape[1] == 2 * 420

    # The base beside the control is the --ckpt file itself (the UNet stayed locked).
    assert filecmp.cmp(result.exported["base"], tuned, shallow=False)
    base = load_pipeline(result.exported["base"])
    dataset = ConditionDataset(load_coco(demo_data / "annotations.json", progress=False), 64, return_masks=True)
    polarity = {str(k): v for k, v in estimate_polarity(
        (tensor_to_image(it["image"]), item_instances(it)) for it in (dataset[i] for i in range(len(dataset)))).items()}
    x, t, context, hint = random_inputs()
    with torch.no_grad():
        expected = result.control(x, t, context, hint)
        assert any(r.abs().sum() > 0 for r in expected)
        for key in ("control", "control_diffusers"):
            loaded = load_control(result.exported[key], unet=base.unet)
            got = loaded(x, t, context, hint)
            assert all(torch.equal(a, b) for a, b in zip(expected, got)), key
            record = read_condition_metadata(result.exported[key])
            assert record["condition"] == "inpaint" and record["steps"] == 2
            assert record["polarity"] == polarity
    ema_control = load_control(result.exported["control_ema"], unet=base.unet)
    assert not torch.equal(ema_control.middle_block_out[0].weight, result.control.middle_block_out[0].weight)

    # The generation CLI loads the pair back and draws from a hint.
    hint_path = tmp_path / "hint.png"
    write_image_atomic(hint_path, tensor_to_image(item_hint(dataset[0], "inpaint") * 2 - 1))
    from sample import generate as generate_cli
    generated = generate_cli.main(generate_cli.GenerateConfig(
        ckpt=str(result.exported["base"]), control=str(result.exported["control"]), hint=str(hint_path),
        prompt="an image of a sks with a crack", num=1, steps=2, out=str(tmp_path / "gen"), device="cpu",
        progress=False))
    assert read_image(generated.images[0]).shape == (64, 64, 3)


# ------------------------------------------------------------------------ resume and failures

def test_resume_after_sigterm_is_bit_exact(demo_data, tmp_path, monkeypatch):
    """4 steps straight == 2 steps, SIGTERM (save and exit), --resume latest, 2 more steps; with
    augmentation (global RNG), gradient accumulation, EMA, warmup + cosine and prompt dropping."""
    options = dict(steps=4, grad_accum=2, ema=True, ema_decay=0.9, export_ema=True, lr_warmup_steps=2,
                   lr_schedule="cosine", hflip=True)
    straight = condition.main(tiny_config(demo_data, tmp_path / "straight", **options))

    calls = {"n": 0}
    real_step = condition.optimizer_step

    def step_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run, like a scheduler's preemption
        return real_step(*args, **kwargs)

    monkeypatch.setattr(condition, "optimizer_step", step_then_signal)
    first = condition.main(tiny_config(demo_data, tmp_path / "split", **options))
    monkeypatch.undo()
    assert first.stopped and first.step == 2 and not first.exported
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "split" / "checkpoints")] == ["step_00000002"]

    second = condition.main(tiny_config(demo_data, tmp_path / "split", resume="latest", **options))
    assert [r["step"] for r in second.history] == [3, 4]
    assert first.history + second.history == straight.history  # losses and prompt drops
    for (name, a), b in zip(straight.control.state_dict().items(), second.control.state_dict().values()):
        assert torch.equal(a, b), name
    ema_a = load_control(straight.exported["control_ema"]).state_dict()
    ema_b = load_control(second.exported["control_ema"]).state_dict()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_resume_refuses_a_different_training_config(demo_data, tmp_path):
    condition.main(tiny_config(demo_data, tmp_path / "run", steps=1))
    with pytest.raises(ValueError, match=r"drop_prompt_rate: 0.5 -> 0.1"):
        condition.main(tiny_config(demo_data, tmp_path / "run", steps=2, resume="latest", drop_prompt_rate=0.1))


def test_non_finite_loss_stops_with_the_step(demo_data, tmp_path, monkeypatch):
    real_noise, calls = condition.sample_noise, {"n": 0}

    def noise_that_breaks(like, generator):
        calls["n"] += 1
        out = real_noise(like, generator)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(condition, "sample_noise", noise_that_breaks)
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 3: loss=nan"):
        condition.main(tiny_config(demo_data, tmp_path / "run", steps=5, checkpoint_every=1))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "step_00000002"


def test_config_errors_name_the_flag(demo_data, tmp_path):
    with pytest.raises(ValueError, match="--drop-prompt-rate"):
        condition.main(tiny_config(demo_data, tmp_path / "a", drop_prompt_rate=1.5))
    with pytest.raises(ValueError, match="--condition"):
        condition.main(tiny_config(demo_data, tmp_path / "b", condition="canny"))
    with pytest.raises(ValueError, match="--ckpt"):
        condition.main(tiny_config(demo_data, tmp_path / "c", random_weights=False))


def test_cli_parses_every_config_field():
    parser = condition.get_args_parser()
    args = parser.parse_args(["--ckpt", "tuned.safetensors", "--data", "d", "--out", "o", "--condition", "inpaint",
                              "--no-sd-locked", "--only-mid-control", "--drop-prompt-rate", "0.25",
                              "--decoder-lr", "2e-6"])
    cfg = condition.config_from_args(ConditionConfig, args)
    assert (cfg.condition, cfg.sd_locked, cfg.only_mid_control, cfg.drop_prompt_rate, cfg.decoder_lr, cfg.lr) == \
        ("inpaint", False, True, 0.25, 2e-6, 1e-5)
    assert {f.name for f in dataclasses.fields(ConditionConfig)} <= {a.dest for a in parser._actions}


# ---------------------------------------------------------------------------------- DDP

DDP_DRIVER = """
import os, sys, torch
sys.path.insert(0, {root!r})
from safetensors.torch import save_file
import train.condition as condition
cfg = condition.ConditionConfig(**{cfg!r})
result = condition.main(cfg)
rank = int(os.environ["RANK"])
save_file({{k: v.contiguous() for k, v in result.control.state_dict().items()}},
          os.path.join(cfg.out, f"rank{{rank}}_control.safetensors"))
with open(os.path.join(cfg.out, f"rank{{rank}}_history.txt"), "w") as f:
    f.write(repr(result.history))
"""


@pytest.mark.slow
def test_two_process_cpu_ddp_keeps_replicas_identical(demo_data, tmp_path):
    cfg = dataclasses.asdict(tiny_config(demo_data, tmp_path / "run", steps=3, checkpoint_every=2, device="cpu",
                                         grad_accum=2, batch_size=1, only_mid_control=True))
    script = tmp_path / "driver.py"
    script.write_text(DDP_DRIVER.format(root=str(ROOT), cfg=cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file
    ranks = [load_file(str(tmp_path / "run" / f"rank{r}_control.safetensors")) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert ranks[0]["middle_block_out.0.weight"].abs().sum() > 0  # ... and training moved them
    history = (tmp_path / "run" / "rank0_history.txt").read_text()
    assert history == (tmp_path / "run" / "rank1_history.txt").read_text()
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["generators"]["prompt"], state["rng"][1]["generators"]["prompt"])



def test_cli_exit_status_says_whether_the_run_finished(monkeypatch, tmp_path):
    """A stopped run (SIGINT/SIGTERM, checkpoint saved) exits 1 so job wrappers can tell it apart."""
    for stopped, status in ((True, 1), (False, 0)):
        monkeypatch.setattr(condition, "main", lambda cfg, stopped=stopped: types.SimpleNamespace(stopped=stopped))
        assert condition.cli(["--out", str(tmp_path), "--random-weights", "--preset", "tiny"]) == status

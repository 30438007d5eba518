"""train/concept.py on the tiny preset (CPU): losses, overfitting, bit-exact resume, the prior
term, class-image generation, export round trip, non-finite stop, interrupted saves, DDP."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import types
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train.concept as concept
from data.datasets import ConceptDataset
from data.images import read_image
from data.seeding import derive_seed
from model.stable_diffusion import StableDiffusion, preset
from train import checkpoint as ckpt
from train.concept import ConceptConfig, dreambooth_loss
from train.data_order import IndexStream
from train.diffusion import encode_posterior, sample_latents, sample_noise, sample_timesteps
from train.monitor import NonFiniteLossError
from weights.load import load_pipeline

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory) -> Path:
    """Class images shared by the tests (drawn once by the first run that needs them)."""
    return tmp_path_factory.mktemp("class_images")


def tiny_config(data: Path, out: Path, class_images: Path | None = None, **overrides) -> ConceptConfig:
    base = dict(preset="tiny", random_weights=True, data=str(data), out=str(out), steps=4, batch_size=2,
                num_class_images=2, class_steps=2, class_dir=str(class_images or ""), log_every=1,
                checkpoint_every=0, validate_every=0, num_validation_images=0, progress=False, lr=1e-4)
    base.update(overrides)
    return ConceptConfig(**base)


def losses(result) -> list[float]:
    return [r["loss"] for r in result.history]


# ------------------------------------------------------------------------------ loss maths

def test_dreambooth_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    loss, terms = dreambooth_loss(pred, target, num_instance=2, prior_loss_weight=0.3)
    instance = ((pred[:2] - target[:2]) ** 2).sum() / pred[:2].numel()
    prior = ((pred[2:] - target[2:]) ** 2).sum() / pred[2:].numel()
    torch.testing.assert_close(terms, torch.stack([instance + 0.3 * prior, instance, prior]))
    torch.testing.assert_close(loss, instance + 0.3 * prior)
    loss, terms = dreambooth_loss(pred[:2], target[:2], num_instance=2, prior_loss_weight=None)
    torch.testing.assert_close(loss, instance)
    assert terms[2] == 0


def test_zero_prior_weight_gradient_equals_instance_only_training():
    torch.manual_seed(0)
    unet = StableDiffusion(preset("tiny")).unet
    torch.nn.init.normal_(unet.out[2].weight, std=0.02)  # non-zero output so every layer gets gradient
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t, context = torch.tensor([10, 500, 20, 900]), torch.randn(4, 77, 32, generator=g)

    loss, _ = dreambooth_loss(unet(x, t, context), target, num_instance=2, prior_loss_weight=0.0)
    with_prior = torch.autograd.grad(loss, list(unet.parameters()))
    instance_only = torch.autograd.grad(F.mse_loss(unet(x[:2], t[:2], context[:2]), target[:2]),
                                        list(unet.parameters()))
    for a, b in zip(with_prior, instance_only):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # ... and a non-zero weight does change it (the class half is really in the batch).
    loss, _ = dreambooth_loss(unet(x, t, context), target, num_instance=2, prior_loss_weight=1.0)
    assert not torch.allclose(torch.autograd.grad(loss, unet.out[2].weight)[0], instance_only[-2])


# --------------------------------------------------------------------------- training runs

def test_few_steps_finite_and_logged_terms_match_hand_computation(demo_data, class_dir, tmp_path):
    cfg = tiny_config(demo_data, tmp_path / "run", class_dir, steps=2, prior_loss_weight=0.5, lr=0.0,
                      max_grad_norm=0.0)
    result = concept.main(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert all(map(torch.isfinite, torch.tensor([r["loss"], r["instance_loss"], r["prior_loss"]])))
        assert r["loss"] == pytest.approx(r["instance_loss"] + 0.5 * r["prior_loss"], rel=1e-6)

    # Recompute step 1 by hand from the documented seeds: same base weights, data order, noise.
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = StableDiffusion(preset("tiny"))
    instance = ConceptDataset([str(p) for p in sorted((demo_data / "images").glob("*.png"))], 64)
    classes = ConceptDataset([str(class_dir / f"{i:06d}.png") for i in range(2)], 64)
    inst_idx = IndexStream(4, derive_seed(cfg.seed, "instance_order")).take(2)
    class_idx = IndexStream(2, derive_seed(cfg.seed, "class_order")).take(2)
    images = torch.stack([instance[i]["image"] for i in inst_idx] + [classes[i]["image"] for i in class_idx])
    with torch.no_grad():
        mean, std = encode_posterior(model.vae, images)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "noise", 0))
        z0 = sample_latents(mean, std, 0.18215, gen)
        noise = sample_noise(z0, gen)
        t = sample_timesteps(4, gen)
        tokens = model.tokenizer(["an image of a sks", "an image of a metal surface"])
        prompts = model.text_encoder(tokens)
        context = torch.cat([prompts[0:1].expand(2, -1, -1), prompts[1:2].expand(2, -1, -1)])
        pred = model.unet(model.schedule.q_sample(z0, t, noise), t, context)
    instance_loss = F.mse_loss(pred[:2], noise[:2]).item()
    prior_loss = F.mse_loss(pred[2:], noise[2:]).item()
    assert records[0]["instance_loss"] == pytest.approx(instance_loss, rel=1e-5)
    assert records[0]["prior_loss"] == pytest.approx(prior_loss, rel=1e-5)
    assert losses(result) == [r["loss"] for r in records]


def test_overfitting_four_images_drives_the_loss_down(demo_data, tmp_path):
    cfg = tiny_config(demo_data, tmp_path / "run", with_prior=False, steps=25, batch_size=4, lr=3e-3,
                      log_every=5)
    history = losses(concept.main(cfg))
    assert all(map(lambda v: v == v and abs(v) < 1e3, history))
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5  # measured: about 0.83 -> 0.3
    assert last < 0.6 * first, (first, last)


def test_resume_after_sigterm_is_bit_exact(demo_data, class_dir, tmp_path, monkeypatch):
    """4 steps straight == 2 steps, SIGTERM (save and exit), --resume latest, 2 more steps."""
    options = dict(steps=4, grad_accum=2, ema=True, ema_decay=0.9, export_ema=True, lr_warmup_steps=2, lr_schedule="cosine")
    straight = concept.main(tiny_config(demo_data, tmp_path / "straight", class_dir, **options))

    calls = {"n": 0}
    real_step = concept.optimizer_step

    def step_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run, like a scheduler's preemption
        return real_step(*args, **kwargs)

    monkeypatch.setattr(concept, "optimizer_step", step_then_signal)
    first = concept.main(tiny_config(demo_data, tmp_path / "split", class_dir, **options))
    monkeypatch.undo()
    assert first.stopped and first.step == 2 and not first.exported
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "split" / "checkpoints")] == ["step_00000002"]

    second = concept.main(tiny_config(demo_data, tmp_path / "split", class_dir, resume="latest", **options))
    assert [r["step"] for r in second.history] == [3, 4]
    assert losses(first) + losses(second) == losses(straight)
    for (name, a), b in zip(straight.model.unet.state_dict().items(), second.model.unet.state_dict().values()):
        assert torch.equal(a, b), name
    ema_a = load_pipeline(straight.exported["ldm_ema"]).unet.state_dict()
    ema_b = load_pipeline(second.exported["ldm_ema"]).unet.state_dict()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_caching_latents_and_prompts_does_not_change_training(demo_data, class_dir, tmp_path):
    cached = concept.main(tiny_config(demo_data, tmp_path / "cached", class_dir, steps=2))
    fresh = concept.main(tiny_config(demo_data, tmp_path / "fresh", class_dir, steps=2, cache_latents=False,
                                     cache_text_embeddings=False))
    # Same draws from the same generator; only the VAE's batch size differs (float rounding).
    assert losses(fresh) == pytest.approx(losses(cached), rel=1e-5)


def test_resume_refuses_a_different_training_config(demo_data, class_dir, tmp_path):
    concept.main(tiny_config(demo_data, tmp_path / "run", class_dir, steps=1))
    with pytest.raises(ValueError, match=r"prior_loss_weight: 1.0 -> 0.5"):
        concept.main(tiny_config(demo_data, tmp_path / "run", class_dir, steps=2, resume="latest",
                                 prior_loss_weight=0.5))


def test_class_images_are_resumable(demo_data, tmp_path, monkeypatch):
    folder = tmp_path / "classes"
    cfg = tiny_config(demo_data, tmp_path / "run", folder, num_class_images=3, class_batch_size=2)
    model = StableDiffusion(preset("tiny"))
    cfg = concept.resolve_config(cfg, model, torch.device("cpu"))
    info = concept.DistInfo()
    paths = concept.generate_class_images(model.unet, model.vae, model.text_encoder, model, cfg, info)
    assert [p.name for p in paths] == ["000000.png", "000001.png", "000002.png"]
    original = read_image(paths[1]).astype(int)
    paths[1].unlink()

    written = []
    real_write = concept.write_image_atomic
    monkeypatch.setattr(concept, "write_image_atomic", lambda p, im: (written.append(Path(p).name), real_write(p, im)))
    concept.generate_class_images(model.unet, model.vae, model.text_encoder, model, cfg, info)
    assert written == ["000001.png"]
    # Image i depends on (seed, i) alone; drawn in a batch of 2 first and alone now, float
    # rounding of the batched kernels may move a pixel by one 8-bit level.
    assert abs(read_image(paths[1]).astype(int) - original).max() <= 1
    concept.generate_class_images(model.unet, model.vae, model.text_encoder, model, cfg, info)
    assert written == ["000001.png"]


def test_export_loads_back_identically_and_trains_from_our_file(demo_data, class_dir, tmp_path):
    result = concept.main(tiny_config(demo_data, tmp_path / "run", class_dir, steps=2, save_diffusers=True,
                                      num_validation_images=2, validation_sampler_steps=2, train_text_encoder=True,
                                      lr=1e-3))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = StableDiffusion(preset("tiny"))
    tuned_text = result.model.text_encoder.state_dict()
    assert not all(torch.equal(v, tuned_text[k]) for k, v in base.text_encoder.state_dict().items())
    assert (tmp_path / "run" / "samples" / "step_00000002.png").is_file()
    tuned = result.model
    g = torch.Generator().manual_seed(3)
    x, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 700]), torch.randn(2, 77, 32, generator=g)
    tokens = tuned.tokenizer(["an image of a sks", ""])
    with torch.no_grad():
        expected = tuned.unet(x, t, context), tuned.text_encoder(tokens), tuned.vae.decode(x)
        for path in (result.exported["ldm"], result.exported["diffusers"]):
            loaded = load_pipeline(path)
            got = loaded.unet(x, t, context), loaded.text_encoder(tokens), loaded.vae.decode(x)
            for a, b in zip(expected, got):
                assert torch.equal(a, b), path
    # The tuned file is a valid --ckpt for the next run (the end-to-end demo's path).
    again = concept.main(tiny_config(demo_data, tmp_path / "again", class_dir, steps=1, random_weights=False,
                                     ckpt=str(result.exported["ldm"])))
    assert len(again.history) == 1 and (tmp_path / "again" / "concept.safetensors").is_file()


# ------------------------------------------------------------------------------ failures

def test_non_finite_loss_stops_with_the_step(demo_data, class_dir, tmp_path, monkeypatch):
    real_noise, calls = concept.sample_noise, {"n": 0}

    def noise_that_breaks(like, generator):
        calls["n"] += 1
        out = real_noise(like, generator)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(concept, "sample_noise", noise_that_breaks)
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 3: loss=nan, instance_loss=nan, prior_loss=nan"):
        concept.main(tiny_config(demo_data, tmp_path / "run", class_dir, steps=5, checkpoint_every=1))
    # Steps 1 and 2 were saved; nothing of step 3 was.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "step_00000002"


def test_interrupted_save_is_not_resumed(demo_data, class_dir, tmp_path, monkeypatch):
    real_save, calls = ckpt.torch.save, {"n": 0}

    def save_that_dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while writing the second checkpoint
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_that_dies)
    options = dict(steps=2, checkpoint_every=1, train_text_encoder=True)  # text encoder state resumes too
    with pytest.raises(KeyboardInterrupt):
        concept.main(tiny_config(demo_data, tmp_path / "run", class_dir, **options))
    monkeypatch.undo()
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.resolve_resume(root, "latest").name == "step_00000001"
    resumed = concept.main(tiny_config(demo_data, tmp_path / "run", class_dir, resume="latest", **options))
    assert [r["step"] for r in resumed.history] == [2]
    weights, _ = ckpt.load_checkpoint(root / "step_00000002")
    assert any(k.startswith("text_encoder.") for k in weights)


def test_identifier_must_be_one_token(demo_data, tmp_path):
    with pytest.raises(ValueError, match="is 3 tokens"):
        concept.main(tiny_config(demo_data, tmp_path / "run", identifier="xqz"))


def test_cli_parses_every_config_field(tmp_path):
    parser = concept.get_args_parser()
    args = parser.parse_args(["--data", "d", "--out", "o", "--steps", "3", "--lr", "1e-5",
                              "--train-text-encoder", "--no-with-prior", "--precision", "bf16"])
    cfg = concept.config_from_args(ConceptConfig, args)
    assert (cfg.steps, cfg.lr, cfg.train_text_encoder, cfg.with_prior, cfg.precision) == (3, 1e-5, True, False, "bf16")
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(ConceptConfig)} <= flags


# ---------------------------------------------------------------------------------- DDP

DDP_DRIVER = """
import os, sys, torch
sys.path.insert(0, {root!r})
from safetensors.torch import save_file
import train.concept as concept
cfg = concept.ConceptConfig(**{cfg!r})
result = concept.main(cfg)
rank = int(os.environ["RANK"])
save_file({{k: v.contiguous() for k, v in result.model.unet.state_dict().items()}},
          os.path.join(cfg.out, f"rank{{rank}}_unet.safetensors"))
with open(os.path.join(cfg.out, f"rank{{rank}}_losses.txt"), "w") as f:
    f.write(repr([r["loss"] for r in result.history]))
"""


@pytest.mark.slow
def test_two_process_cpu_ddp_keeps_replicas_identical(demo_data, class_dir, tmp_path):
    cfg = dataclasses.asdict(tiny_config(demo_data, tmp_path / "run", class_dir, steps=3, checkpoint_every=2,
                                         device="cpu", grad_accum=2, batch_size=1, lr=1e-3))
    script = tmp_path / "driver.py"
    script.write_text(DDP_DRIVER.format(root=str(ROOT), cfg=cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file
    ranks = [load_file(str(tmp_path / "run" / f"rank{r}_unet.safetensors")) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = StableDiffusion(preset("tiny")).unet.state_dict()
    assert not all(torch.equal(base[k], ranks[0][k]) for k in base)  # ... and training moved them
    assert (tmp_path / "run" / "rank0_losses.txt").read_text() == (tmp_path / "run" / "rank1_losses.txt").read_text()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000002",
                                                                                         "step_00000003"]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["generators"]["noise"], state["rng"][1]["generators"]["noise"])



def test_cli_exit_status_says_whether_the_run_finished(monkeypatch, tmp_path):
    """A stopped run (SIGINT/SIGTERM, checkpoint saved) exits 1 so job wrappers can tell it apart."""
    for stopped, status in ((True, 1), (False, 0)):
        monkeypatch.setattr(concept, "main", lambda cfg, stopped=stopped: types.SimpleNamespace(stopped=stopped))
        assert concept.cli(["--out", str(tmp_path), "--random-weights", "--preset", "tiny"]) == status

"""The shared training helpers (train/*.py) on a toy module: optimizer step, lr schedule, EMA,
mixed precision, data order, checkpoints, resume, metrics log, guards."""
from __future__ import annotations

import json
import math
import os
import random
import signal
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from train import checkpoint as ckpt
from train.data_order import IndexStream
from train.ema import EMA
from train.monitor import MetricsLog, NonFiniteLossError, StopSignal, check_finite, save_image_grid
from train.optim import build_adamw, lr_multiplier, optimizer_step, param_group
from train.precision import autocast, cast_frozen, frozen_copy, make_grad_scaler


@dataclass(frozen=True)
class ToyConfig:
    lr: float = 1e-2
    steps: int = 6


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 1))


def toy_data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


# ------------------------------------------------------------------------------- lr / optimizer

def test_lr_multiplier_warmup_constant_cosine():
    assert lr_multiplier(0, 4, 100) == pytest.approx(0.25)
    assert lr_multiplier(3, 4, 100) == 1.0
    assert lr_multiplier(50, 4, 100, "constant") == 1.0
    assert lr_multiplier(4, 4, 100, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(52, 4, 100, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(100, 4, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(0, 0, 10) == 1.0
    with pytest.raises(ValueError, match="lr schedule"):
        lr_multiplier(0, 0, 10, "linear")


def test_param_groups_keep_their_own_lr():
    model = toy_model()
    groups = [param_group("first", model[0].parameters(), lr=1e-3),
              param_group("last", model[2].parameters(), lr=2e-4)]
    optimizer = build_adamw(groups)
    model(torch.randn(2, 4)).sum().backward()
    optimizer_step(optimizer, make_grad_scaler("fp32", torch.device("cpu")), list(model.parameters()),
                   lr_scale=0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(5e-4), pytest.approx(1e-4)]
    assert [g["name"] for g in optimizer.param_groups] == ["first", "last"]
    with pytest.raises(ValueError, match="no trainable"):
        param_group("empty", [nn.Parameter(torch.zeros(1), requires_grad=False)], lr=1.0)


def test_optimizer_step_clips_and_zeroes_and_returns_preclip_norm():
    p = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param_group("p", [p], lr=1.0)], lr=1.0)
    p.grad = torch.tensor([3.0, 4.0])  # norm 5
    norm = optimizer_step(optimizer, make_grad_scaler("fp32", torch.device("cpu")), [p], max_grad_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.6, -0.8]))  # SGD step of the clipped grad
    assert p.grad is None
    p.grad = torch.tensor([3.0, 4.0])
    optimizer_step(optimizer, make_grad_scaler("fp32", torch.device("cpu")), [p], max_grad_norm=None)
    torch.testing.assert_close(p.detach(), torch.tensor([-3.6, -4.8]))  # not clipped


def test_gradient_accumulation_equals_one_big_batch():
    x, y = toy_data(8)
    full, accum = toy_model(), toy_model()
    nn.functional.mse_loss(full(x), y).backward()
    for micro in range(4):  # 4 micro-batches of 2, each loss divided by the accumulation count
        sl = slice(2 * micro, 2 * micro + 2)
        (nn.functional.mse_loss(accum(x[sl]), y[sl]) / 4).backward()
    for a, b in zip(full.parameters(), accum.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_fused_adamw_matches_foreach():
    x, y = toy_data()
    models = [toy_model(), toy_model()]
    opts = [build_adamw([param_group("m", models[0].parameters(), lr=1e-2)]),
            torch.optim.AdamW([param_group("m", models[1].parameters(), lr=1e-2)], weight_decay=1e-2,
                              foreach=True)]
    assert opts[0].defaults.get("fused") is True
    scaler = make_grad_scaler("fp32", torch.device("cpu"))
    for _ in range(3):
        for model, opt in zip(models, opts):
            nn.functional.mse_loss(model(x), y).backward()
            optimizer_step(opt, scaler, list(model.parameters()), max_grad_norm=1.0)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ EMA

def test_ema_update_maths_and_applied_restores():
    p = nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([p])  # warmup decay min(0.5, 1/10) = 0.1 -> 0.9 * 1
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 0.9))
    ema.update([p])  # min(0.5, 2/11)
    expected = 0.9 * (2 / 11) + 1.0 * (9 / 11)
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), expected))
    with ema.applied([p]):
        torch.testing.assert_close(p.detach(), torch.full((3,), expected))
    torch.testing.assert_close(p.detach(), torch.ones(3))
    other = EMA([nn.Parameter(torch.zeros(3))], decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 2 and other.decay == 0.5
    torch.testing.assert_close(other.shadow[0], ema.shadow[0])


# ----------------------------------------------------------------------------- mixed precision

def test_precision_helpers():
    cpu = torch.device("cpu")
    assert not make_grad_scaler("bf16", cpu).is_enabled()
    assert make_grad_scaler("fp16", cpu).is_enabled()
    with autocast(cpu, "bf16"):
        out = nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    frozen = cast_frozen(nn.Linear(4, 4), "bf16")
    assert not frozen.training and all(not p.requires_grad and p.dtype == torch.bfloat16
                                       for p in frozen.parameters())
    with pytest.raises(ValueError, match="precision"):
        make_grad_scaler("fp8", cpu)
    original = nn.Linear(4, 4)
    low = frozen_copy(original, torch.bfloat16, cpu)
    assert low is not original and original.weight.dtype == torch.float32 and original.weight.requires_grad
    assert low.weight.dtype == torch.bfloat16 and not low.weight.requires_grad
    assert frozen_copy(original, torch.float32, cpu) is original and not original.weight.requires_grad


# ----------------------------------------------------------------------------------- data order

def test_index_stream_epochs_and_resume():
    stream = IndexStream(5, seed=3)
    first = stream.take(5)
    assert sorted(first) == list(range(5))
    second = stream.take(3)
    state = stream.state_dict()
    rest = stream.take(9)
    resumed = IndexStream(5, seed=123)  # the seed is irrelevant once the state is loaded
    resumed.load_state_dict(state)
    assert resumed.take(9) == rest
    assert sorted(second + rest[:2]) == list(range(5))  # epoch 1 is a permutation too
    with pytest.raises(ValueError, match="dataset of 5"):
        IndexStream(6, seed=0).load_state_dict(state)


def test_index_stream_ranks_take_disjoint_slices():
    streams = [IndexStream(8, seed=0) for _ in range(2)]
    a, b = (s.take_for_rank(2, rank, 2) for rank, s in enumerate(streams))
    assert len(set(a) | set(b)) == 4
    assert streams[0].state_dict()["position"] == streams[1].state_dict()["position"] == 4


# ---------------------------------------------------------------------------------- checkpoints

def test_rng_state_round_trip(tmp_path):
    g = torch.Generator().manual_seed(7)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.capture_rng_state({"noise": g})
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9), g.manual_seed(9)
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), {"noise": g})
    got = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    assert got == expected
    with pytest.raises(KeyError, match="timesteps"):
        ckpt.restore_rng_state(state, {"timesteps": g})


def _save(root, step, keep_last=0):
    weights = {"toy.weight": torch.full((2, 2), float(step))}
    state = {"step": step, "rng": ckpt.capture_rng_state()}
    return ckpt.save_checkpoint(root, step, weights, state, ToyConfig(), keep_last=keep_last)


def test_checkpoint_round_trip_keep_last_and_latest(tmp_path):
    for step in (2, 4, 6):
        folder = _save(tmp_path, step, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    assert sorted(os.listdir(folder)) == ["COMPLETE", "config.json", "state.pt", "weights.safetensors"]
    assert json.loads((folder / "config.json").read_text()) == {"lr": 1e-2, "steps": 6}
    assert ckpt.resolve_resume(tmp_path, "latest") == folder
    assert ckpt.resolve_resume(tmp_path, "") is None
    assert ckpt.resolve_resume(tmp_path / "nothing-yet", "latest") is None
    weights, state = ckpt.load_checkpoint(folder)
    assert state["step"] == 6
    torch.testing.assert_close(weights["toy.weight"], torch.full((2, 2), 6.0))


def test_interrupted_save_is_never_resumed(tmp_path, monkeypatch):
    _save(tmp_path, 2)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    # Crash while writing the state file: only the hidden temporary folder exists.
    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 4)
    monkeypatch.undo()
    assert (tmp_path / ".step_00000004.tmp").is_dir()
    assert ckpt.resolve_resume(tmp_path, "latest").name == "step_00000002"

    # A step folder without its marker (or with a truncated file) is not complete either.
    broken = _save(tmp_path, 6)
    (broken / "COMPLETE").unlink()
    assert ckpt.resolve_resume(tmp_path, "latest").name == "step_00000002"
    truncated = _save(tmp_path, 8)
    with open(truncated / "state.pt", "r+b") as f:
        f.truncate(10)
    assert ckpt.resolve_resume(tmp_path, "latest").name == "step_00000002"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(truncated))
    _save(tmp_path, 10)  # the next save removes the stale temporary folder
    assert not (tmp_path / ".step_00000004.tmp").exists()


def test_toy_loop_resume_is_bit_exact(tmp_path):
    """The loop shape the trainers use: seeded data order + noise generator, AdamW, EMA,
    checkpoint at the midpoint; a resumed run reproduces the straight run exactly."""
    x, y = toy_data()

    def run(stop_at, resume_from=None, save_at=None, steps=8):
        model = toy_model()
        params = list(model.parameters())
        optimizer = build_adamw([param_group("toy", params, lr=1e-2)])
        scaler = make_grad_scaler("fp32", torch.device("cpu"))
        ema = EMA(params, decay=0.9)
        order, noise_gen = IndexStream(len(x), seed=0), torch.Generator().manual_seed(1)
        start, losses = 0, []
        if resume_from is not None:
            weights, state = ckpt.load_checkpoint(resume_from)
            model.load_state_dict(weights)
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            ema.load_state_dict(state["ema"])
            order.load_state_dict(state["data"])
            ckpt.restore_rng_state(state["rng"], {"noise": noise_gen})
            start = state["step"]
        for step in range(start, stop_at):
            idx = order.take(3)
            noisy = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=noise_gen)
            loss = nn.functional.mse_loss(model(noisy), y[idx])
            loss.backward()
            optimizer_step(optimizer, scaler, params, 1.0, ema, lr_multiplier(step, 2, steps, "cosine"))
            losses.append(loss.item())
            if step + 1 == save_at:
                state = {"step": step + 1, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "ema": ema.state_dict(), "data": order.state_dict(),
                         "rng": ckpt.capture_rng_state({"noise": noise_gen})}
                ckpt.save_checkpoint(tmp_path, step + 1, model.state_dict(), state, ToyConfig())
        return losses, model, ema

    straight_losses, straight, straight_ema = run(8)
    first_losses, _, _ = run(4, save_at=4)
    second_losses, resumed, resumed_ema = run(8, resume_from=ckpt.resolve_resume(tmp_path, "latest"))
    assert first_losses + second_losses == straight_losses
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight_ema.shadow, resumed_ema.shadow):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------- guards

def test_check_finite_names_step_and_terms():
    check_finite(3, {"loss": 1.0, "prior": 0.5})
    with pytest.raises(NonFiniteLossError, match=r"step 7: loss=nan, instance=nan, prior=0.5"):
        check_finite(7, {"loss": math.nan, "instance": math.nan, "prior": 0.5})


def test_stop_signal_turns_sigterm_into_a_request():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_metrics_log_drops_records_after_the_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": step / 10})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')  # a crash mid-line
    log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "loss": 0.0})
    log.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_save_image_grid_writes_png(tmp_path):
    images = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
    path = save_image_grid(images, tmp_path / "grid.png")
    from torchvision.io import decode_png, read_file
    grid = decode_png(read_file(str(path)))
    assert grid.shape == (3, 2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    assert not (tmp_path / "grid.png.tmp").exists()

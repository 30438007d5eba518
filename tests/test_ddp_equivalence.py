"""DDP does what a user scaling out relies on: 2 processes x batch B make the same optimizer updates
as 1 process x batch 2B (gradient averaging over the global batch, the learning rate, each rank its
own slice of the data), for train.concept (with the prior term) and train.condition, on the CPU
with gloo. Both runs start with torchrun's --standalone rendezvous (a free port, nothing fixed).

Making the two runs comparable: the trainers draw z0, eps and t from per-rank generators, so the
noise of a row depends on the world size. The driver script replaces the three draws with
functions of the row's place in the GLOBAL batch (a fixed tensor per call, rank r taking its rows),
so both runs see the same example, noise and timestep on every row; everything else is the
trainers' own code. AdamW's epsilon is set to 1, which makes its update ~ lr * gradient instead of
~ lr * sign(gradient): with the default 1e-8 a doubled gradient (summed instead of averaged over
ranks) would move the weights exactly as much, and this test could not see it. No clipping (a
clipped norm would hide a scale too).

Tolerance: the largest difference between the two runs' updates must be below 1e-4 of the largest
update. The runs differ only in summation order (gloo's all-reduce vs one batch), ~1e-6 relative;
a gradient summed over ranks, a learning rate scaled by the world size or two ranks on the same
rows are off by order 1.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

DRIVER = """
import os, sys, torch
sys.path.insert(0, {root!r})
from safetensors.torch import save_file
import train.{trainer} as trainer

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
HALVES = {halves}  # row groups per batch: concept with prior = (instance rows, class rows)
calls = {{}}


def global_rows(name, shape, make):
    # This rank's rows of a global tensor that depends only on (draw, call number), never on the rank.
    k = calls[name] = calls.get(name, -1) + 1
    per_half = shape[0] // HALVES
    g = torch.Generator().manual_seed(1000 * len(name) + k)
    full = make((HALVES * per_half * WORLD, *shape[1:]), g)
    rows = [h * per_half * WORLD + RANK * per_half + i for h in range(HALVES) for i in range(per_half)]
    return full[torch.tensor(rows)]


def sample_latents(mean, std, scale, generator):
    n = global_rows("latents", tuple(mean.shape), lambda s, g: torch.randn(s, generator=g))
    return (mean + std * n) * scale


def sample_noise(like, generator):
    return global_rows("noise", tuple(like.shape), lambda s, g: torch.randn(s, generator=g))


def sample_timesteps(batch, generator, num_train_timesteps=1000):
    return global_rows("timesteps", (batch,), lambda s, g: torch.randint(0, num_train_timesteps, s, generator=g))


trainer.sample_latents, trainer.sample_noise, trainer.sample_timesteps = sample_latents, sample_noise, sample_timesteps
snapshots = {{}}
real_step = trainer.optimizer_step


def recording_step(optimizer, scaler, params, *args, **kwargs):
    if "before" not in snapshots:
        snapshots["before"] = [p.detach().clone() for p in params]
    out = real_step(optimizer, scaler, params, *args, **kwargs)
    snapshots["after"] = [p.detach().clone() for p in params]
    return out


trainer.optimizer_step = recording_step
cfg = trainer.{config}(**{cfg!r})
trainer.main(cfg)
tensors = {{f"{{when}}.{{i}}": t.contiguous() for when in ("before", "after") for i, t in enumerate(snapshots[when])}}
save_file(tensors, os.path.join(cfg.out, f"params_rank{{RANK}}.safetensors"))
"""


def run(script: Path, processes: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(script)] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), str(script)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def compare_updates(single: Path, ddp: Path) -> None:
    one, two = load_file(str(single / "params_rank0.safetensors")), load_file(str(ddp / "params_rank0.safetensors"))
    other = load_file(str(ddp / "params_rank1.safetensors"))
    assert one.keys() == two.keys()
    biggest, worst = 0.0, 0.0
    for key in [k for k in one if k.startswith("before.")]:
        after = "after." + key.split(".", 1)[1]
        assert torch.equal(one[key], two[key])  # the same start
        assert torch.equal(two[after], other[after])  # the replicas agree
        update_one, update_two = one[after] - one[key], two[after] - two[key]
        biggest = max(biggest, update_one.abs().max().item())
        worst = max(worst, (update_two - update_one).abs().max().item())
    assert biggest > 0
    assert worst < 1e-4 * biggest, (worst, biggest)


def write_driver(path: Path, trainer: str, config: str, cfg: dict, halves: int) -> Path:
    path.write_text(DRIVER.format(root=str(ROOT), trainer=trainer, config=config, cfg=cfg, halves=halves))
    return path


COMMON = dict(preset="tiny", random_weights=True, steps=2, log_every=1, checkpoint_every=0, validate_every=0,
              progress=False, device="cpu", precision="fp32", adam_eps=1.0, max_grad_norm=0.0, lr=1e-2)


def test_concept_two_processes_equal_one_with_twice_the_batch(demo_data, tmp_path):
    from train.concept import ConceptConfig
    runs = {}
    for processes, batch in ((1, 4), (2, 2)):
        out = tmp_path / f"world{processes}"
        cfg = dataclasses.asdict(ConceptConfig(**COMMON, data=str(demo_data), out=str(out), batch_size=batch,
                                               num_class_images=4, class_steps=2, class_dir=str(tmp_path / "class"),
                                               num_validation_images=0))
        # Class images come from the first run; the second reuses them (same files, nothing redrawn).
        run(write_driver(tmp_path / f"concept{processes}.py", "concept", "ConceptConfig", cfg, halves=2), processes)
        runs[processes] = out
    compare_updates(runs[1], runs[2])


def test_condition_two_processes_equal_one_with_twice_the_batch(demo_data, tmp_path):
    from train.condition import ConditionConfig
    names = {f.name for f in dataclasses.fields(ConditionConfig)}
    no_validation = {k: 0 for k in ("num_validation_images", "num_validation") if k in names}  # being renamed
    runs = {}
    for processes, batch in ((1, 4), (2, 2)):
        out = tmp_path / f"world{processes}"
        cfg = dataclasses.asdict(ConditionConfig(**COMMON, **no_validation, data=str(demo_data), out=str(out),
                                                 batch_size=batch, drop_prompt_rate=0.0))
        run(write_driver(tmp_path / f"condition{processes}.py", "condition", "ConditionConfig", cfg, halves=1),
            processes)
        runs[processes] = out
    compare_updates(runs[1], runs[2])

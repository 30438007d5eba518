"""The training state a checkpoint holds, saved and restored the same way by both trainers.

    save_training_state(root, step, weights, cfg, info, params, optimizer, scaler, ema,
                        generators={"noise": noise_gen}, data={"order": order.state_dict()})
    weights, state = restore_training_state(folder, cfg, info, optimizer, scaler, ema,
                                            generators={"noise": noise_gen}, may_change=RESUMABLE)

state.pt holds: step, optimizer, grad scaler, EMA, the RNG states of every rank (global RNGs
plus the named explicit generators), the world size, the data positions and the resolved config.
The networks' trainable weights go to weights.safetensors (keys prefixed by network); each trainer
loads its own networks from them, and its data positions from state["data"].
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectsynth.errors import UserError
from defectsynth.runconfig import config_to_dict
from train.checkpoint import (capture_rng_state, check_resume_config, load_checkpoint, restore_rng_state,
                              save_checkpoint)
from train.distributed import DistInfo, assert_replicas_identical, gather_objects
from train.ema import EMA


def save_training_state(root: str | os.PathLike, step: int, weights: dict[str, torch.Tensor], cfg: Any,
                        info: DistInfo, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, ema: EMA | None, generators: dict[str, torch.Generator],
                        data: dict[str, Any], keep_last: int = 0) -> Path | None:
    """Call on every rank: checks the replicas agree, gathers every rank's RNG states; rank 0
    writes checkpoint `step` under `root` (train/checkpoint.py) and returns its folder, the other
    ranks return None. `weights` is only read on rank 0."""
    assert_replicas_identical(params, info.device)
    rng = gather_objects(capture_rng_state(generators))
    if not info.is_main:
        return None
    state = {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "ema": ema.state_dict() if ema is not None else None, "rng": rng, "world_size": info.world_size,
             "data": data, "config": config_to_dict(cfg)}
    return save_checkpoint(root, step, weights, state, cfg, keep_last)


def restore_training_state(folder: str | os.PathLike, cfg: Any, info: DistInfo, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler, ema: EMA | None, generators: dict[str, torch.Generator],
                           may_change: frozenset[str] | set[str] = frozenset()
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load checkpoint `folder` into the optimizer, scaler, EMA and this rank's RNGs, after checking
    that it trained the same config (fields outside `may_change`) on as many processes. Returns
    (trainable weights on this rank's device, state) for the caller's networks and data positions."""
    weights, state = load_checkpoint(folder, info.device)
    check_resume_config(state["config"], cfg, folder, may_change)
    if state["world_size"] != info.world_size:
        raise UserError(f"--resume {folder}: saved with {state['world_size']} processes, "
                         f"resumed with {info.world_size}; the data order would change")
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    restore_rng_state(state["rng"][info.rank], generators)
    return weights, state

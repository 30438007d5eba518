"""Per-sample random noise: row i of a batch comes from generator i alone.

A sample's noise (x_T and every noise a stochastic sampler injects) then depends only on its own
generator, never on the batch size or on its neighbours, so sample k of a synthesis run can be
regenerated alone from its seed. The draw is one torch.randn of shape (1, C, H, W) per row, on the
generator's device, then moved to the target device: the same stream diffusers' `randn_tensor`
produces from a list of generators, which is how the parity tests align the two noise streams.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def generators_from_seeds(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One seeded torch.Generator per seed. CPU generators give the same numbers on every machine."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def randn_per_sample(shape: Sequence[int], generators: Sequence[torch.Generator] | None = None, *,
                     device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` (B, ...), row i drawn from generators[i].

    The numbers are always drawn in float32 and then cast to `dtype`, so a seed gives the same
    sample whatever precision the model runs in (and float32 draws match diffusers' randn_tensor).
    generators=None draws the whole batch from torch's global RNG (not batch-size independent).
    """
    shape = tuple(shape)
    if generators is None:
        return torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per batch row: got {len(generators)} generators for batch {shape[0]}")
    rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.cat(rows, dim=0).to(device=device, dtype=dtype)  # B x (1, ...) -> (B, ...); device None: generators'

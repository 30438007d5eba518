"""The key-mapping mechanism: layouts built from template tables, applied in both directions.

A `Layout` says how one of our modules' state-dict keys are named in a foreign format:

* `renames`: (our module prefix, their module prefix) pairs, already expanded from "{}" templates
  for one config. An our-key takes the longest matching prefix (on dot boundaries) and keeps the
  rest verbatim: `("input_blocks.1.0", "down_blocks.0.resnets.0")` maps
  `input_blocks.1.0.in_layers.0.weight` once a finer pair `("input_blocks.1.0.in_layers.0",
  "down_blocks.0.resnets.0.norm1")` exists. Every our-key must match some pair: an unmatched key is
  a table bug, reported as such, never guessed.
* `reshapes`: our key -> `Transform` for 1:1 keys whose tensor changes shape (conv 1x1 <-> linear).
* `fused`: `Rule`s where several of our keys come from one of theirs (OpenCLIP `in_proj_weight`
  -> q, k, v).
* `prefix`: prepended to every foreign key (`model.diffusion_model.`).
* `flatten`: the foreign key is the renamed key with its dots removed (LDM EMA weights:
  `model_ema.diffusion_modelinput_blocks00weight`).

`Layout.rules(our_keys)` expands it into explicit `Rule`s: the single list both loading
(`to_ours`) and writing (`to_theirs`) use, and the list `inspect` counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence

import torch


@dataclass(frozen=True)
class Transform:
    """How tensors change between our keys and theirs. `to_ours(theirs) -> ours`, lists in rule order."""
    name: str
    to_ours: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    to_theirs: Callable[[list[torch.Tensor]], list[torch.Tensor]]


COPY = Transform("copy", lambda ts: list(ts), lambda ts: list(ts))
# Our VAE attention uses 1x1 convs (LDM); diffusers uses linear layers: [C, C, 1, 1] <-> [C, C].
CONV1X1_FROM_LINEAR = Transform(
    "linear->conv1x1",
    to_ours=lambda ts: [ts[0].reshape(*ts[0].shape, 1, 1)],  # (C_out, C_in) -> (C_out, C_in, 1, 1)
    to_theirs=lambda ts: [ts[0].reshape(ts[0].shape[0], ts[0].shape[1])],  # (C_out, C_in, 1, 1) -> (C_out, C_in)
)
# OpenCLIP packs q, k, v projections in one `in_proj_weight` (3W, W) / `in_proj_bias` (3W,).
# The split parts are cloned so that each parameter owns its storage (safetensors refuses to
# save tensors that share memory).
SPLIT_QKV = Transform(
    "split-qkv",
    to_ours=lambda ts: [part.clone() for part in ts[0].chunk(3, dim=0)],  # (3W, ...) -> 3 x (W, ...)
    to_theirs=lambda ts: [torch.cat(ts, dim=0)],  # 3 x (W, ...) -> (3W, ...)
)


@dataclass(frozen=True)
class Rule:
    """Our key(s) <-> their key(s), with the transform between them."""
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    transform: Transform = COPY


def expand(template: str, **indices: object) -> str:
    """Fill a "{name}" template: expand("input_blocks.{n}.1", n=4) -> "input_blocks.4.1"."""
    return template.format(**indices)


def join(*parts: str) -> str:
    """Join module path parts with dots, skipping empty ones."""
    return ".".join(p for p in parts if p)


def nest(outer: tuple[str, str], inner: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Prefix a sub-table's pairs with an outer pair: block prefix x leaf renames."""
    return [(join(outer[0], a), join(outer[1], b)) for a, b in inner]


@dataclass(frozen=True)
class Layout:
    name: str
    renames: tuple[tuple[str, str], ...] = (("", ""),)
    prefix: str = ""
    reshapes: Mapping[str, Transform] = field(default_factory=dict)
    fused: tuple[Rule, ...] = ()
    flatten: bool = False

    def with_prefix(self, prefix: str, name: str | None = None) -> "Layout":
        return replace(self, prefix=prefix + self.prefix, name=name or self.name)

    def their_key(self, our_key: str) -> str:
        """The foreign name of one of our keys (a 1:1 rule), by the longest matching prefix."""
        table = self._rename_table()
        parts = our_key.split(".")
        for cut in range(len(parts), -1, -1):
            head = ".".join(parts[:cut])
            if head in table:
                renamed = join(table[head], ".".join(parts[cut:]))
                if self.flatten:
                    renamed = renamed.replace(".", "")
                return self.prefix + renamed
        raise KeyError(f"layout {self.name!r} has no rename for our key {our_key!r} (table bug)")

    def our_key(self, their_key: str) -> str | None:
        """Inverse of `their_key` for 1:1 renames (prefix already stripped); None when no pair matches.

        Used to read shapes of a foreign file in our names when inferring a config; loading itself
        always goes through `rules`, which also covers fused and reshaped keys.
        """
        inverse = self.__dict__.get("_inverse")
        if inverse is None:
            inverse = {theirs: ours for ours, theirs in self.renames}
            object.__setattr__(self, "_inverse", inverse)
        parts = their_key.split(".")
        for cut in range(len(parts), -1, -1):
            head = ".".join(parts[:cut])
            if head in inverse:
                return join(inverse[head], ".".join(parts[cut:]))
        return None

    def _rename_table(self) -> dict[str, str]:
        cached = self.__dict__.get("_table")
        if cached is None:
            cached = dict(self.renames)
            object.__setattr__(self, "_table", cached)
        return cached

    def rules(self, our_keys: Sequence[str]) -> list[Rule]:
        """Explicit rules covering exactly `our_keys` (fused rules first, then 1:1 renames)."""
        our_set = set(our_keys)
        rules: list[Rule] = []
        taken: set[str] = set()
        for rule in self.fused:
            if any(k not in our_set for k in rule.ours):
                raise KeyError(f"layout {self.name!r}: fused rule names our keys "
                               f"{[k for k in rule.ours if k not in our_set]} that the module does not have")
            rules.append(replace(rule, theirs=tuple(self.prefix + t for t in rule.theirs)))
            taken.update(rule.ours)
        for key in our_keys:
            if key not in taken:
                rules.append(Rule((key,), (self.their_key(key),), self.reshapes.get(key, COPY)))
        seen: dict[str, str] = {}
        for rule in rules:
            for theirs in rule.theirs:
                if theirs in seen:
                    raise KeyError(f"layout {self.name!r}: our keys {seen[theirs]!r} and {rule.ours[0]!r} "
                                   f"both map to {theirs!r} (table bug)")
                seen[theirs] = rule.ours[0]
        return rules


def to_theirs(rules: Sequence[Rule], ours: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> foreign names and shapes (used for writing files)."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensors = rule.transform.to_theirs([ours[k] for k in rule.ours])
        out.update(zip(rule.theirs, tensors))
    return out

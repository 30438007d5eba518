"""Explicit, stable seeds: a child seed is a hash of its parent seed and keys, so any item (an
augmentation variant, a pair, a sample) can be regenerated alone, in any process, in any order.
Python's `hash()` is salted per process, so sha256 is used instead."""
from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed from a run seed and any keys with a stable `repr` (ints, strings, tuples)."""
    text = repr((int(seed),) + tuple(keys)).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    """A numpy Generator for the item named by `keys` under the run `seed`."""
    return np.random.default_rng(derive_seed(seed, *keys))

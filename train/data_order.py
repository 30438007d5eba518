"""Data order from an explicit seeded generator, with a position that a checkpoint restores.

`IndexStream` is an endless sequence of dataset indices: one random permutation per epoch,
drawn from its own torch.Generator. Its state is (epoch, position in the epoch, the generator's
state at the start of the epoch), so a resumed run continues with exactly the next index, and
the order is independent of the global RNG, of batch size changes mid-epoch and of workers.

With data parallelism every rank holds the same stream and takes its own slice of each global
batch, so the ranks never see the same sample within a step and stay in step without talking.
"""
from __future__ import annotations

import torch


class IndexStream:
    """Endless shuffled indices into a dataset of `size` items, seeded by `seed`."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size <= 0:
            raise ValueError(f"IndexStream needs a non-empty dataset, got size {size}")
        self.size = size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.position = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        # Remember the generator state that produces this epoch's permutation (for state_dict).
        self._epoch_generator_state = self.generator.get_state()
        if self.shuffle:
            self._order = torch.randperm(self.size, generator=self.generator).tolist()
        else:
            self._order = list(range(self.size))

    def take(self, count: int) -> list[int]:
        """The next `count` indices, crossing epoch boundaries as needed."""
        out = []
        while len(out) < count:
            if self.position == self.size:
                self.epoch += 1
                self.position = 0
                self._start_epoch()
            n = min(count - len(out), self.size - self.position)
            out += self._order[self.position:self.position + n]
            self.position += n
        return out

    def take_for_rank(self, per_rank: int, rank: int, world_size: int) -> list[int]:
        """One global batch of per_rank * world_size indices; this rank's contiguous slice."""
        indices = self.take(per_rank * world_size)
        return indices[rank * per_rank:(rank + 1) * per_rank]

    def state_dict(self) -> dict:
        return {"size": self.size, "epoch": self.epoch, "position": self.position,
                "epoch_generator_state": self._epoch_generator_state.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"data position was saved for a dataset of {state['size']} items, "
                             f"this one has {self.size}: the data changed since the checkpoint")
        self.generator.set_state(state["epoch_generator_state"])
        self.epoch = state["epoch"]
        self._start_epoch()
        self.position = state["position"]

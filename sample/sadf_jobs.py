"""The SADF job list: what every output image of a synthesis run is, as a pure function of the
number of pairs P, the samples per driver k, the batch size B and the run seed, so that shards,
reruns and `--regenerate` all agree without talking to each other.

    job j = 0 .. P * k - 1      pair p = j // k, sample s = j % k; image id j + 1
    pair p                      data.pairing.SadfPairs(...).build(p): free image (p // V) % N,
                                variant p % V, masks drawn with rng_for(seed, "pair", p)
    seed of (p, s)              derive_seed(seed, "synthesize", p, s); retry r >= 1 of the
                                non-finite / blank guard: derive_seed(seed, "synthesize", p, s, "retry", r)
    batch b                     jobs [b * B, (b + 1) * B): fixed, so each image is always made in the
                                same generate() call (CPU and GPU kernels change their last bits with
                                the batch, so a sample is bit-exact only within its own batch)
    shard i of n                batches b with b % n == i (round robin keeps the shards' loads even)

Batches may span two pairs (k = 15, B = 8): generate() takes one prompt and hint per row.
"""
from __future__ import annotations

from dataclasses import dataclass

from data.seeding import derive_seed


@dataclass(frozen=True)
class Job:
    index: int          # position in the job list, 0-based
    pair_id: int        # the SADF pair (driver, masks, prompt) = the image's condition
    sample_index: int   # which of the k samples of that pair

    @property
    def image_id(self) -> int:
        return self.index + 1

    @property
    def file_stem(self) -> str:
        return f"{self.pair_id:06d}_{self.sample_index:02d}"


def job(index: int, samples_per_driver: int) -> Job:
    return Job(index, index // samples_per_driver, index % samples_per_driver)


def job_seed(seed: int, pair_id: int, sample_index: int, attempt: int = 0) -> int:
    """The sampling seed of a job; attempt 0 is the first draw, 1.. the guard's retries."""
    if attempt == 0:
        return derive_seed(seed, "synthesize", pair_id, sample_index)
    return derive_seed(seed, "synthesize", pair_id, sample_index, "retry", attempt)


def shard_batches(num_jobs: int, batch: int, shard: int = 0, num_shards: int = 1,
                  samples_per_driver: int = 1) -> list[list[Job]]:
    """The batches of shard `shard` of `num_shards`, in job order."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards (0 .. {num_shards - 1})")
    num_batches = -(-num_jobs // batch)  # ceil
    return [[job(j, samples_per_driver) for j in range(b * batch, min(num_jobs, (b + 1) * batch))]
            for b in range(shard, num_batches, num_shards)]

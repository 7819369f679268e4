"""The batch order of an epoch, recomputed from (seed, epoch), and the position inside it.

Nothing about the order is stored: a checkpoint holds the seed, the epoch and
the number of batches already consumed, and the rest follows. With several
ranks, each takes a disjoint slice of every global batch, so the position is
the same number on every rank. The position itself is counted by the loop,
which knows what was consumed (a DataLoader's workers read ahead).
"""

from __future__ import annotations

from typing import Iterator

import torch

from etappe.state import derive_seed


class ResumableBatches:
    """Index batches for one epoch at a time, resumable at any batch.

    ``batch_size`` is the global batch size: with several ranks each takes a
    slice of it (sizes differ by at most one), so a run means the same thing,
    and its position transfers, whatever the number of ranks.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < world_size:
            raise ValueError(f"the batch size ({batch_size}) must be at least the number of ranks ({world_size})")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size

    def __len__(self) -> int:
        """Batches in one epoch (per rank; the same on every rank)."""
        return -(-self.num_samples // self.batch_size)  # the last batch may be short

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g)

    def batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """This rank's index batches of ``epoch``, beginning at batch ``start`` (skipped batches are never read)."""
        order = self.order(epoch)
        size = self.batch_size
        for b in range(start, len(self)):
            global_batch = order[b * size : (b + 1) * size]
            yield global_batch if self.world_size == 1 else torch.tensor_split(global_batch, self.world_size)[self.rank]


class EpochBatchSampler(torch.utils.data.Sampler):
    """A batch sampler for ``torch.utils.data.DataLoader`` over a user's map-style Dataset: the batches of
    one epoch from a start position, as ``ResumableBatches.batches`` gives them."""

    def __init__(self, batches: ResumableBatches, epoch: int, start: int) -> None:
        self.source, self.epoch, self.start = batches, epoch, start

    def __iter__(self) -> Iterator[list[int]]:
        for idx in self.source.batches(self.epoch, self.start):
            yield idx.tolist()

    def __len__(self) -> int:
        return len(self.source) - self.start

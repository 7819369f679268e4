"""The batch order of an epoch, recomputed from (seed, epoch), and the position inside it.

Nothing about the order is stored: a checkpoint holds the seed, the epoch and
the number of batches already consumed, and the rest follows. With several
ranks, each takes a disjoint slice of every global batch, so the position is
the same number on every rank. The position itself is counted by the loop,
which knows what was consumed (a DataLoader's workers read ahead): by
etappe's loop, or, in your own, by ``ResumableLoader``, which counts the
batches it hands over.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from etappe.errors import UsageError
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
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch) % 2**64)  # torch's seeds are 64 bits
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


class ResumableLoader(torch.utils.data.DataLoader):
    """A ``torch.utils.data.DataLoader`` for your own loop that resumes mid-epoch: ``for x, y in loader:`` after
    ``load_state_dict`` yields only the batches of the epoch not yet handed to the loop, in the order an
    uninterrupted run would have seen them.

    The order of each epoch is recomputed from ``(seed, epoch)`` (``ResumableBatches``; the last batch may be
    short); the state is ``(seed, epoch, batches_done)`` plus the sizes it was made for. ``batches_done`` counts
    the batches this loader handed to the loop, not those its workers read ahead: a checkpoint taken inside the
    loop body counts the batch being trained on as done, and batches prefetched but not yet handed over are read
    again after a resume, never lost. An epoch that runs to its end moves the loader to the next one;
    ``set_epoch(e)`` chooses one (it keeps the position when the loader already stands inside ``e``, as it does
    after a load). Every other keyword goes to DataLoader, except ``sampler``, ``batch_sampler``, ``drop_last``
    and ``generator``: the loader draws its workers' base seed from its own generator, seeded per epoch, so
    creating an iterator draws nothing from torch's global one (which a resumed run would draw at another moment).
    """

    def __init__(self, dataset: Any, batch_size: int = 1, *, shuffle: bool = True, seed: int = 0,
                 **kwargs: Any) -> None:
        taken = sorted({"sampler", "batch_sampler", "drop_last", "generator"} & kwargs.keys())
        if taken:
            raise UsageError(f"ResumableLoader chooses its own {', '.join(taken)}: its batches come from (seed, "
                             "epoch), so that a run resumes exactly; pass seed= and shuffle= instead")
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise UsageError(f"ResumableLoader needs a map-style Dataset (with __len__ and __getitem__); got a "
                             f"{type(dataset).__name__}, whose position cannot be recomputed")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size={batch_size!r}: expected a positive whole number")
        self.batches = ResumableBatches(len(dataset), batch_size, seed=seed, shuffle=shuffle)
        self.epoch, self.batches_done = 0, 0
        self._generator = torch.Generator()
        super().__init__(dataset, batch_sampler=_PositionSampler(self), generator=self._generator, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Go to the first batch of ``epoch``, unless the loader stands inside it already (after a load)."""
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def __iter__(self) -> Iterator[Any]:
        self._generator.manual_seed(derive_seed(self.batches.seed, self.epoch, 1) % 2**64)
        return self._counted(super().__iter__(), self.epoch)

    def _counted(self, batches: Iterator[Any], epoch: int) -> Iterator[Any]:
        for batch in batches:
            self.batches_done += 1  # before the loop body runs: a save inside it counts this batch as done
            yield batch
        if self.epoch == epoch:  # ran to its end: the next iteration is the next epoch
            self.epoch, self.batches_done = epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        b = self.batches
        return {"seed": b.seed, "shuffle": b.shuffle, "num_samples": b.num_samples, "batch_size": b.batch_size,
                "epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        b = self.batches
        mine = {"seed": b.seed, "shuffle": b.shuffle, "num_samples": b.num_samples, "batch_size": b.batch_size}
        differ = [f"{k} {state.get(k)!r} (this loader: {v!r})" for k, v in mine.items() if state.get(k) != v]
        if differ:
            raise UsageError(f"the saved loader state is for another data order: {', '.join(differ)}; make the "
                             "ResumableLoader with the same dataset length, batch_size, seed and shuffle")
        done = state.get("batches_done")
        if not (isinstance(state.get("epoch"), int) and isinstance(done, int) and 0 <= done <= len(b)):
            raise UsageError(f"the saved loader state has epoch {state.get('epoch')!r} and batches_done {done!r}; "
                             f"expected whole numbers, batches_done between 0 and {len(b)}")
        self.epoch, self.batches_done = state["epoch"], done


class _PositionSampler(torch.utils.data.Sampler):
    """The batch sampler of a ResumableLoader: the batches of its epoch from its position, read when an iterator
    is made."""

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[list[int]]:
        return iter(EpochBatchSampler(self.loader.batches, self.loader.epoch, self.loader.batches_done))

    def __len__(self) -> int:
        return len(self.loader.batches) - self.loader.batches_done

"""Deterministic, resumable, shardable data loading.

:class:`ResumableSampler` orders each epoch by a permutation drawn from (seed, epoch); with
``world_size`` > 1 each rank takes a strided, equal-length slice of it (padded by wrapping
around, like ``DistributedSampler``). Horizontal flips, when the dataset asks for them, are
drawn from (seed, epoch) per dataset index and passed to the dataset as ``(index, flip)``
keys, so worker count and scheduling never change what a batch holds.

:func:`make_loader` wraps it in a :class:`ResumableLoader` (a ``DataLoader``) that counts
the samples it has handed out. How a trainer uses it::

    loader = make_loader(ds, batch_size, seed, rank, world, workers, device,
                         start_epoch=state["epoch"], start_index=state["index"])  # or 0, 0
    while step < max_steps:
        for x, y in loader:          # one pass = the rest of the current epoch
            ... train step ...
            if time_to_checkpoint:
                save(..., data=loader.state_dict())   # {"epoch", "index", ...}
    # or: loader.load_state_dict(saved) before iterating.

``loader.state_dict()`` always names the next batch to be delivered: the epoch rolls over
as soon as its last (full, with ``drop_last``) batch has been handed out, so a run resumed
from it continues with exactly the batch the uninterrupted run would have used next. If a
delivered batch is abandoned (not trained on), save ``loader.state_dict(include_last=False)``
so the resumed run sees it again. ``loader.epoch`` is the epoch of the next batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .base import DataError

FLIP_STREAM = 0x5F11B


def _seed_words(seed: int) -> int:
    return int(seed) & 0xFFFFFFFFFFFFFFFF  # SeedSequence needs a non-negative int


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of all ``n`` indices in ``epoch`` (identical on every rank and machine)."""
    return np.random.default_rng([_seed_words(seed), int(epoch)]).permutation(n)


def flip_decisions(n: int, seed: int, epoch: int) -> np.ndarray:
    """Per dataset index: flip it horizontally in ``epoch``?"""
    return np.random.default_rng([_seed_words(seed), int(epoch), FLIP_STREAM]).random(n) < 0.5


class ResumableSampler(Sampler):
    """Per-epoch permutation from (seed, epoch), sharded by (rank, world_size), resumable.

    ``index`` is this rank's position within the current epoch (samples already consumed).
    Iterating yields the rest of the current epoch from ``index`` on; the sampler itself
    does not advance (the :class:`ResumableLoader` does, as batches are delivered).
    """

    def __init__(
        self,
        data: int | Sized,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        flip: bool = False,
        epoch: int = 0,
        index: int = 0,
    ):
        self.size = int(data) if isinstance(data, int) else len(data)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle, self.flip = shuffle, flip
        self.num_samples = math.ceil(self.size / self.world_size) if self.size else 0
        self.set_epoch(epoch, index)

    def set_epoch(self, epoch: int, index: int = 0) -> None:
        if not 0 <= index <= self.num_samples:
            raise ValueError(f"position {index} is outside an epoch of {self.num_samples} samples")
        self.epoch, self.index = int(epoch), int(index)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's full list of dataset indices for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        order = epoch_permutation(self.size, self.seed, epoch) if self.shuffle else np.arange(self.size)
        total = self.num_samples * self.world_size
        if total > self.size:  # pad by wrapping around so every rank gets the same count
            order = np.resize(order, total)
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator:
        idx = self.epoch_indices()[self.index :]
        if not self.flip:
            return iter(idx.tolist())
        flips = flip_decisions(self.size, self.seed, self.epoch)[idx]
        return iter(list(zip(idx.tolist(), flips.tolist())))

    def __len__(self) -> int:
        return self.num_samples - self.index

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "world_size": self.world_size,
            "size": self.size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``. A different world size keeps the global position
        (samples consumed across all ranks); a different data size is refused."""
        if int(state.get("size", self.size)) != self.size:
            raise DataError(
                f"cannot resume: the data now has {self.size} images but the saved position was for {state['size']}"
            )
        self.seed = int(state.get("seed", self.seed))
        index = int(state["index"])
        old_world = int(state.get("world_size", self.world_size))
        if old_world != self.world_size:
            index = min(self.num_samples, index * old_world // self.world_size)
        self.set_epoch(int(state["epoch"]), index)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that records delivered batches."""

    sampler: ResumableSampler

    def __iter__(self):
        s = self.sampler
        for batch in super().__iter__():
            n = len(batch[1]) if isinstance(batch, (list, tuple)) else len(batch)
            self._before = (s.epoch, s.index)
            s.index += n
            remaining = s.num_samples - s.index
            if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
                s.set_epoch(s.epoch + 1)
            yield batch

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self, include_last: bool = True) -> dict[str, int]:
        """Where the next epoch/batch starts; ``include_last=False``: the position before
        the most recently delivered batch (to redo an abandoned step)."""
        state = self.sampler.state_dict()
        before = getattr(self, "_before", None)
        if not include_last and before is not None:
            state["epoch"], state["index"] = before
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._before = None


def make_loader(
    dataset,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    device: str | torch.device = "cpu",
    drop_last: bool = True,
    start_epoch: int = 0,
    start_index: int = 0,
    shuffle: bool = True,
) -> ResumableLoader:
    """A deterministic loader: same seed -> same batches, whatever ``workers`` is.

    ``pin_memory`` only when ``device`` is CUDA; ``persistent_workers`` when ``workers`` > 0.
    Flips are applied when ``dataset.flip`` is true. Raises :class:`DataError` when a rank
    would get no full batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    sampler = ResumableSampler(
        dataset,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle=shuffle,
        flip=bool(getattr(dataset, "flip", False)),
        epoch=start_epoch,
        index=start_index,
    )
    if sampler.num_samples == 0 or (drop_last and sampler.num_samples < batch_size):
        name = getattr(dataset, "description", type(dataset).__name__)
        raise DataError(
            f"{name} gives {sampler.num_samples} images per process, fewer than "
            f"one batch of {batch_size}; lower --batch-size"
        )
    workers = max(0, int(workers))
    return ResumableLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=str(device).startswith("cuda"),
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(_seed_words(seed) % 2**63),
    )

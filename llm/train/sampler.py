"""Which examples each rank trains on, in what order: epoch after epoch, resumable at any point.

A `Split` says how its dataset is to be read: `sharded` (already this rank's part, ordered per epoch by the dataset
itself: the pretraining shards) or shuffled here and dealt out rank by rank; `lengths` (items padded to the batch's
longest) gets length-bucketed batches; `replay` interleaves a second, sharded dataset (pretraining windows during
SFT) at a fixed share of each rank's positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from llm.train.config import TrainState


@dataclass
class Replay:
    """Items of another dataset mixed into every rank's epoch: position k of a rank's order (k = 0, 1, ...) is a
    replay item iff floor((k+1)·share) > floor(k·share), so the first n positions hold floor(n·share) of them, on
    every rank alike; the j-th is item j of `dataset` (this rank's shard, ordered per epoch by its `set_epoch(e)`,
    like a sharded Split). The order stays a pure function of (seed, epoch, rank, world), so resuming is exact."""

    dataset: torch.utils.data.Dataset
    share: float

    def __post_init__(self):
        if not 0 < self.share < 1:
            raise ValueError(f"replay share {self.share} outside (0, 1)")

    def is_replay(self, k: int) -> bool:
        return math.floor((k + 1) * self.share) > math.floor(k * self.share)


@dataclass
class Split:
    """A training or validation set as the loop reads it."""

    dataset: torch.utils.data.Dataset
    sharded: bool = False
    """The dataset is this rank's shard and orders itself per epoch (`dataset.set_epoch(e)`)."""
    lengths: Optional[Sequence[int]] = None
    """Token count of each item, when batches are padded to their longest: batches are then length-bucketed."""
    bytes_per_token: Optional[float] = None
    """UTF-8 bytes per token of the text, for bits per byte (None: not reported)."""
    seq_len: Optional[int] = None
    """Tokens per item (at most): the start line's tokens/step, MFU's attention term, compile=auto's estimate of the
    work left, and the batch geometry a checkpoint must be resumed with."""
    replay: Optional[Replay] = None
    """Another dataset interleaved at a share of the positions; its items are indexed after `dataset`'s."""

    @property
    def items(self) -> torch.utils.data.Dataset:
        """What epoch_indices index: `dataset`, followed by the replay dataset's items when there is one."""
        return self.dataset if self.replay is None else torch.utils.data.ConcatDataset([self.dataset,
                                                                                         self.replay.dataset])

    def local_len(self, world: int) -> int:
        """Examples this rank can draw per epoch (with replay: positions until either dataset runs out)."""
        own = len(self.dataset) if self.sharded else len(self.dataset) // world
        if self.replay is None:
            return own
        share, other = self.replay.share, len(self.replay.dataset)
        n = int(own / (1 - share)) + 1
        while n - math.floor(n * share) > own or math.floor(n * share) > other:
            n -= 1
        return n

    def epoch_indices(self, epoch: int, n: int, seed: int, rank: int, world: int, mb: int = 1) -> list[int]:
        """This rank's first `n` example indices (into `items`) in `epoch`, in order."""
        if self.replay is None:
            return self._own_indices(epoch, n, seed, rank, world, mb)
        replay = [self.replay.is_replay(k) for k in range(n)]
        own = self._own_indices(epoch, n - sum(replay), seed, rank, world, mb)
        self.replay.dataset.set_epoch(epoch)
        out, i, j = [], 0, len(self.dataset)  # own items are indices of `dataset`, replay items follow them
        for r in replay:
            if r:
                out.append(j)
                j += 1
            elif i < len(own):
                out.append(own[i])
                i += 1
            else:  # length buckets drop an epoch's last partial step
                break
        return out

    def _own_indices(self, epoch: int, n: int, seed: int, rank: int, world: int, mb: int) -> list[int]:
        if self.sharded:
            self.dataset.set_epoch(epoch)
            return list(range(n))
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.dataset), generator=g)
        if self.lengths is None or mb == 1:
            return perm[rank::world][:n].tolist()
        step = mb * world  # one optimizer micro step over all ranks
        pool = 64 * step  # sorted by length within pools of 64 steps, so the order stays random across pools
        perm = perm[: len(perm) // step * step].tolist()
        steps = []
        for s in range(0, len(perm), pool):
            chunk = sorted(perm[s:s + pool], key=lambda i: self.lengths[i])
            steps += [chunk[b:b + step] for b in range(0, len(chunk), step)]
        order = torch.randperm(len(steps), generator=g).tolist()
        return [i for k in order for i in steps[k][rank * mb:(rank + 1) * mb]][:n]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def micro_batches(split: Split, state: TrainState, n: int, mb: int, collate: Callable, seed: int, rank: int,
                  world: int, num_workers: int, device: torch.device) -> Iterator[dict]:
    """Micro batches forever, epoch after epoch, starting at (state.epoch, state.index); advances them."""
    per_epoch = n // mb * mb
    while True:
        order = split.epoch_indices(state.epoch, n, seed, rank, world, mb)[state.index:per_epoch]
        # its own generator: a DataLoader's iterator draws a base seed from the global RNG, which would shift
        # every later dropout mask of a resumed run (it starts a loader mid-epoch, the uninterrupted run does not)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(split.items, order), batch_size=mb,
                                             shuffle=False, drop_last=True, collate_fn=collate,
                                             num_workers=num_workers, pin_memory=device.type == "cuda",
                                             generator=torch.Generator().manual_seed(seed * 1_000_003 + state.epoch))
        for batch in loader:
            state.index += mb
            yield to_device(batch, device)
        state.epoch, state.index = state.epoch + 1, 0

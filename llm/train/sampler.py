"""Which examples each rank trains on, in what order: epoch after epoch, resumable at any point.

A `Split` says how its dataset is to be read: `sharded` (already this rank's part, ordered per epoch by the dataset
itself: the pretraining shards) or shuffled here and dealt out rank by rank; `lengths` (items padded to the batch's
longest) gets length-bucketed batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from llm.train.config import TrainState


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
    """Tokens per item when every item has the same length (throughput and MFU); None = the model's context."""

    def local_len(self, world: int) -> int:
        """Examples this rank can draw per epoch."""
        return len(self.dataset) if self.sharded else len(self.dataset) // world

    def epoch_indices(self, epoch: int, n: int, seed: int, rank: int, world: int, mb: int = 1) -> list[int]:
        """This rank's first `n` example indices in `epoch`, in order."""
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
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(split.dataset, order), batch_size=mb,
                                             shuffle=False, drop_last=True, collate_fn=collate,
                                             num_workers=num_workers, pin_memory=device.type == "cuda")
        for batch in loader:
            state.index += mb
            yield to_device(batch, device)
        state.epoch, state.index = state.epoch + 1, 0

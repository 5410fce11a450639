"""Fine-tuning datasets: chats tokenized with the one chat template, packed into fixed-length sequences without
attention across examples; and labelled texts for classification. Sources are read by llm/sft_sources.py and
tokenized once into the token cache of llm/sft_cache.py; the datasets here slice examples out of it per item.

Packing (as in the "packing with position ids" recipe of Hugging Face's DataCollatorWithFlattening and
LongLoRA's SFT code): greedy in order; each example restarts its rotary positions at 0 and the attention mask is
block-diagonal causal, so a packed sequence gives every example exactly the loss it has alone.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from llm.chat import IGNORE_INDEX
from llm.errors import UserError
from llm.sft_cache import TokenizedSource, fragments_in_spans, write_chats, write_labelled
from llm.sft_sources import Chat


class SFTDataset(Dataset):
    """Tokenized chats, each item a list of examples (input ids, target labels) that fit in `seq_len` together.

    An example of n tokens gives n-1 (input, next-token target) pairs; targets are IGNORE_INDEX outside the
    assistant turns. Longer examples are truncated (`truncate=True`, kept if a target survives) or skipped;
    `self.skipped` counts them. Without packing each item holds exactly one example. `SFTDataset(tokenizer,
    chats, ...)` tokenizes a list in memory; `from_tokenized` takes records of a (cached) TokenizedSource.
    """

    def __init__(self, tokenizer, chats: list[tuple[str, Chat]], seq_len: int, pack: bool = True,
                 truncate: bool = False):
        with tempfile.TemporaryDirectory() as d:
            write_chats(tokenizer, ((w, "", c, -1, -1) for w, c in chats), Path(d), workers=1)
            src = TokenizedSource(Path(d), "chats", in_memory=True)
        self._select(src, np.arange(len(src)), seq_len, pack, truncate)

    @classmethod
    def from_tokenized(cls, src: TokenizedSource, indices: np.ndarray, seq_len: int, pack: bool = True,
                       truncate: bool = False) -> "SFTDataset":
        """The chats `indices` (record numbers, in this order) of `src`."""
        self = cls.__new__(cls)
        self._select(src, indices, seq_len, pack, truncate)
        return self

    def _select(self, src: TokenizedSource, indices, seq_len: int, pack: bool, truncate: bool):
        self.src, self.seq_len, self.pack = src, seq_len, pack
        indices = np.asarray(indices, dtype=np.int64)
        starts = src.offsets[indices]
        n_x = src.offsets[indices + 1] - starts - 1  # predict token t+1 from tokens <= t
        too_long = n_x > seq_len
        n_x = np.minimum(n_x, seq_len)
        has_target = src.arrays["first_target"][indices] <= n_x
        keep = has_target & (truncate | ~too_long)
        self.truncated = int(too_long.sum()) if truncate else 0
        self.skipped = len(indices) - int(keep.sum())
        if not keep.any():
            raise UserError(f"no example fits in seq_len={seq_len} ({self.skipped} skipped); raise --seq_len "
                            "or pass --truncate")
        self.starts, self.n_x = starts[keep], n_x[keep]  # (n_examples,) each: where in src.tokens, input length
        self.n_examples = len(self.starts)
        self.bounds = _pack(self.n_x, seq_len) if pack else np.arange(self.n_examples + 1)
        if not pack:  # padded to the batch's longest: the trainer batches similar lengths together
            self.lengths = self.n_x

    def __len__(self):
        return len(self.bounds) - 1

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        item = []
        for e in range(self.bounds[i], self.bounds[i + 1]):
            s, n = int(self.starts[e]), int(self.n_x[e])
            y = self.src.tokens[s + 1:s + 1 + n].astype(np.int64)
            y[self.src.arrays["mask"][s + 1:s + 1 + n] == 0] = IGNORE_INDEX
            item.append((self.src.tokens[s:s + n].tolist(), y.tolist()))
        return item

    def byte_fragments(self, tokenizer) -> tuple[int, int]:
        """(byte fragments, tokens) over the examples' inputs, as `tokenizer.count_byte_fragments` counts them."""
        return (fragments_in_spans(tokenizer.is_byte_fragment, self.src.tokens, self.starts, self.n_x),
                int(self.n_x.sum()))


def _pack(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Greedy, in order: append to the current sequence while it fits (order kept, so runs are reproducible).
    Returns the bounds: sequence i holds examples bounds[i]:bounds[i + 1]."""
    bounds, used = [0], 0
    for k, n in enumerate(lengths.tolist()):
        if k > bounds[-1] and used + n > seq_len:
            bounds.append(k)
            used = 0
        used += n
    return np.array(bounds + [len(lengths)], dtype=np.int64)


class WindowItems(Dataset):
    """Pretraining windows (llm.data.PretrainDataset, this rank's shard) as SFT items: each one document of seq_len
    tokens with every token labelled, so SFTCollator batches them beside chats (replay of pretraining text during
    SFT, and its validation loss)."""

    def __init__(self, windows):
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def set_epoch(self, epoch: int):
        self.windows.set_epoch(epoch)

    def __getitem__(self, i):
        x, y = self.windows[i]
        return [(x.tolist(), y.tolist())]


class SFTCollator:
    """Items of SFTDataset -> a batch dict for llm.tasks.lm.lm_loss.

    packed=True: input_ids/labels (B, seq_len), position_ids restarting at every example, and as `mask` the
    example index of every token (B, T) int32, padding -1: the model attends causally within an example and never
    across examples (padding forms its own block, so no row is empty) — through flash-attn's variable-length kernel
    where it can, else a (B, 1, T, T) mask it builds on the device (`llm.model.document_mask`), so no T² mask
    is built or shipped from the host. packed=False: right-padded to the longest example; no mask is needed because
    a causal model never looks right, so the real tokens never see the padding.
    """

    def __init__(self, pad_id: int, seq_len: int, packed: bool = True):
        self.pad_id, self.seq_len, self.packed = pad_id, seq_len, packed

    def __call__(self, items: list[list[tuple[list[int], list[int]]]]) -> dict[str, torch.Tensor]:
        T = self.seq_len if self.packed else max(sum(len(x) for x, _ in item) for item in items)
        B = len(items)
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        doc = torch.full((B, T), -1, dtype=torch.int32)
        for b, item in enumerate(items):
            p = 0
            for d, (x, y) in enumerate(item):
                n = len(x)
                tokens[b, p:p + n] = torch.tensor(x)
                labels[b, p:p + n] = torch.tensor(y)
                pos[b, p:p + n] = torch.arange(n)
                doc[b, p:p + n] = d
                p += n
        if not self.packed:
            return {"input_ids": tokens, "labels": labels}
        return {"input_ids": tokens, "labels": labels, "position_ids": pos, "mask": doc}


class ClassifyDataset(Dataset):
    """(ids truncated to seq_len, label) pairs. `ClassifyDataset(tokenizer, [(text, label)], seq_len)` tokenizes
    a list in memory; `from_tokenized` takes records of a (cached) TokenizedSource."""

    def __init__(self, tokenizer, examples: list[tuple[str, int]], seq_len: int):
        with tempfile.TemporaryDirectory() as d:
            write_labelled(tokenizer, ((t, y, -1) for t, y in examples), Path(d))
            src = TokenizedSource(Path(d), "texts", in_memory=True)
        self._select(src, np.arange(len(src)), seq_len, tokenizer.eos_id)

    @classmethod
    def from_tokenized(cls, src: TokenizedSource, indices: np.ndarray, seq_len: int, eos_id: int) -> "ClassifyDataset":
        """The texts `indices` (record numbers, in this order) of `src`."""
        self = cls.__new__(cls)
        self._select(src, indices, seq_len, eos_id)
        return self

    def _select(self, src: TokenizedSource, indices, seq_len: int, eos_id: int):
        indices = np.asarray(indices, dtype=np.int64)
        self.src, self.seq_len, self.eos_id = src, seq_len, eos_id
        self.starts = src.offsets[indices]
        self.n = np.minimum(src.offsets[indices + 1] - self.starts, seq_len)
        self.labels = src.arrays["label"][indices]
        self.lengths = np.maximum(self.n, 1)  # an empty text is one eos; the trainer batches similar lengths

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        s, n = int(self.starts[i]), int(self.n[i])
        return self.src.tokens[s:s + n].tolist() or [self.eos_id], int(self.labels[i])

    def byte_fragments(self, tokenizer) -> tuple[int, int]:
        """(byte fragments, tokens) over the inputs, as `tokenizer.count_byte_fragments` counts them."""
        empty = int((self.n == 0).sum())
        return (fragments_in_spans(tokenizer.is_byte_fragment, self.src.tokens, self.starts, self.n)
                + empty * int(tokenizer.is_byte_fragment[self.eos_id]), int(self.lengths.sum()))


def classify_collate(pad_id: int):
    def collate(items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        T = max(len(x) for x, _ in items)
        tokens = torch.full((len(items), T), pad_id, dtype=torch.long)
        for b, (x, _) in enumerate(items):
            tokens[b, :len(x)] = torch.tensor(x)
        return {"input_ids": tokens, "lengths": torch.tensor([len(x) for x, _ in items]),
                "labels": torch.tensor([y for _, y in items])}
    return collate

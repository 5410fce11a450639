"""Pretraining data on disk: memmapped shards of token ids (`data/<name>/{train,val}_NNN.bin` + `meta.json`).

Layout as nanoGPT's `train.bin` (raw uint16 ids, documents joined by eos), split into shards of bounded size with a
`meta.json` that records the tokenizer (path, sha256, vocab), the dtype and per-shard token/document/byte counts;
it is written last with `"complete": true`, so an interrupted `tools/prepare_data.py` (llm/prepare.py) never
looks finished. `read_meta` checks a data dir before any use; `split_tokens` reads a split's first tokens.

`PretrainDataset` reads fixed windows of seq_len+1 tokens from the virtual concatenation of all shards through
`np.memmap` (no shard is ever read whole). Window order is a permutation drawn from (seed, epoch) and rank r of
world_size takes every world_size-th window: a resumed run gets the same sample at the same index, and ranks
never share a window.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from llm.errors import UserError

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
META = "meta.json"


def dtype_for_vocab(vocab_size: int) -> str:
    if vocab_size <= np.iinfo(np.uint16).max + 1:
        return "uint16"
    if vocab_size <= np.iinfo(np.uint32).max + 1:
        return "uint32"
    raise UserError(f"vocab_size={vocab_size} does not fit in uint32 token ids — use a smaller tokenizer")


def read_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a prepared data dir, checked: complete, known dtype, every shard present with the size its
    token count implies."""
    d = Path(data_dir)
    f = d / META
    if not f.is_file():
        partial = any(d.glob("*.bin")) or any(d.parent.glob(f".{d.name}.tmp-*"))
        what = "is not complete (an interrupted run?)" if partial else "does not exist"
        raise UserError(f"{f}: missing — {d} {what}; build it with `python tools/prepare_data.py --out {d} ...`")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f}:{e.lineno}: invalid JSON ({e.msg}) — re-run tools/prepare_data.py --overwrite") \
            from None
    if not meta.get("complete"):
        raise UserError(f"{f}: \"complete\" is not true (an interrupted run) — re-run "
                        "tools/prepare_data.py --overwrite")
    for key in ("vocab_size", "dtype", "splits", "eos_id"):
        if key not in meta:
            raise UserError(f"{f}: field {key!r} missing — re-run tools/prepare_data.py --overwrite")
    if meta["dtype"] not in DTYPES:
        raise UserError(f"{f}: dtype {meta['dtype']!r} is not one of {', '.join(DTYPES)}")
    if meta["vocab_size"] > np.iinfo(DTYPES[meta["dtype"]]).max + 1:
        raise UserError(f"{f}: vocab_size {meta['vocab_size']} does not fit dtype {meta['dtype']} — re-run "
                        "tools/prepare_data.py --overwrite (it picks uint32 for vocabularies above 65,536)")
    itemsize = np.dtype(DTYPES[meta["dtype"]]).itemsize
    for split, info in meta["splits"].items():
        for sh in info["shards"]:
            p = d / sh["file"]
            if not p.is_file():
                raise UserError(f"{p}: shard listed in {f} (split {split!r}) is missing — re-run "
                                "tools/prepare_data.py --overwrite")
            size = p.stat().st_size
            if size % itemsize:
                raise UserError(f"{p}: {size} bytes is not a multiple of {meta['dtype']} ({itemsize} bytes) — the "
                                "shard is truncated or not a token file; re-run tools/prepare_data.py --overwrite")
            if size // itemsize != sh["tokens"]:
                raise UserError(f"{p}: holds {size // itemsize} tokens but {f} says {sh['tokens']} — meta.json does "
                                "not match the shards; re-run tools/prepare_data.py --overwrite")
    return meta


def check_tokenizer(meta: dict, vocab_size: int, tokenizer=None, data_dir: str | os.PathLike = "the data dir"):
    """Raise UserError when shards made with one tokenizer are about to train a model with another."""
    where = Path(data_dir) / META
    if meta["vocab_size"] > vocab_size:
        raise UserError(f"{where}: shards were tokenized with a {meta['vocab_size']}-token vocabulary but the model "
                        f"has vocab_size={vocab_size} — set the model's vocab_size to at least {meta['vocab_size']} "
                        "or re-run tools/prepare_data.py with the model's tokenizer")
    if tokenizer is None:
        return
    if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != tokenizer.sha256:
        raise UserError(f"{where}: shards were made with tokenizer {meta.get('tokenizer')} (sha256 "
                        f"{meta['tokenizer_sha256'][:12]}) but the model uses {tokenizer.path} (sha256 "
                        f"{tokenizer.sha256[:12]}) — re-run `python tools/prepare_data.py --tokenizer "
                        f"{tokenizer.path} --out {Path(data_dir)} --overwrite` or use the matching tokenizer")
    if meta["vocab_size"] != tokenizer.vocab_size or meta["eos_id"] != tokenizer.eos_id:
        raise UserError(f"{where}: vocab_size/eos_id {meta['vocab_size']}/{meta['eos_id']} differ from the "
                        f"tokenizer's {tokenizer.vocab_size}/{tokenizer.eos_id} ({tokenizer.path}) — re-run "
                        "tools/prepare_data.py with this tokenizer")


class Shards:
    """The shards of one split as one virtual array of `tokens` token ids, read a slice at a time through np.memmap
    (no shard is ever read whole)."""

    def __init__(self, data_dir: Path, meta: dict, split: str):
        shards = [sh for sh in meta["splits"][split]["shards"] if sh["tokens"] > 0]
        self.files = [str(data_dir / sh["file"]) for sh in shards]
        self.starts = np.concatenate([[0], np.cumsum([sh["tokens"] for sh in shards])]).astype(np.int64)
        self.tokens = int(self.starts[-1])  # the global offset of each shard, then the total
        self.dtype = DTYPES[meta["dtype"]]
        self._maps = None

    def read(self, start: int, n: int) -> np.ndarray:
        """n tokens from global offset `start` (memmap slices of one or more shards)."""
        if self._maps is None:  # opened lazily so that DataLoader workers each open their own maps
            self._maps = [np.memmap(f, dtype=self.dtype, mode="r") for f in self.files]
        parts, end = [], start + n
        s = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            lo = start - self.starts[s]
            hi = min(end, self.starts[s + 1]) - self.starts[s]
            parts.append(self._maps[s][lo:hi])
            start += hi - lo
            s += 1
        if len(parts) == 1:
            return np.array(parts[0])
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def __getstate__(self):  # memmaps are opened again in the receiving process
        return {**self.__dict__, "_maps": None}


def split_tokens(data_dir: str | os.PathLike, split: str, max_tokens: Optional[int] = None,
                 vocab_size: Optional[int] = None, tokenizer=None) -> tuple[np.ndarray, int]:
    """(int64 token ids, UTF-8 bytes they encode) of the first `max_tokens` tokens of `split` of a prepared data
    dir, checked by `read_meta` (and `check_tokenizer` when `vocab_size` is given). A prefix's bytes are the
    split's average bytes per token times its length."""
    d = Path(data_dir)
    meta = read_meta(d)
    if vocab_size is not None:
        check_tokenizer(meta, vocab_size, tokenizer, d)
    if split not in meta["splits"]:
        raise UserError(f"{d / META}: no split {split!r} (have {', '.join(meta['splits'])})")
    info = meta["splits"][split]
    shards = Shards(d, meta, split)
    n = shards.tokens if max_tokens is None else min(max_tokens, shards.tokens)
    ids = shards.read(0, n).astype(np.int64)
    return ids, info["bytes"] if n == shards.tokens else round(info["bytes"] * n / max(shards.tokens, 1))


class PretrainDataset(torch.utils.data.Dataset):
    """Windows (x, y) of `seq_len` tokens (y = x shifted by one) over all shards of `split` in `data_dir`.

    Window w covers global tokens [w*seq_len, w*seq_len + seq_len + 1) of the shards' concatenation (a window may
    straddle two shards). Index i of rank r in epoch e is window perm(seed, e)[i*world_size + r]; every rank gets
    the same number of windows (the remainder of the permutation is dropped for the epoch).
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, vocab_size: Optional[int] = None, tokenizer=None):
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        if vocab_size is not None or tokenizer is not None:
            check_tokenizer(self.meta, vocab_size if vocab_size is not None else tokenizer.vocab_size, tokenizer,
                            self.data_dir)
        if split not in self.meta["splits"] or not self.meta["splits"][split]["shards"]:
            raise UserError(f"{self.data_dir / META}: no {split!r} split — prepare it with tools/prepare_data.py "
                            "(--val_fraction > 0 for a validation split)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.split, self.seq_len, self.seed, self.rank, self.world_size = split, seq_len, seed, rank, world_size
        self.shards = Shards(self.data_dir, self.meta, split)
        self.tokens = self.shards.tokens
        self.n_windows = (self.tokens - 1) // seq_len if self.tokens else 0
        if self.n_windows < world_size:
            raise UserError(f"{self.data_dir / META}: split {split!r} has {self.tokens} tokens, fewer than "
                            f"{world_size} window(s) of seq_len+1={seq_len + 1} — lower seq_len or add data")
        info = self.meta["splits"][split]
        self.bytes_per_token = info["bytes"] / max(info["tokens"], 1)
        self.epoch = 0
        self._perm = None

    def set_epoch(self, epoch: int):
        if epoch != self.epoch:
            self.epoch, self._perm = epoch, None

    def __len__(self) -> int:
        return self.n_windows // self.world_size

    def window(self, i: int) -> int:
        """Global window number of this rank's index i in the current epoch."""
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
        return int(self._perm[i * self.world_size + self.rank])

    def read(self, start: int, n: int) -> np.ndarray:
        """n tokens from global offset `start` of the split."""
        return self.shards.read(start, n)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        w = self.read(self.window(i) * self.seq_len, self.seq_len + 1).astype(np.int64)  # (seq_len+1,)
        t = torch.from_numpy(w)
        return t[:-1], t[1:]

    def unigram_entropy(self, max_tokens: int = 50_000_000) -> float:
        """Entropy in nats/token of the split's token frequencies (its first `max_tokens`): the loss of a model
        that ignores context — a trained model's val loss must end clearly below it."""
        counts = np.bincount(self.read(0, min(self.tokens, max_tokens)).astype(np.int64))
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def __getstate__(self):  # the permutation is rebuilt in the receiving process
        return {**self.__dict__, "_perm": None}

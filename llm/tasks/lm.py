"""Language modelling: next-token loss on pretraining shards (every token) or on chats (assistant tokens only,
packed, optionally mixed with replayed pretraining windows), the task behind llm/pretrain.py and full fine-tuning in
llm/sft.py."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.errors import UserError
from llm.model import Transformer
from llm.hf_format import TRAINING_DATA_FILE, recorded_training_data
from llm.train import Split, Task, TrainConfig, dist
from llm.train.sampler import Replay


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross entropy over labels != -100; optional `position_ids` (B, T) and `mask` (a bool
    (B, 1, T, T) mask, or packed documents' (B, T) indices) in the batch are passed to the model (SFT batches)."""
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"), mask=batch.get("mask"))  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)


def collate_windows(items: list) -> dict[str, torch.Tensor]:
    """(x, y) windows of PretrainDataset -> {"input_ids": (B, T), "labels": (B, T)}."""
    xs, ys = zip(*items)
    return {"input_ids": torch.stack(xs), "labels": torch.stack(ys)}


def cut_at_stop(tokens: list[int], stop_ids) -> list[int]:
    """`tokens` up to (without) the first stop id: what generate() returns when it stops there itself."""
    stops = set(stop_ids)
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


class LanguageModelTask(Task):
    """Train a `Transformer` (whole) on next-token prediction; final/ is a Hugging Face Llama directory."""

    def __init__(self, model: Transformer, train_split: Split, val_split: Optional[Split], tokenizer=None,
                 collate=collate_windows, data: Optional[str] = None, extra_val: Optional[dict[str, Split]] = None):
        self.model, self.train_split, self.val_split = model, train_split, val_split
        self.tokenizer, self._collate, self.data = tokenizer, collate, data
        self.extra_val = extra_val or {}

    def collate(self, items):
        return self._collate(items)

    def extra_val_splits(self) -> dict[str, Split]:
        return self.extra_val

    def loss(self, model, batch):
        return lm_loss(model, batch)

    def transformer(self, module: nn.Module) -> Transformer:
        """The Transformer inside the engine's module (generation needs its cache methods)."""
        return module

    def flops_per_token(self, seq_len: int) -> float:
        return self.transformer(self.model).args.flops_per_token(seq_len)

    def record(self) -> dict:
        return {"model_config": self.transformer(self.model).args.to_hf_config(),
                "tokenizer": getattr(self.tokenizer, "path", None)}

    def samples(self, module: nn.Module, cfg: TrainConfig, same_length: bool) -> dict[str, str]:
        """Continuations of the prompts (sampled with a fixed seed, the same on every rank, or greedy). With
        `same_length` no rank stops early at a stop id; the text is cut there afterwards."""
        if self.tokenizer is None:
            return {}
        from llm.generate import generate

        tok = self.tokenizer
        prompts = [tok.encode(p, bos=tok.bos_id is not None) for p in cfg.sample_prompts]
        outs = generate(self.transformer(module), prompts, cfg.sample_tokens, temperature=cfg.sample_temperature,
                        top_k=50 if cfg.sample_temperature > 0 else None, seed=cfg.seed,
                        stop_ids=() if same_length else tok.stop_ids, truncate=True, compile=False)
        outs = [cut_at_stop(o, tok.stop_ids) for o in outs]
        return {p: tok.decode_complete(o) for p, o in zip(cfg.sample_prompts, outs)}  # no cut-off character

    def export(self, state_dict, final: Path, dtype):
        from llm.hf_format import save_model

        save_model(self.transformer(self.model), final, tokenizer=self.tokenizer, state_dict=state_dict, dtype=dtype,
                   extra_files=self.training_data_record())

    def training_data_record(self) -> dict[str, str]:
        """final/training_data.json: what the model was trained on (`--data`, paths absolute), which quantization
        calibrates on by default (llm.quant.recorded_data)."""
        if self.data is None:
            return {}
        spec = self.data if self.data.startswith("builtin:") else str(Path(self.data).resolve())
        return {TRAINING_DATA_FILE: json.dumps({"data": spec}, ensure_ascii=False) + "\n"}


def shard_splits(data: str, seq_len: int, seed: int, vocab_size: int, tokenizer, val_data: Optional[str] = None,
                 world_size: Optional[int] = None) -> tuple[Split, Optional[Split]]:
    """Windows of `seq_len` tokens from a prepared data dir (tools/prepare_data.py), this rank's shard; the val
    split from `val_data` or the same dir (None when it has none)."""
    from llm.data import PretrainDataset

    rank, world = dist.rank(), world_size or dist.world_size()

    def split(path: str, name: str) -> Split:
        ds = PretrainDataset(path, name, seq_len, seed, rank, world, vocab_size, tokenizer)
        return Split(ds, sharded=True, bytes_per_token=ds.bytes_per_token, seq_len=seq_len)

    train = split(data, "train")
    if val_data is None and not train.dataset.meta["splits"].get("val", {}).get("shards"):
        dist.log(f"warning: {data} has no val split — no evaluation")
        return train, None
    return train, split(val_data or data, "val")


def chat_splits(data: str, val_data: Optional[str], tokenizer, seq_len: int, pack: bool, truncate: bool,
                val_fraction: float, max_examples: Optional[int], seed: int):
    """(train split, val split, collate, sample prompts) for chats: tokenized once per data file and tokenizer,
    then memory-mapped (llm/sft_cache.py); packed into `seq_len` sequences or padded per batch."""
    from llm.chat import render
    from llm.sft_cache import tokenized_chats
    from llm.sft_data import SFTCollator, SFTDataset

    if tokenizer is None:
        raise UserError(f"{data}: chat data needs the model's tokenizer, and the model directory has none")
    src = tokenized_chats(tokenizer, data)
    val_src = tokenized_chats(tokenizer, val_data) if val_data else src
    train_idx = src.select("train" if val_data is None else None, val_fraction)
    val_idx = val_src.select(None) if val_data else src.select("val", val_fraction)
    if max_examples is not None and max_examples < len(train_idx):  # a random subset, the same on every rank
        train_idx = train_idx[random.Random(seed).sample(range(len(train_idx)), max_examples)]
    train_ds = SFTDataset.from_tokenized(src, train_idx, seq_len, pack, truncate)
    val_ds = SFTDataset.from_tokenized(val_src, val_idx, seq_len, pack, truncate) if len(val_idx) else None
    dist.log(f"{data}: {train_ds.n_examples} training examples in {len(train_ds)} sequences of <= {seq_len} tokens"
             f"{' (packed)' if pack else ''}; {train_ds.skipped} skipped, {train_ds.truncated} truncated (longer "
             f"than seq_len{'' if truncate else '; --truncate keeps their beginning'}); "
             f"{val_ds.n_examples if val_ds else 0} held out")
    if dist.is_main() and (warning := tokenizer.coverage_warning(*train_ds.byte_fragments(tokenizer), data)):
        print(warning)  # counted on rank 0 only: every rank holds the same examples
    first = val_src.chats(val_idx[:2]) if len(val_idx) else src.chats(train_idx[:2])
    prompts = [render([m for m in c if m["role"] != "assistant"][:1], add_generation_prompt=True) for c in first]

    def split(ds):
        return Split(ds, lengths=None if pack else ds.lengths, seq_len=seq_len) if ds is not None else None

    return split(train_ds), split(val_ds), SFTCollator(tokenizer.pad_or_eos, seq_len, packed=pack), prompts


def recorded_data_dir(model_dir: str) -> Optional[str]:
    """The prepared data dir `model_dir` was trained on, as its final/training_data.json records it (None when it
    records none, or a built-in source, or a dir that is not here)."""
    spec = recorded_training_data(model_dir)
    return spec if spec is not None and (Path(spec) / "meta.json").is_file() else None


def replay_splits(model_dir: str, share: float, data: Optional[str], seq_len: int, seed: int, vocab_size: int,
                  tokenizer) -> tuple[Optional[Replay], dict[str, Split]]:
    """Pretraining text during SFT: (the `share` of training positions given to windows of `seq_len` tokens of
    `data` — default: the data the base model records — or None, {"pretrain": its val split} or {}). Nothing
    without a share or `data`."""
    from llm.data import PretrainDataset, read_meta
    from llm.sft_data import WindowItems

    if not 0 <= share < 1:
        raise UserError(f"--replay {share}: the share of training sequences must be in [0, 1)")
    if share == 0 and data is None:
        return None, {}
    data = data or recorded_data_dir(model_dir)
    if data is None:
        raise UserError(f"--replay {share}: {model_dir} records no pretraining data dir here ({TRAINING_DATA_FILE})"
                        " — pass --replay_data DIR (a tools/prepare_data.py dir)")
    rank, world = dist.rank(), dist.world_size()

    def windows(split: str) -> PretrainDataset:
        return PretrainDataset(data, split, seq_len, seed, rank, world, vocab_size, tokenizer)

    replay = Replay(WindowItems(windows("train")), share) if share > 0 else None
    val = {}
    if read_meta(data)["splits"].get("val", {}).get("shards"):
        ds = windows("val")
        val["pretrain"] = Split(WindowItems(ds), sharded=True, bytes_per_token=ds.bytes_per_token, seq_len=seq_len)
    dist.log(f"{data}: {f'{share:.0%} of training sequences are its windows of {seq_len} tokens; ' if replay else ''}"
             f"{'its val split is evaluated as val_pretrain_loss' if val else 'no val split: no val_pretrain_loss'}")
    return replay, val

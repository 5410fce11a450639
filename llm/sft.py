"""Supervised fine-tuning of any Hugging Face Llama directory: full, LoRA (peft) or LongLoRA (LoRA + trainable
embeddings/norms + S²-Attn, RoPE scaling to extend the context), on the one training loop (llm/train/; tasks in
llm/tasks/lm.py and llm/tasks/lora.py).

    deepspeed --num_gpus 2 llm/sft.py --model runs/demo/final --data builtin:idioms --mode lora \\
        --train.run_dir runs/sft-idioms --train.ds_config zero2
    python llm/sft.py --config configs/sft/longlora-demo.yaml     # context 256 -> 1024 with YaRN + LongLoRA

Data: chats (jsonl `{"messages": [...]}` or `{"instruction", "input", "output"}`, or builtin:chatterbot /
idioms / chitchat), loss on assistant tokens only, packed by default; or a prepared pretraining data dir
(tools/prepare_data.py) for plain language modelling, which is what context extension trains on.

Output in run_dir: final/ (a Hugging Face directory, LoRA merged), adapter/ (the peft adapter; for LongLoRA also
the trained embeddings/norms and the RoPE extension), checkpoints/ to resume.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal, Optional

from llm.cli import defaults_from, run_cli
from llm.errors import UserError
from llm.tasks.lora import LongLoraOptions, LoraOptions
from llm.train import TrainConfig, dist, fit, preflight

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs/sft/defaults.yaml"


@defaults_from(DEFAULT_CONFIG)
def main(model: str, data: str, train: TrainConfig = TrainConfig(), mode: Literal["full", "lora", "longlora"] = "full",
         val_data: Optional[str] = None, seq_len: Optional[int] = None, pack: bool = True, truncate: bool = False,
         val_fraction: float = 0.05, max_examples: Optional[int] = None, replay: float = 0.0,
         replay_data: Optional[str] = None, lora: LoraOptions = LoraOptions(),
         longlora: LongLoraOptions = LongLoraOptions()) -> dict:
    """Fine-tune a Hugging Face Llama directory on chats (or plain text) with the shared DeepSpeed trainer; returns
    the run's summary.

    Args:
        model: Hugging Face Llama directory (ours, converted from GGUF, or any LlamaForCausalLM save).
        data: chat jsonl ({"messages": [...]} or {"instruction", "input", "output"} per line), builtin:chatterbot,
            builtin:idioms, builtin:chitchat, or a data dir from tools/prepare_data.py (plain language modelling).
        train: training settings (DeepSpeed config, batch, lr schedule, steps, run_dir, resume ...); on the
            command line the defaults are configs/sft/defaults.yaml's.
        mode: full (every weight), lora (adapters only) or longlora (adapters + embeddings + norms, S²-Attn).
        val_data: held-out chats (jsonl); default: a `val_fraction` of `data` split off by hash.
        seq_len: tokens per training sequence (default: the model's max positions, after any extension).
        pack: pack several chats into each sequence (examples never attend to each other).
        truncate: cut chats longer than seq_len instead of skipping them.
        val_fraction: share of the chats held out for validation when val_data is not given.
        max_examples: use only N training chats (drawn at random with train.seed).
        replay: share of training sequences that are pretraining windows (all tokens labelled), interleaved
            deterministically with the chats, so fine-tuning keeps the language the model learned (0 = none).
        replay_data: the pretraining data dir (tools/prepare_data.py) to replay, and whose val split each evaluation
            scores as val_pretrain_loss; default: the one the model records in training_data.json, if any.
        lora: LoRA rank/alpha/dropout/targets (modes lora and longlora).
        longlora: context extension factor, RoPE scaling type and S²-Attn group size (mode longlora).
    """
    from llm.hf_format import load_model, load_tokenizer
    from llm.longlora import enable_s2_attn, extend_context
    from llm.tasks.lm import LanguageModelTask, chat_splits, replay_splits, shard_splits
    from llm.tasks.lora import LoraTask
    from llm.tasks.zero3 import load_partitioned

    plan = preflight(train)  # a config error comes now, not after loading the model and tokenizing the data
    # Full fine-tuning under ZeRO-3 never holds the whole model on a rank; LoRA keeps the replicated base (peft's
    # adapters are built from whole Linear layers).
    base = load_partitioned(model, plan.ds_config) if plan.zero_stage == 3 and mode == "full" else load_model(model)
    tokenizer = load_tokenizer(model)
    if mode == "longlora":
        if longlora.context_factor is not None:
            old = base.args.max_seq_len
            extend_context(base, longlora.context_factor, longlora.rope_type)
            dist.log(f"context {old} -> {base.args.max_seq_len} ({base.args.rope_scaling.to_dict()})")
        elif base.args.rope_scaling is None:
            raise UserError(f"{model}: --mode longlora needs RoPE scaling — pass --longlora.context_factor 4 "
                            "(with --longlora.rope_type yarn|linear), or start from a model whose config.json "
                            "has rope_scaling")
        enable_s2_attn(base, longlora.group_size_ratio)
    seq_len = seq_len or base.args.max_seq_len
    if seq_len > base.args.max_seq_len:
        raise UserError(f"--seq_len {seq_len} exceeds the model's {base.args.max_seq_len} positions — lower it, or "
                        "extend the context with --mode longlora --longlora.context_factor")
    if (Path(data) / "meta.json").is_file() or (Path(data).is_dir() and not data.startswith("builtin:")):
        if replay or replay_data:
            raise UserError("--replay / --replay_data mix pretraining text into chat data; --data is text already")
        train_split, val_split = shard_splits(data, seq_len, train.seed, base.args.vocab_size, tokenizer, val_data)
        data_kw = dict(train_split=train_split, val_split=val_split, tokenizer=tokenizer, data=data)
    else:
        train_split, val_split, collate, prompts = chat_splits(data, val_data, tokenizer, seq_len, pack, truncate,
                                                               val_fraction, max_examples, train.seed)
        train_split.replay, extra_val = replay_splits(model, replay, replay_data, seq_len, train.seed,
                                                      base.args.vocab_size, tokenizer)
        data_kw = dict(train_split=train_split, val_split=val_split, tokenizer=tokenizer, collate=collate, data=data,
                       extra_val=extra_val)
        if mode == "longlora" and pack:
            dist.log("note: packed batches carry a block-diagonal mask and use full attention; S²-Attn applies to "
                     "unpacked sequences (--pack false)")
        if train.sample_prompts == TrainConfig().sample_prompts:
            # greedy answers to held-out questions at each evaluation (a copy: `train` may be a shared default)
            train = dataclasses.replace(train, sample_prompts=prompts, sample_temperature=0.0)
    base.gradient_checkpointing = train.activation_checkpointing  # on the Transformer, not a peft wrapper
    if mode == "full":
        task = LanguageModelTask(base, **data_kw)
    else:
        task = LoraTask(base, lora, str(Path(model).resolve()), mode == "longlora", Path(train.run_dir),
                        seed=train.seed, **data_kw)
    summary = fit(task, train)
    dist.log(json.dumps({k: v for k, v in summary.items() if k != "samples"}, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    run_cli(main)

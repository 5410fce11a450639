"""Fine-tuning data readiness: time and peak memory until `llm.tasks.lm.chat_splits` hands the trainer its datasets.

    python bench/sft_data.py [--n 100000] [--tokenizer PATH] [--workdir DIR]

Writes a chat jsonl of `--n` records (the built-in idiom and chitchat chats, repeated with numbered prompts, so
every record is its own and the split differs from the built-ins'), then runs `chat_splits` in a fresh process,
cold (no token cache: it tokenizes and writes one) and warm (the cache is there), and prints for each the seconds
(wall, and CPU in the process and in its tokenizing workers: the machine may be shared) and the peak RSS
(ru_maxrss) of that process and of its largest worker, next to its RSS after the imports. Without `--tokenizer` it
trains the small BPE of tests/test_sft.py (2,048 pieces with the ChatML tokens).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_chats(path: Path, n: int) -> int:
    from llm.sft_sources import load_chats

    pool = [c for _, c in load_chats("builtin:idioms", None)] + [c for _, c in load_chats("builtin:chitchat", None)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            chat = [dict(m) for m in pool[i * 7919 % len(pool)][:6]]  # a stride through both; <= 3 turns
            chat[0]["content"] = f"{i}. {chat[0]['content']}"
            f.write(json.dumps({"messages": chat}, ensure_ascii=False) + "\n")
    return path.stat().st_size


def train_tokenizer(prefix: Path) -> Path:
    import sentencepiece as spm

    from llm.sft_sources import load_chats

    texts = [m["content"] for _, c in load_chats("builtin:chatterbot") for m in c]
    texts += [m["content"] for _, c in load_chats("builtin:idioms")[:3000] for m in c]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=2048, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    return prefix.with_suffix(".model")


def measure(data: str, tokenizer: str, seq_len: int) -> dict:
    """chat_splits in this process (run as a child): seconds, RSS after imports, peak RSS (MB)."""
    import llm
    from llm.tasks.lm import chat_splits
    from llm.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, cpu0 = time.perf_counter(), sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    train, val, collate, _ = chat_splits(data, None, tok, seq_len, True, False, 0.05, None, 0)
    collate([train.dataset[0], train.dataset[len(train.dataset) - 1]])  # the first batch is ready
    seconds = time.perf_counter() - t0
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": round(seconds, 2), "cpu_seconds": round(own.ru_utime + own.ru_stime - cpu0, 2),
            "worker_cpu_seconds": round(kids.ru_utime + kids.ru_stime, 2), "rss_after_imports_mb": round(base),
            "peak_rss_mb": round(own.ru_maxrss / 1024), "worker_peak_rss_mb": round(kids.ru_maxrss / 1024),
            "examples": train.dataset.n_examples, "sequences": len(train.dataset), "llm": str(Path(llm.__file__).parent)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="chats in the generated jsonl")
    ap.add_argument("--tokenizer", help="a tokenizer.model / tokenizer.json with the ChatML tokens")
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--runs", nargs="+", default=["cold", "warm"], help="cold (no cache), warm (cached)")
    ap.add_argument("--workdir", help="keep the jsonl (and its cache) here instead of a temporary directory")
    ap.add_argument("--child", nargs=3, metavar=("DATA", "TOKENIZER", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], int(args.child[2]))))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sft-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"chats-{args.n}.jsonl"
    if not data.is_file():
        print(f"{data}: {make_chats(data, args.n) / 1e6:.1f} MB, {args.n} chats")
    tokenizer = args.tokenizer or str(work / "tokenizer.model")
    if not Path(tokenizer).is_file():
        train_tokenizer(work / "tokenizer")
    for run in args.runs:
        if run == "cold":
            shutil.rmtree(f"{data}.cache", ignore_errors=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(data), tokenizer, str(args.seq_len)],
                             check=True, capture_output=True, text=True).stdout
        print(run, out.strip().splitlines()[-1])
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

"""Decoding speed: llm.generate (static KV cache, compiled decode step, gpt-fast style) vs transformers' `generate`.

    python bench/generate.py [--model DIR | --preset cpu-demo] [--new_tokens 256] [--batch_sizes 1 8] [--repeats 3]

Greedy, `--new_tokens` new tokens (no early stop), prompts of `--prompt_len` tokens. Without --model the weights
are a random model of `--preset` (context 1024) saved as a HF directory (transformers loads the very same tensors);
with --model, e.g. SmolLM2-135M converted from GGUF. Ours runs with the compiled one-token decode step (what
`compile="auto"` picks from 4,096 decoded tokens on; compilation happens in the untimed warm-up and is reported
apart) and eagerly; transformers at its defaults (dynamic cache, eager). Interleaved repeats, medians, tokens/s =
batch x new tokens / wall time of the whole call (prefill included). Then ours with and without the KV cache
(fewer tokens: uncached decoding is quadratic). Last line `ratio: X.XX` = ours (compiled) over transformers'
tokens/s, geometric mean over the batch sizes.
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch

from llm.config import ModelArgs
from llm.generate import generate
from llm.hf_format import load_model, save_model
from llm.model import Transformer


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF Llama directory (default: a random model of --preset)")
    ap.add_argument("--preset", default="cpu-demo", help="model preset when no --model is given")
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--uncached_tokens", type=int, default=64)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            torch.manual_seed(0)
            model_args = ModelArgs.from_preset(args.preset, max_seq_len=1024)
            path = str(save_model(Transformer(model_args), f"{tmp}/{args.preset}"))
        ours = load_model(path)
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # run all new tokens, as ours does without stop ids
    ref.generation_config.pad_token_id = 0
    print(f"model {args.model or args.preset + ' (random)'}: {ours.args.n_params / 1e6:.1f}M params, "
          f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens, prompt {args.prompt_len} tokens")

    g = torch.Generator().manual_seed(0)
    ratios = []
    for bs in args.batch_sizes:
        prompts = torch.randint(3, ours.args.vocab_size, (bs, args.prompt_len), generator=g)
        n = args.new_tokens

        def run_ours():
            return generate(ours, prompts.tolist(), n, compile=True)

        def run_eager():
            return generate(ours, prompts.tolist(), n, compile=False)

        def run_ref():
            with torch.no_grad():
                return ref.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                    do_sample=False)[:, args.prompt_len:].tolist()

        compile_s = timed(run_ours)  # the warm-up: compiles the decode step for this batch size
        same = run_ours() == run_ref() == run_eager()
        if not same:
            print(f"note: batch {bs}: greedy outputs differ (a near-tie in float32 arithmetic)")
        times = {"ours": [], "eager": [], "ref": []}
        for _ in range(args.repeats):
            for name, fn in (("ours", run_ours), ("eager", run_eager), ("ref", run_ref)):
                times[name].append(timed(fn))
        tps = {k: bs * n / statistics.median(v) for k, v in times.items()}
        ratios.append(tps["ours"] / tps["ref"])
        print(f"batch {bs}: ours {tps['ours']:8.1f} tok/s (compiled; first call {compile_s:.1f} s)   ours eager "
              f"{tps['eager']:8.1f} tok/s   transformers {tps['ref']:8.1f} tok/s   ratio {ratios[-1]:.2f} "
              f"(eager {tps['eager'] / tps['ref']:.2f})")

    prompts = torch.randint(3, ours.args.vocab_size, (1, args.prompt_len), generator=g).tolist()
    n = args.uncached_tokens
    cached, uncached = [], []
    for _ in range(args.repeats):
        cached.append(timed(lambda: generate(ours, prompts, n, compile=False)))
        uncached.append(timed(lambda: generate(ours, prompts, n, use_cache=False)))
    print(f"batch 1, {n} new tokens: cached {n / statistics.median(cached):.1f} tok/s, "
          f"uncached {n / statistics.median(uncached):.1f} tok/s "
          f"({statistics.median(uncached) / statistics.median(cached):.2f}x)")
    print(f"ratio: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}")


if __name__ == "__main__":
    main()

"""Quantize a model directory to 2/3/4/8-bit GPTQ (or round-to-nearest) and report what it costs.

    python tools/quantize.py                      # newest runs/*/final, 4-bit, group 128 (or the largest that fits)
    python tools/quantize.py --model DIR --out DIR --bits 4 --group_size 64 --calib builtin:shakespeare
    python tools/quantize.py --model DIR --method rtn   # the round-to-nearest baseline, same bits and groups

GPTQ (Frantar et al. 2022, arXiv 2210.17323) through GPTQModel, on CPU or GPU, calibrated on windows of text like the
model's, cut with its tokenizer
(llm/quant.py): without --calib, the data it was trained on as its directory records it (`training_data.json`: for
an SFT model its chats, rendered with the chat template as it saw them), else built-in text in its tokenizer's
language (English: Shakespeare, Chinese: People's Daily, both: builtin:demo); the report's held-out text is the
validation split of the same source. The output is a standard GPTQ directory
(qweight/qzeros/scales/g_idx + quantization_config + the original tokenizer files) that transformers (+optimum),
vLLM and our own load_model / tools/chat.py / tools/eval.py load. Written next to it, `report.json`: size on disk,
time taken, and perplexity / bits per byte of the original and the quantized model on held-out text
(llm.evaluate, the same measure as `tools/eval.py ppl`), printed as a table.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

from llm.cli import run_cli
from llm.errors import UserError
from llm import writer
from llm.quant import (calibration_samples, check_shapes, check_source, default_calibration, dir_size,
                       fitting_group_size, is_chat_source, newest_run_model, print_table, quality, quantize,
                       text_tokens)
from llm.tokenizer import Tokenizer


def main(model: Optional[str] = None, out: Optional[str] = None, method: Literal["gptq", "rtn"] = "gptq",
         bits: int = 4, group_size: Optional[int] = None, desc_act: bool = False, sym: bool = False,
         calib: Optional[str] = None, n_samples: int = 128, seq_len: int = 512, damp_percent: float = 0.05,
         eval_data: Optional[str] = None, eval_tokens: int = 8192, eval_ctx: int = 512,
         device: str = "auto", seed: int = 0, overwrite: bool = False) -> dict:
    """Quantize the decoder Linears of a model directory and compare it with the original.

    Args:
        model: Hugging Face Llama directory to quantize (default: the newest runs/*/final).
        out: output directory (default: MODEL-METHOD-wBITSgGROUP next to the model).
        method: gptq (error-compensating, needs calibration text) or rtn (round to nearest, the baseline).
        bits: bits per weight: 2, 3, 4 or 8.
        group_size: input features sharing one scale/zero (-1: one group per row). Must divide every Linear's
            in-features; default 128, or the largest power of two below it that divides them.
        desc_act: quantize columns in order of decreasing activation (GPTQ's act-order, g_idx permuted); false:
            GPTQModel's act-group-aware order, which keeps each group's columns together (on SmolLM2 w4 g64 it
            measured better: +13.8% perplexity with act-order against +11.8-12.6% without).
        sym: symmetric quantization (zero point fixed at the middle of the grid), for kernels that need it;
            the default asymmetric zero points cost less quality (SmolLM2 4-bit g64: +9.8% ppl against +12.6%).
        calib: calibration text: builtin:NAME, a data dir from tools/prepare_data.py, a .txt file, or chats (a
            jsonl or builtin:idioms/chatterbot/chitchat, rendered with the chat template). Default: the training
            data the model directory records (training_data.json), else built-in text in the model's language.
        n_samples: calibration windows.
        seq_len: tokens per calibration window.
        damp_percent: GPTQ's Hessian dampening, as a fraction of its mean diagonal.
        eval_data: held-out text for the report (default: the validation split of --calib).
        eval_tokens: tokens of eval_data scored for the report (0 skips the evaluation).
        eval_ctx: context length of the perplexity windows (they advance by half of it).
        device: cpu, cuda, or auto (cuda when available).
        seed: seed of the calibration window draw.
        overwrite: replace --out when it holds an earlier GPTQ output of this toolkit (a directory the toolkit
            did not make, or of another kind, is never replaced).
    """
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model_dir = Path(model) if model else newest_run_model()
    where = str(model_dir / "config.json")
    # ---- every check before any work
    args, _ = check_source(model_dir)
    if group_size is None:
        group_size = fitting_group_size(args, 128)
    check_shapes(args, bits, group_size, where)
    out_dir = Path(out) if out else model_dir.with_name(f"{model_dir.name}-{method}-w{bits}g{group_size}")
    # --overwrite replaces only an earlier GPTQ output of this toolkit; the writer's message says which case it is
    writer.check_dir(out_dir, "gptq", [model_dir], overwrite, flag="--out")
    tok = Tokenizer.from_dir(model_dir)
    why = "--calib"
    if calib is None:
        calib, why = default_calibration(model_dir, tok)
    if method == "gptq":
        print(f"calibration text: {calib} ({why})")
    samples = None
    if seq_len > args.max_seq_len:
        print(f"note: --seq_len {seq_len} is longer than the model's context; calibrating with {args.max_seq_len}")
        seq_len = args.max_seq_len
    if method == "gptq":
        ids, _ = text_tokens(calib, tok, split="train", max_tokens=4 * n_samples * seq_len,
                             vocab_size=args.vocab_size, seed=seed)
        samples = calibration_samples(ids, n_samples, seq_len, seed, calib)
    held_out = eval_data or calib
    if eval_tokens > 0:
        eval_ids, eval_bytes = text_tokens(held_out, tok, split="val", max_tokens=eval_tokens,
                                           vocab_size=args.vocab_size)
        if len(eval_ids) < 2 * min(eval_ctx, args.max_seq_len):
            raise UserError(f"{held_out}: {len(eval_ids)} held-out tokens, fewer than two --eval_ctx windows — pass "
                            "longer --eval_data, or --eval_tokens 0 to skip the evaluation")
        if not (eval_data or calib.startswith("builtin:") or Path(calib).is_dir() or is_chat_source(calib)):
            print(f"note: {calib} has no held-out split; perplexity is measured on the calibration text itself "
                  "(pass --eval_data for held-out text)")
    # ---- work
    report = {"model": str(model_dir), "out": str(out_dir), "method": method, "bits": bits, "group_size": group_size,
              "desc_act": desc_act and method == "gptq", "sym": sym, "calib": calib if method == "gptq" else None,
              "calib_reason": why if method == "gptq" else None,
              "n_samples": n_samples if method == "gptq" else 0, "seq_len": seq_len, "device": device,
              "eval_data": held_out if eval_tokens > 0 else None}
    ctx = min(eval_ctx, args.max_seq_len)
    if eval_tokens > 0 and not is_chat_source(held_out):  # tools/eval.py ppl reads text and token shards
        # the same measurement, for either directory, from the command line:
        report["eval_command"] = (f"python tools/eval.py ppl --model DIR --source {held_out} --split val "
                                  f"--ctx_len {ctx} --stride {ctx // 2} --max_tokens {eval_tokens}")
    if eval_tokens > 0:
        report["original"] = quality(model_dir, eval_ids, eval_bytes, ctx, device)
    t0 = time.perf_counter()
    quantize(model_dir, out_dir, samples, method=method, bits=bits, group_size=group_size, desc_act=desc_act,
             sym=sym, damp_percent=damp_percent, device=device, overwrite=overwrite)
    report["quantize_seconds"] = round(time.perf_counter() - t0, 1)
    report["size_bytes"] = {"original": dir_size(model_dir), "quantized": dir_size(out_dir)}
    if eval_tokens > 0:
        report["quantized"] = quality(out_dir, eval_ids, eval_bytes, ctx, device)
        report["change"] = {k: report["quantized"][k] / report["original"][k] - 1 for k in ("ppl", "bpb")}
    writer.replace_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    print_table(report)
    return report


if __name__ == "__main__":
    # `timeout`/`kill` send SIGTERM: exit through SystemExit so the temporary output directory is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    run_cli(main)

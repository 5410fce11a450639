"""The table `bash run.sh` ends with: per stage its time, and per model its size, perplexity and bits per byte.

Optional files, shown when a stage wrote them: `<dir>/eval.json` ({"ppl", "bpb"}: tools/eval.py ppl --json),
`<dir>/mc.json` ({"acc"}: tools/eval.py mc --json; adds a column), `<dir>/samples.json` ({"samples": [{"prompt", "completion"}]}:
tools/generate.py --json; the answers are printed per question), for each of base, SFT run and 4-bit directory;
`<quant>/report.json` (tools/quantize.py: fp32 vs 4-bit perplexity) and `<sft>/summary.json` (the trainer's
`val_loss_at_start` / `val_loss`; else metrics.csv).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from llm.cli import run_cli
from llm.run_results import acc, answer_loss, load_json, ppl_bpb, samples, size


def summary(times: str, base: str, sft: str, quant: str, gguf: str,
            track: Literal["scratch", "smollm2"] = "scratch") -> None:
    """Print the pipeline's results.

    Args:
        times: TSV of stage and seconds written by run.sh (the last line of each stage counts).
        base: scratch: the pretraining run directory (final/, eval.json); smollm2: the model converted from the GGUF.
        sft: SFT run directory (final/ = LoRA merged, eval.json, summary.json, metrics.csv).
        quant: GPTQ output directory (eval.json, report.json).
        gguf: the GGUF file.
        track: which run.sh track made them (`--base`): names the rows and reads what that track writes.
    """
    seconds: dict[str, int] = {}
    if Path(times).is_file():
        for line in Path(times).read_text().splitlines():
            stage, _, s = line.partition("\t")
            if s.strip().isdigit():  # a line cut short by an interrupted run is left out
                seconds[stage] = int(s)
    base_d, sft_d, quant_d = Path(base), Path(sft), Path(quant)
    smol = track == "smollm2"
    evals = {"base": load_json(base_d / "eval.json"), "sft": load_json(sft_d / "eval.json"),
             "quant": load_json(quant_d / "eval.json")}
    report = load_json(quant_d / "report.json")
    if smol and isinstance(report, dict):  # quantize.py's own fp32 vs 4-bit measurement, when no eval.json says otherwise
        evals["sft"] = evals["sft"] or report.get("original")
        evals["quant"] = evals["quant"] or report.get("quantized")
    rows = [("SmolLM2-135M-Instruct (GGUF → HF)" if smol else "pretrained", base_d if smol else base_d / "final",
             "base", base_d),
            ("SFT (LoRA merged)", sft_d / "final", "sft", sft_d),
            ("GPTQ 4-bit", quant_d, "quant", quant_d),
            ("GGUF (f16)", Path(gguf), None, None)]
    mc = any((d / "mc.json").is_file() for *_, d in rows if d is not None)
    held_out = f" ({report['eval_data']})" if smol and isinstance(report, dict) and report.get("eval_data") else ""
    print(f"\n| model | path | size | val ppl{held_out} | val bits/byte |{' mc acc |' if mc else ''}")
    print(f"|---|---|---|---|---|{'---|' if mc else ''}")
    for name, path, key, d in rows:
        ppl, bpb = ppl_bpb(evals[key]) if key else ("-", "-")
        extra = f" {acc(d / 'mc.json') if d is not None else '-'} |" if mc else ""
        print(f"| {name} | {path} | {size(path)} | {ppl} | {bpb} |{extra}")
    try:
        change = float(evals["quant"]["ppl"]) / float(evals["sft"]["ppl"]) - 1
        print(f"\n4-bit vs fp32 perplexity: {float(evals['sft']['ppl']):.2f} → {float(evals['quant']['ppl']):.2f} "
              f"({change:+.1%})")
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    loss = answer_loss(sft_d)
    if loss:
        print(f"\nSFT held-out answer loss: {loss[0]:.3f} before → {loss[1]:.3f} after")
    try:  # what SFT costs the pretraining text (scratch: replay keeps it; the same val text for both)
        if not smol:
            ratio = float(evals["sft"]["ppl"]) / float(evals["base"]["ppl"])
            print(f"SFT model's perplexity on the pretraining val text: {ratio:.2f}x the pretrained model's")
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    answers = [(label, samples(d / "samples.json")) for label, d in
               (("base", base_d), ("SFT", sft_d), ("4-bit", quant_d))]
    questions = list(dict.fromkeys(q for _, a in answers for q in a))
    if questions:
        print("\nHeld-out questions, greedy answers:")
        for q in questions:
            print(f"\nQ: {q}")
            for label, a in answers:
                if q in a:
                    print(f"  {label + ':':7}{a[q][:300]}")
    print("\n| stage | seconds |\n|---|---|")
    for stage, s in seconds.items():
        print(f"| {stage} | {s} |")
    print(f"| total | {sum(seconds.values())} |")
    print(f"\nChat with the result:  .venv/bin/python tools/chat.py --model {sft_d / 'final'}")
    print(f"                 4-bit: .venv/bin/python tools/chat.py --model {quant_d}")


if __name__ == "__main__":
    run_cli(summary)

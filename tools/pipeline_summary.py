"""The table `bash run.sh` ends with: per stage its time, and per model its size, perplexity and bits per byte.

Optional files, shown when a stage wrote them: `<dir>/eval.json` ({"ppl", "bpb"}: tools/eval.py ppl --json),
`<dir>/mc.json` ({"acc"}: tools/eval.py mc --json; adds a column), `<dir>/samples.json` ([{"prompt", "completion"}]:
tools/generate.py --json; the answers are printed per question), for each of base, SFT run and 4-bit directory;
`<quant>/report.json` (tools/quantize.py: fp32 vs 4-bit perplexity) and `<sft>/summary.json` (the trainer's
`val_loss_at_start` / `val_loss`; else metrics.csv).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Literal, Optional

from llm.cli import run_cli


def _size(path: Path) -> str:
    if not path.exists():
        return "-"
    n = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{n / 2**20:.1f} MiB"


def _json(path: Path):
    """The parsed file, or None when it is missing or damaged (a damaged file shows as "?" where it is read)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (ValueError, OSError):
        return "damaged"


def _ppl_bpb(r) -> tuple[str, str]:
    if r is None:
        return "-", "-"
    try:
        return f"{float(r['ppl']):.2f}", f"{float(r['bpb']):.3f}" if r.get("bpb") is not None else "-"
    except (ValueError, KeyError, TypeError, AttributeError):
        return "?", "?"


def _eval(path: Path) -> tuple[str, str]:
    return _ppl_bpb(_json(path))


def _acc(path: Path) -> str:
    r = _json(path)
    if r is None:
        return "-"
    try:
        return f"{float(r['acc']):.1%}"
    except (ValueError, KeyError, TypeError):
        return "?"


def _val_losses(metrics_csv: Path) -> list[float]:
    if not metrics_csv.is_file():
        return []
    with metrics_csv.open() as f:
        rows = [r.get("val_loss") for r in csv.DictReader(f)]
    out = []
    for v in rows:
        try:
            out.append(float(v))
        except (TypeError, ValueError):  # no evaluation at that step, or a row cut short
            pass
    return out


def _answer_loss(sft_d: Path) -> Optional[tuple[float, float]]:
    """Held-out answer loss before and after SFT: summary.json's, else the first and last of metrics.csv."""
    s = _json(sft_d / "summary.json")
    try:
        return float(s["val_loss_at_start"]), float(s["val_loss"])
    except (KeyError, TypeError, ValueError):
        pass
    val = _val_losses(sft_d / "metrics.csv")
    return (val[0], val[-1]) if len(val) >= 2 else None


def _samples(path: Path) -> dict[str, str]:
    r = _json(path)
    try:
        return {str(x["prompt"]): " ".join(str(x["completion"]).split()) for x in r}
    except (KeyError, TypeError):
        return {}


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
    evals = {"base": _json(base_d / "eval.json"), "sft": _json(sft_d / "eval.json"),
             "quant": _json(quant_d / "eval.json")}
    report = _json(quant_d / "report.json")
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
        ppl, bpb = _ppl_bpb(evals[key]) if key else ("-", "-")
        extra = f" {_acc(d / 'mc.json') if d is not None else '-'} |" if mc else ""
        print(f"| {name} | {path} | {_size(path)} | {ppl} | {bpb} |{extra}")
    try:
        change = float(evals["quant"]["ppl"]) / float(evals["sft"]["ppl"]) - 1
        print(f"\n4-bit vs fp32 perplexity: {float(evals['sft']['ppl']):.2f} → {float(evals['quant']['ppl']):.2f} "
              f"({change:+.1%})")
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    loss = _answer_loss(sft_d)
    if loss:
        note = "" if smol else ("; the ppl above is on the pretraining text, which the SFT model has partly traded "
                                "for the chat task")
        print(f"\nSFT held-out answer loss: {loss[0]:.3f} before → {loss[1]:.3f} after{note}")
    answers = [(label, _samples(d / "samples.json")) for label, d in
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

"""The table `bash run.sh` ends with: per stage its time, and per model its size, perplexity and bits per byte."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from llm.cli import run_cli


def _size(path: Path) -> str:
    if not path.exists():
        return "-"
    n = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{n / 2**20:.1f} MiB"


def _eval(path: Path) -> tuple[str, str]:
    if not path.is_file():
        return "-", "-"
    try:  # a damaged or foreign eval.json shows as "?" rather than stopping the table
        r = json.loads(path.read_text())
        return f"{float(r['ppl']):.2f}", f"{float(r['bpb']):.3f}" if r.get("bpb") is not None else "-"
    except (ValueError, KeyError, TypeError, AttributeError):
        return "?", "?"


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


def summary(times: str, base: str, sft: str, quant: str, gguf: str) -> None:
    """Print the pipeline's results.

    Args:
        times: TSV of stage and seconds written by run.sh (the last line of each stage counts).
        base: pretraining run directory (final/, eval.json).
        sft: SFT run directory (final/ = LoRA merged, eval.json).
        quant: GPTQ output directory (eval.json).
        gguf: the GGUF file.
    """
    seconds: dict[str, int] = {}
    if Path(times).is_file():
        for line in Path(times).read_text().splitlines():
            stage, _, s = line.partition("\t")
            if s.strip().isdigit():  # a line cut short by an interrupted run is left out
                seconds[stage] = int(s)
    base_d, sft_d, quant_d = Path(base), Path(sft), Path(quant)
    rows = [("pretrained", base_d / "final", base_d / "eval.json"),
            ("SFT (LoRA merged)", sft_d / "final", sft_d / "eval.json"),
            ("GPTQ 4-bit", quant_d, quant_d / "eval.json"),
            ("GGUF (f16)", Path(gguf), None)]
    print("\n| model | path | size | val ppl | val bits/byte |\n|---|---|---|---|---|")
    for name, path, ev in rows:
        ppl, bpb = _eval(ev) if ev else ("-", "-")
        print(f"| {name} | {path} | {_size(path)} | {ppl} | {bpb} |")
    val = _val_losses(sft_d / "metrics.csv")
    if len(val) >= 2:
        print(f"\nSFT held-out answer loss (metrics.csv): {val[0]:.3f} before → {val[-1]:.3f} after; the ppl above is "
              "on the pretraining text, which the SFT model has partly traded for the chat task")
    print("\n| stage | seconds |\n|---|---|")
    for stage, s in seconds.items():
        print(f"| {stage} | {s} |")
    print(f"| total | {sum(seconds.values())} |")
    print(f"\nChat with the result:  .venv/bin/python tools/chat.py --model {sft_d / 'final'}")
    print(f"                 4-bit: .venv/bin/python tools/chat.py --model {quant_d}")


if __name__ == "__main__":
    run_cli(summary)

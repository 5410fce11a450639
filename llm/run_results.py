"""What the pipeline's stages wrote, read for run.sh's summary (tools/pipeline_summary.py): a missing file is None
(shown as "-"), a damaged one "damaged" (shown as "?"), never a traceback."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional


def size(path: Path) -> str:
    if not path.exists():
        return "-"
    n = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{n / 2**20:.1f} MiB"


def load_json(path: Path):
    """The parsed file, or None when it is missing or damaged (a damaged file shows as "?" where it is read)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (ValueError, OSError):
        return "damaged"


def ppl_bpb(r) -> tuple[str, str]:
    if r is None:
        return "-", "-"
    try:
        return f"{float(r['ppl']):.2f}", f"{float(r['bpb']):.3f}" if r.get("bpb") is not None else "-"
    except (ValueError, KeyError, TypeError, AttributeError):
        return "?", "?"


def acc(path: Path) -> str:
    r = load_json(path)
    if r is None:
        return "-"
    try:
        return f"{float(r['acc']):.1%}"
    except (ValueError, KeyError, TypeError):
        return "?"


def val_losses(metrics_csv: Path) -> list[float]:
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


def answer_loss(sft_d: Path) -> Optional[tuple[float, float]]:
    """Held-out answer loss before and after SFT: summary.json's, else the first and last of metrics.csv."""
    s = load_json(sft_d / "summary.json")
    try:
        return float(s["val_loss_at_start"]), float(s["val_loss"])
    except (KeyError, TypeError, ValueError):
        pass
    val = val_losses(sft_d / "metrics.csv")
    return (val[0], val[-1]) if len(val) >= 2 else None


def samples(path: Path) -> dict[str, str]:
    r = load_json(path)
    try:
        return {str(x["prompt"]): " ".join(str(x["completion"]).split()) for x in r["samples"]}
    except (KeyError, TypeError):
        return {}

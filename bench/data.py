"""Data preparation throughput: tools/prepare_data.py (llm.prepare.prepare) vs the few lines a user would write.

    python bench/data.py [--mb 40] [--repeats 3]      # ours (1 and 2 workers) vs the baseline, .txt and .jsonl
    python bench/data.py --scaling [--sizes 4,40,400] # time and peak memory of ours as the input grows

Input: the Shakespeare scenes and People's Daily articles of the built-in corpora, shuffled and repeated to --mb MB,
as one .txt file (documents separated by blank lines) and the same documents as one .jsonl file.

Baseline (`baseline_prepare`): one process reads the file, splits it into documents, encodes them with
sentencepiece's own multi-threaded batch encode `sp.encode(docs, num_threads=2)`, appends eos to each and writes
one uint16 array. Ours: `prepare(..., val_fraction=0)` (everything in one train shard, to compare with the
baseline's) with 2 workers and with 1, default chunking. Interleaved repeats in this process, medians of wall-clock
MB/s; the token arrays are asserted identical. Last line `ratio: X.XX` = ours (2 workers) MB/s over the baseline's,
the geometric mean over the .txt and the .jsonl input. CPU seconds are printed too: on a machine whose cores other
jobs share, they show what the wall clock cannot.

--scaling runs `prepare` (2 workers) on .txt and .jsonl inputs of each size, each run in a fresh subprocess, and
prints its time and peak resident memory: of the parent process (VmHWM) and of the largest worker (ru_maxrss of
its children). Time should grow linearly with the input and memory stay flat.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np

from llm.corpora import iter_documents
from llm.prepare import prepare

DEFAULT_TOKENIZER = Path("data/tokenizer/tokenizer.model")


def baseline_prepare(src: str, tokenizer: str, out: str) -> int:
    """What a user writes in a few lines: one process, sentencepiece's multi-threaded batch encode."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    text = Path(src).read_text(encoding="utf-8")
    if src.endswith(".jsonl"):
        docs = [json.loads(line)["text"] for line in text.split("\n") if line.strip()]
    else:
        docs = [d.strip("\n") for d in re.split(r"\n[ \t]*\n", text) if d.strip()]
    ids = sp.encode(docs, num_threads=2)
    for e in ids:
        e.append(sp.eos_id())
    arr = np.fromiter(itertools.chain.from_iterable(ids), np.uint16, sum(map(len, ids)))
    arr.tofile(out)
    return len(arr)


def write_inputs(mb: float, stem: Path, kinds=("txt", "jsonl")) -> float:
    """STEM.txt and STEM.jsonl holding the same documents, about `mb` MB; returns the MB of document text.
    Written as it goes (a 400 MB input is never held in memory)."""
    base = [d.strip("\n") for d in itertools.chain(iter_documents("builtin:shakespeare", None),
                                                     iter_documents("builtin:renmin", None))]
    # the .txt file's documents: a scene with blank lines in it is several documents
    docs = [p.strip("\n") for d in base for p in re.split(r"\n[ \t]*\n", d) if p.strip()]
    files = {k: open(f"{stem}.{k}", "w", encoding="utf-8") for k in kinds}
    total, rng = 0, random.Random(0)
    while total < mb * 1e6:
        rng.shuffle(docs)
        for d in docs:
            if "txt" in files:
                files["txt"].write(d + "\n\n")
            if "jsonl" in files:
                files["jsonl"].write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            total += len(d.encode("utf-8"))
            if total >= mb * 1e6:
                break
    for f in files.values():
        f.close()
    return total / 1e6


def ensure_tokenizer(path: str, tmp: Path) -> str:
    if Path(path).is_file():
        return path
    import runpy

    out = str(tmp / "tokenizer.model")  # the demo tokenizer, trained into the temp dir
    with open(os.devnull, "w") as null, redirect_stdout(null):
        runpy.run_path("tools/train_tokenizer.py")["train_tokenizer"](out=out, max_sentences=50_000)
    return out


def _cpu() -> tuple[float, float]:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def _ours(src: str, out: Path, tok: str, workers: int) -> dict:
    with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):
        return prepare([src], out=str(out), tokenizer=tok, val_fraction=0.0, workers=workers, overwrite=True)


def compare(args):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = ensure_tokenizer(args.tokenizer, tmp)
        mb = write_inputs(args.mb, tmp / "text")
        print(f"input: {mb:.1f} MB of text as .txt and as .jsonl; tokenizer {tok}; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        names = ("baseline (1 process, sp.encode num_threads=2)", "ours, 2 workers", "ours, 1 worker")
        med = {}
        for kind in ("txt", "jsonl"):
            src = str(tmp / f"text.{kind}")
            runs = {n: [] for n in names}
            cpu = {n: [] for n in names}  # (this process, children) CPU seconds
            for _ in range(args.repeats):
                for name in names:
                    t0, c0 = time.perf_counter(), _cpu()
                    if name.startswith("baseline"):
                        n_ref = baseline_prepare(src, tok, str(tmp / "ref.bin"))
                    else:
                        meta = _ours(src, tmp / "ours", tok, int(name.split(", ")[1][0]))
                        assert meta["splits"]["train"]["tokens"] == n_ref
                        # the same tokens in the same order
                        assert np.array_equal(np.fromfile(tmp / "ref.bin", np.uint16),
                                              np.fromfile(tmp / "ours" / "train_000.bin", np.uint16))
                    runs[name].append(mb / (time.perf_counter() - t0))
                    cpu[name].append(tuple(b - a for a, b in zip(c0, _cpu())))
            print(f"\n.{kind} ({n_ref:,} tokens, identical arrays):")
            for name in names:
                med[kind, name] = statistics.median(runs[name])
                own, kids = (statistics.median(c[i] for c in cpu[name]) for i in (0, 1))
                print(f"  {name:46s} {med[kind, name]:6.2f} MB/s  (median of {args.repeats}; CPU s: this process "
                      f"{own:.1f}, workers {kids:.1f})")
            print(f"  ours 2 workers / baseline: {med[kind, names[1]] / med[kind, names[0]]:.2f}x (target >= 1.2x); "
                  f"2 workers / 1 worker: {med[kind, names[1]] / med[kind, names[2]]:.2f}x (target >= 1.7x)")
            one = statistics.median(sum(c) for c in cpu[names[2]])
            parent, kids = (statistics.median(c[i] for c in cpu[names[1]]) for i in (0, 1))
            print(f"  CPU seconds: 1 worker {one:.1f}; 2 workers: parent {parent:.1f} + workers {kids:.1f} -> on 2 free "
                  f"cores 2 workers / 1 worker at most {one / max(parent, kids / 2):.2f}x")
        print(f"load average now {os.getloadavg()[0]:.1f}")
        r = [med[k, names[1]] / med[k, names[0]] for k in ("txt", "jsonl")]
        print(f"ratio: {math.sqrt(r[0] * r[1]):.2f}")


def _child(src: str, out: str, tok: str, workers: int):
    """One scaling run (a fresh process): time, CPU and peak memory of prepare as JSON on the last line."""
    t0, c0 = time.perf_counter(), _cpu()
    _ours(src, Path(out), tok, workers)
    wall, cpu = time.perf_counter() - t0, [b - a for a, b in zip(c0, _cpu())]
    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    print(json.dumps({"wall": wall, "cpu_parent": cpu[0], "cpu_workers": cpu[1], "rss_parent_mb": int(hwm[1]) / 1024,
                      "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def scaling(args):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = ensure_tokenizer(args.tokenizer, tmp)
        print(f"prepare with {args.workers} workers, each run a fresh process; tokenizer {tok}")
        print(f"{'input':>16} {'MB':>6} {'time s':>7} {'MB/s':>6} {'CPU s parent':>12} {'CPU s workers':>13} "
              f"{'peak RSS parent MB':>18} {'peak RSS worker MB':>18} {'load':>5}")
        for size in args.sizes:
            for kind in args.kinds:
                mb = write_inputs(size, tmp / "text", (kind,))
                src = str(tmp / f"text.{kind}")
                p = subprocess.run([sys.executable, __file__, "--child", src, str(tmp / "out"), tok,
                                    str(args.workers)], capture_output=True, text=True)
                if p.returncode:
                    sys.exit(p.stderr[-2000:])
                r = json.loads(p.stdout.strip().splitlines()[-1])
                print(f"{'.' + kind:>16} {mb:6.0f} {r['wall']:7.1f} {mb / r['wall']:6.2f} {r['cpu_parent']:12.1f} "
                      f"{r['cpu_workers']:13.1f} {r['rss_parent_mb']:18.0f} {r['rss_worker_mb']:18.0f} "
                      f"{os.getloadavg()[0]:5.1f}", flush=True)
                os.unlink(src)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=40.0, help="MB of text (Shakespeare and People's Daily, mixed)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--scaling", action="store_true", help="time and peak memory of ours at --sizes")
    ap.add_argument("--sizes", type=lambda s: [float(x) for x in s.split(",")], default=[4, 40, 400])
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["txt", "jsonl"])
    ap.add_argument("--workers", type=int, default=2, help="workers of the --scaling runs")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        src, out, tok, workers = args.child
        _child(src, out, tok, int(workers))
    elif args.scaling:
        scaling(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()

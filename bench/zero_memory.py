"""Peak host memory per rank of pretraining under ZeRO 0-3 (DeepSpeed; Rajbhandari et al. 2020) on 2 CPU ranks.

Each stage is one `deepspeed --num_gpus RANKS` launch of `llm/pretrain.py` (through a small driver) on a data dir
built here from built-in Shakespeare (a 1,500-token tokenizer; the model keeps the preset's vocabulary size): a few
steps of micro batch 1. Per rank it reports the peak RSS (ru_maxrss) over the training steps (taken when the final
checkpoint starts; the evaluation at the end is included) and over the whole process (also the checkpoint and,
on rank 0, the fp32 consolidation into final/). Issue 16's targets: ZeRO-2 below ZeRO-0, ZeRO-3 at most 0.6x
ZeRO-0.

    python bench/zero_memory.py                     # 125M, seq 256, 3 steps, stages 0 1 2 3
    python bench/zero_memory.py --preset debug --stages '[0, 3]'
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llm.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")

DRIVER = r'''
import json, resource, sys
import torch
import llm.trainer as trainer
from llm.cli import run_cli
from llm.pretrain import pretrain

def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

peak = {}
save = trainer.save_checkpoint
def first_save_records_the_training_peak(*a, **k):
    peak.setdefault("train", rss_gb())
    return save(*a, **k)
trainer.save_checkpoint = first_save_records_the_training_peak
run_cli(pretrain, [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
peak["process"] = rss_gb()
peaks = [None] * torch.distributed.get_world_size()
torch.distributed.all_gather_object(peaks, peak)
if torch.distributed.get_rank() == 0:
    print("ZERO_MEMORY " + json.dumps(peaks), flush=True)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(work: Path) -> Path:
    """A tokenizer and token shards from built-in Shakespeare (a few seconds)."""
    import runpy

    from llm.corpora import iter_documents
    from llm.data import prepare

    text = [doc.strip() for doc in iter_documents("builtin:shakespeare", "train", max_bytes=300_000)]
    (work / "text.txt").write_text("\n\n".join(text), encoding="utf-8")
    runpy.run_path(str(ROOT / "tools" / "train_tokenizer.py"))["train_tokenizer"](
        inputs=[str(work / "text.txt")], out=str(work / "tok" / "tokenizer.model"), vocab_size=1500,
        max_sentences=20_000, preset="debug")
    prepare([str(work / "text.txt")], out=str(work / "data"), tokenizer=str(work / "tok" / "tokenizer.model"),
            val_fraction=0.05, workers=1)
    return work / "data"


def zero_memory(preset: str = "125M", stages: tuple[int, ...] = (0, 1, 2, 3), ranks: int = 2, seq_len: int = 256,
                steps: int = 3, micro_batch_size: int = 1, threads: int = 1, work_dir: str | None = None) -> dict:
    """Print a table of per-rank peak RSS (GB) for each ZeRO stage, and return it.

    Args:
        preset: model preset (llm/config.py); its vocabulary size is kept (raised to the data's if smaller).
        stages: ZeRO stages to run (ds_configs/zeroN.json), fp32.
        ranks: CPU ranks (deepspeed --num_gpus).
        seq_len: tokens per sequence.
        steps: optimizer steps per run (a peak is reached in the first; more only cost time).
        micro_batch_size: sequences per rank per step (no accumulation).
        threads: OMP_NUM_THREADS per rank.
        work_dir: where data and runs go (default a temporary directory, removed at the end).
    """
    from llm.config import PRESETS

    work = Path(work_dir or tempfile.mkdtemp(prefix="zero-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data" if (work / "data" / "meta.json").is_file() else _data(work)
    (work / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV} | {"OMP_NUM_THREADS": str(threads)}
    vocab = max(PRESETS[preset]["vocab_size"], json.loads((data / "meta.json").read_text())["vocab_size"])
    rows = {}
    try:
        for stage in stages:
            run = work / f"zero{stage}"
            shutil.rmtree(run, ignore_errors=True)
            args = ["--preset", preset, "--model.vocab_size", vocab, "--data", data, "--seq_len", seq_len,
                    "--train.run_dir", run, "--train.ds_config", f"zero{stage}", "--train.precision", "fp32",
                    "--train.micro_batch_size", micro_batch_size, "--train.grad_accum", 1,
                    "--train.global_batch_size", "null", "--train.max_steps", steps,
                    "--train.warmup_steps", 0, "--train.log_every", 1, "--train.eval_every", 1 << 20,
                    "--train.eval_batches", 1, "--train.sample_prompts", "[]", "--train.compile", "false"]
            cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks), "--master_port",
                   str(_free_port()), str(work / "driver.py"), *map(str, args)]
            t0 = time.time()
            r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("ZERO_MEMORY ")), None)
            # A rank may still abort at interpreter exit ("terminate called without an active exception", from a
            # thread DeepSpeed leaves behind) after printing the numbers: those runs count, with their exit code.
            if line is None:
                raise SystemExit(f"ZeRO-{stage} failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            loss = [ln for ln in r.stdout.splitlines() if ln.startswith("step ") and "| loss" in ln]
            rows[stage] = {"peaks": json.loads(line[len("ZERO_MEMORY "):]), "s": time.time() - t0, "rc": r.returncode,
                           "last": loss[-1].split("|")[1].strip() if loss else ""}
            shutil.rmtree(run, ignore_errors=True)  # a 125M checkpoint is ~1.5 GB
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    base = max(p["train"] for p in rows[stages[0]]["peaks"])
    print(f"{preset}, {ranks} CPU ranks, seq {seq_len}, micro batch {micro_batch_size}, {steps} steps, fp32, "
          f"OMP_NUM_THREADS={threads}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'stage':>6} | {'train peak GB per rank':>24} | {'x first':>7} | {'process peak GB per rank':>24} | "
          f"{'s':>5} | exit | last step")
    for stage, row in rows.items():
        train = max(p["train"] for p in row["peaks"])
        per_rank = {k: " ".join(f"{p[k]:6.2f}" for p in row["peaks"]) for k in ("train", "process")}
        print(f"ZeRO-{stage} | {per_rank['train']:>24} | {train / base:7.2f} | {per_rank['process']:>24} | "
              f"{row['s']:5.0f} | {row['rc']:4d} | {row['last']}")
    return rows


if __name__ == "__main__":
    run_cli(zero_memory)

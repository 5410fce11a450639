"""Peak host memory per rank of pretraining under ZeRO 0-3 (DeepSpeed; Rajbhandari et al. 2020) on 2 CPU ranks.

Each config is one `deepspeed --num_gpus RANKS` launch of `llm/pretrain.py` (through a small driver) on a data dir
built here from built-in Shakespeare (a 1,500-token tokenizer; the model keeps the preset's vocabulary size): a few
steps of micro batch 1. Per rank it reports the peak RSS (ru_maxrss) over the training steps (taken when the final
checkpoint starts; the evaluation at the end is included) and over the whole process (also the checkpoint and,
on rank 0, the fp32 consolidation into final/). Issue 16's targets: ZeRO-2 below ZeRO-0, ZeRO-3 at most 0.6x
ZeRO-0.

    python bench/zero_memory.py                     # 125M, seq 256, 3 steps, ZeRO 0 1 2 3 + zero3_lowmem, fp32
    python bench/zero_memory.py --precision bf16
    python bench/zero_memory.py --preset debug --stages '[zero0, zero3, my_zero3.json]'

Measured (125M, 2 ranks, load average ~2; train peak GB per rank, x ZeRO-0): fp32 ZeRO-0 2.68, ZeRO-1 2.21 (0.82),
ZeRO-2 2.30 (0.86), ZeRO-3 2.73 (1.02), ZeRO-3 with live parameters capped 1.97 (0.74); bf16 ZeRO-0 2.92, ZeRO-2
1.89 (0.65), ZeRO-3 2.11 (0.72), capped 1.70 (0.58). ds_configs/zero3.json keeps every gathered parameter live
(stage3_max_live_parameters and stage3_max_reuse_distance 1e9: the whole model, gathered on every rank, from the
forward to the backward); "capped" is ds_configs/zero3_lowmem.json: 1e7 / 0, prefetch and reduce buckets 5e6, no overlap_comm.
In fp32 DeepSpeed's ZeRO-3 also keeps an fp32 master partition beside the fp32 parameter partition (10 bytes per
parameter over 2 ranks against ZeRO-0's 16), so 0.6x is out of reach there.
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
from llm.tokenizer_train import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")

DRIVER = r'''
import json, resource, sys
import torch
import llm.train.loop as loop
from llm.cli import run_cli
from llm.pretrain import main as pretrain

def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

peak = {}
save = loop.save_checkpoint
def first_save_records_the_training_peak(*a, **k):
    peak.setdefault("train", rss_gb())
    return save(*a, **k)
loop.save_checkpoint = first_save_records_the_training_peak
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
    """A tokenizer and token shards of built-in Shakespeare (its own held-out split; a few seconds)."""
    from llm.prepare import prepare

    tok = work / "tok" / "tokenizer.model"
    train_tokenizer(inputs=["builtin:shakespeare"], out=str(tok), vocab_size=1500, max_sentences=20_000,
                    preset="debug")
    prepare(["builtin:shakespeare"], out=str(work / "data"), tokenizer=str(tok), workers=1)
    return work / "data"


def zero_memory(preset: str = "125M", stages: tuple[str, ...] = ("zero0", "zero1", "zero2", "zero3", "zero3_lowmem"),
                ranks: int = 2,
                seq_len: int = 256, steps: int = 3, micro_batch_size: int = 1, precision: str = "fp32",
                threads: int = 1, malloc_mmap_threshold: int = 65536, work_dir: str | None = None) -> dict:
    """Print a table of per-rank peak RSS (GB) for each DeepSpeed config, and return it.

    Args:
        preset: model preset (llm/config.py); its vocabulary size is kept (raised to the data's if smaller).
        stages: DeepSpeed configs to compare, the first as the baseline: names in ds_configs/ or JSON paths.
        ranks: CPU ranks (deepspeed --num_gpus).
        seq_len: tokens per sequence.
        steps: optimizer steps per run (a peak is reached in the first; more only cost time).
        micro_batch_size: sequences per rank per step (no accumulation).
        precision: fp32 or bf16 (train.precision).
        threads: OMP_NUM_THREADS per rank.
        malloc_mmap_threshold: glibc's MALLOC_MMAP_THRESHOLD_ for every rank (0 = glibc's default). glibc keeps
            freed heap blocks in the process, so the peak RSS of the default allocator also counts fragmentation
            (measured here: +0.4-0.8 GB under ZeRO-3); tensors of 64 kB and up in their own mappings are returned
            when freed, and the peak is closer to what is live.
        work_dir: where data and runs go (default a temporary directory, removed at the end).
    """
    from llm.config import PRESETS

    work = Path(work_dir or tempfile.mkdtemp(prefix="zero-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data" if (work / "data" / "meta.json").is_file() else _data(work)
    (work / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV} | {"OMP_NUM_THREADS": str(threads)}
    if malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
    vocab = max(PRESETS[preset]["vocab_size"], json.loads((data / "meta.json").read_text())["vocab_size"])
    rows = {}
    try:
        for stage in stages:
            run = work / f"run{len(rows)}"
            shutil.rmtree(run, ignore_errors=True)
            args = ["--preset", preset, "--model.vocab_size", vocab, "--data", data, "--seq_len", seq_len,
                    "--train.run_dir", run, "--train.ds_config", stage, "--train.precision", precision,
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
                raise SystemExit(f"{stage} failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            loss = [ln for ln in r.stdout.splitlines() if ln.startswith("step ") and "| loss" in ln]
            rows[stage] = {"peaks": json.loads(line[len("ZERO_MEMORY "):]), "s": time.time() - t0, "rc": r.returncode,
                           "last": loss[-1].split("|")[1].strip() if loss else ""}
            shutil.rmtree(run, ignore_errors=True)  # a 125M checkpoint is ~1.5 GB
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    base = max(p["train"] for p in rows[stages[0]]["peaks"])
    print(f"{preset}, {ranks} CPU ranks, seq {seq_len}, micro batch {micro_batch_size}, {steps} steps, {precision}, "
          f"OMP_NUM_THREADS={threads}, MALLOC_MMAP_THRESHOLD_={malloc_mmap_threshold or 'default'}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'ds_config':>10} | {'train peak GB per rank':>24} | {'x first':>7} | {'process peak GB per rank':>24} | "
          f"{'s':>5} | exit | last step")
    for stage, row in rows.items():
        train = max(p["train"] for p in row["peaks"])
        per_rank = {k: " ".join(f"{p[k]:6.2f}" for p in row["peaks"]) for k in ("train", "process")}
        print(f"{Path(stage).stem:>10} | {per_rank['train']:>24} | {train / base:7.2f} | {per_rank['process']:>24} | "
              f"{row['s']:5.0f} | {row['rc']:4d} | {row['last']}")
    return rows


if __name__ == "__main__":
    run_cli(zero_memory)

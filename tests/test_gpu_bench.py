"""bench/gpu.sh, the one-command GPU benchmark: its CPU rehearsal (--dry-run) runs every section and writes
numbers (each new check of issue 16 included: fp16 start-up, ZeRO-3 evaluation samples, perplexity and greedy
decoding against transformers, peak memory per ZeRO config), the time budget shrinks caps in proportion, and
without a GPU the real run refuses in one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu import SECTIONS, errors_in  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# Left in this process's environment by earlier in-process training tests (llm.train.dist.init_distributed): a child
# inheriting them would try to serve the same MASTER_PORT, which this process's store still holds.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    return {**env, "OUT": str(tmp_path), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}


def _numbers(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def test_dry_run_writes_every_section(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["env"]["mode"] == "dry-run (CPU)"
    assert list(result["sections"]) == list(SECTIONS)
    for name, sec in result["sections"].items():
        assert not errors_in(sec), (name, errors_in(sec))
        assert len(_numbers(sec)) >= 3, (name, sec)
    train = result["sections"]["train"]
    runs = {(r["zero"], r["impl"]): r for r in train["runs"]}
    for stage in (0, 2, 3):
        for impl in ("ours", "transformers"):
            assert runs[stage, impl]["tokens_per_s"] > 0 and runs[stage, impl]["peak_gb"] > 0
    assert runs[0, "ours+compile"]["tokens_per_s"] > 0
    # the same weights and batch: both implementations start from the same loss
    assert runs[0, "ours"]["loss"] == pytest.approx(runs[0, "transformers"]["loss"], abs=1e-3)
    attn = result["sections"]["attention"]
    assert attn["sdpa_default"]["grad_cos"] > 0.99 and attn["sdpa_default"]["loss_abs_diff"] < 0.05
    assert attn["sdpa_default"]["kernel"]  # the aten SDPA op that ran, read off the profiler
    parity = result["sections"]["bf16_parity"]
    assert len(parity["losses"]) >= 2 and parity["summary"]["max_abs_diff"] < 0.5
    assert result["sections"]["decode"]["ours"]["tokens_per_s"] > 0
    passkey = result["sections"]["context"]["passkey"]
    assert {r["model"] for r in passkey} == {"base", "yarn, no fine-tuning", "yarn + LongLoRA"}
    assert all(0 <= r["accuracy"] <= 1 for r in passkey)
    longlora = result["sections"]["longlora_memory"]
    assert longlora["s2_attn"]["peak_gb"] > 0 and longlora["full_attention"]["peak_gb"] > 0
    assert longlora["s2_attn_over_full_attention"]["peak"] > 0
    # fp16 through fit(): more loss-scale overflows in a row than max_bad_steps, and the run still finishes
    fp16 = result["sections"]["fp16"]["run"]
    assert fp16["finished"] and fp16["aborted"] is None and fp16["non_finite_logged"] == 0, fp16
    assert fp16["longest_overflow_streak"] > result["sections"]["fp16"]["setup"]["max_bad_steps"], fp16
    assert fp16["skipped_steps"] == fp16["overflow_skips"] and fp16["final_scale"] < fp16_initial(result)
    # ZeRO-3 evaluations decode samples (twice), the same text as the plain module's greedy decoding
    zero3 = result["sections"]["zero3_samples"]
    assert zero3["zero3"]["finished"] and len(zero3["evaluations"]) == zero3["zero3"]["evaluations"] == 2
    assert zero3["samples_equal_zero0_greedy"] and all(r["equal"] for r in zero3["samples"])
    # perplexity through corpus_perplexity (fp32 and bf16 agree) and greedy == transformers' greedy
    ev = result["sections"]["eval_generate"]
    ppl = {(r["device"], r["dtype"]): r for r in ev["perplexity"]}
    assert ppl["cpu", "float32"]["ppl"] > 1 and ppl["cpu", "bfloat16"]["rel_diff_vs_cpu_fp32"] < 0.05
    assert ev["greedy_equal_transformers"] and len(ev["greedy"]) == 4
    assert all(r["batched_equal_single"] for r in ev["greedy"])
    # peak memory per DeepSpeed config, the first one the baseline
    mem = result["sections"]["zero_memory"]["peak_memory"]
    assert [r["ds_config"] for r in mem] == ["zero0", "zero1", "zero2", "zero3", "zero3_lowmem"]
    assert mem[0]["x_zero0"] == 1 and all(r["peak_gb"] > 0 and r["loss"] > 0 for r in mem)
    md = (tmp_path / "gpu.md").read_text()
    assert all(f"## {name}" in md for name in SECTIONS) and "| preset |" in md
    assert (tmp_path / "gpu.log").stat().st_size > 0


def fp16_initial(result) -> float:
    return result["sections"]["fp16"]["setup"]["initial_scale"]


def test_budget_shrinks_later_caps_in_proportion():
    from gpu import MIN_CAP_S, START_S, shrink

    assert shrink([40], [60], 1000) == [40]  # room for all: unchanged
    room = 100 + 2 * START_S  # half of what the caps ask for
    assert shrink([100], [100], room + 100) == [100]
    assert shrink([100], [100], room) == [50]
    assert shrink([30], [70], 0) == [MIN_CAP_S]


def test_without_gpu_refuses_in_one_line(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--dry-run" in lines[0], lines
    assert not (tmp_path / "gpu.json").exists()

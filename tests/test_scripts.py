"""run.sh's summary table reads what the stages write."""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_summary_table(tmp_path, capsys, monkeypatch):
    base, sft = tmp_path / "base", tmp_path / "sft"
    (base / "final").mkdir(parents=True)
    (base / "final" / "model.safetensors").write_bytes(b"\0" * 2**20)
    (base / "eval.json").write_text(json.dumps({"ppl": 156.05, "bpb": 2.6638}))
    sft.mkdir()
    (sft / "metrics.csv").write_text("step,loss,val_loss\n0,,7.396\n10,5.1,\n300,,4.822\n")
    times = tmp_path / "times.tsv"
    times.write_text("setup\t75\npretrain\t293\npretrain\t290\n")
    monkeypatch.setattr(sys, "argv", ["pipeline_summary.py", "--times", str(times), "--base", str(base), "--sft",
                                      str(sft), "--quant", str(tmp_path / "q"), "--gguf", str(tmp_path / "m.gguf")])
    runpy.run_path(str(ROOT / "tools" / "pipeline_summary.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert f"| pretrained | {base / 'final'} | 1.0 MiB | 156.05 | 2.664 |" in out
    assert "| GPTQ 4-bit |" in out and "| - | - |" in out  # stages not run show dashes
    assert "7.396 before → 4.822 after" in out
    assert "| pretrain | 290 |" in out and "| total | 365 |" in out  # the last time of a stage counts


def test_pipeline_summary_smollm2_track(tmp_path, capsys, monkeypatch):
    """`run.sh --base smollm2`: answer loss from the trainer's summary.json, fp32 vs 4-bit ppl from quantize.py's
    report, the greedy answers of each model per question; optional mc.json adds a column."""
    s = tmp_path / "smollm2"
    base, sft, quant = s / "base", s / "sft", s / "sft-gptq"
    for d in (base, sft / "final", quant):
        d.mkdir(parents=True)
    (sft / "final" / "model.safetensors").write_bytes(b"\0" * 2**20)
    (sft / "summary.json").write_text(json.dumps({"val_loss_at_start": 2.91, "val_loss": 1.874}))
    (sft / "metrics.csv").write_text("step,val_loss\n0,9\n60,8\n")  # summary.json wins
    (quant / "report.json").write_text(json.dumps({"eval_data": "builtin:shakespeare", "original": {
        "ppl": 20.0, "bpb": 1.2}, "quantized": {"ppl": 21.5, "bpb": 1.25}}))
    (sft / "mc.json").write_text(json.dumps({"acc": 0.25}))
    q = ["What grows from an acorn?", "what is a government"]
    (base / "samples.json").write_text(json.dumps({"samples": [{"prompt": q[0], "completion": "A tree,\n maybe."}]}))
    (sft / "samples.json").write_text(json.dumps({"samples": [{"prompt": p, "completion": "An oak tree."} for p in q]}))
    (quant / "samples.json").write_text("[{")  # damaged: left out
    times = s / "pipeline-times.tsv"
    times.write_text("setup\t2\nconvert\t20\nsft\t600\nquantize\t300\nsamples\t30\n")
    monkeypatch.setattr(sys, "argv", ["pipeline_summary.py", "--times", str(times), "--base", str(base), "--sft",
                                      str(sft), "--quant", str(quant), "--gguf", str(s / "sft.gguf"),
                                      "--track", "smollm2"])
    runpy.run_path(str(ROOT / "tools" / "pipeline_summary.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "| model | path | size | val ppl (builtin:shakespeare) | val bits/byte | mc acc |" in out
    assert f"| SmolLM2-135M-Instruct (GGUF → HF) | {base} | 0.0 MiB | - | - | - |" in out
    assert f"| SFT (LoRA merged) | {sft / 'final'} | 1.0 MiB | 20.00 | 1.200 | 25.0% |" in out
    assert f"| GPTQ 4-bit | {quant} | " in out and "| 21.50 | 1.250 | - |" in out
    assert "4-bit vs fp32 perplexity: 20.00 → 21.50 (+7.5%)" in out
    assert "SFT held-out answer loss: 2.910 before → 1.874 after" in out and "pretraining text" not in out
    assert f"Q: {q[0]}\n  base:  A tree, maybe.\n  SFT:   An oak tree.\n\nQ: {q[1]}\n  SFT:   An oak tree." in out
    assert "| sft | 600 |" in out and "| total | 952 |" in out


def run_sh(*args, gpus: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    return subprocess.run(["bash", str(ROOT / "run.sh"), *args], env={**env, "CUDA_VISIBLE_DEVICES": gpus},
                          capture_output=True, text=True, timeout=60)


def test_run_sh_base_track():
    """--base scratch|smollm2: a wrong value, a stage of the other track or --config with smollm2 is one line;
    --print-plan names the track, its config and stages."""
    for args, msg in ((["--base", "llama"], "--base 'llama': use scratch"), (["--base"], "--base '': use scratch"),
                      (["--base", "smollm2", "--only", "pretrain"], "unknown stage 'pretrain' for --base smollm2"),
                      (["--from", "convert"], "unknown stage 'convert' for --base scratch"),
                      (["--base", "smollm2", "--config", "25M"], "--config names a pretraining config"),
                      (["--from"], "--from needs a value"), (["--out", ""], "--out needs a value")):
        r = run_sh("--print-plan", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, (args, r.stderr)
    plan = dict(line.split(": ", 1) for line in run_sh("--base", "smollm2", "--print-plan").stdout.splitlines())
    assert plan["track"] == "smollm2" and plan["config"] == "configs/sft/chatterbot-smollm2-lora.yaml"
    assert plan["stages"] == "setup convert data sft quantize gguf samples summary"
    assert plan["runs"] == "./runs/smollm2"
    plan = dict(line.split(": ", 1) for line in run_sh("--base", "smollm2", "--quick", "--print-plan",
                                                       gpus="0,1").stdout.splitlines())
    assert plan["track"] == "smollm2 (quick rehearsal)" and plan["runs"] == "./runs/smollm2-quick"
    assert plan["config"] == "configs/sft/chatterbot-smollm2-lora-gpu.yaml"
    plan = dict(line.split(": ", 1) for line in run_sh("--print-plan").stdout.splitlines())
    assert plan["track"] == "scratch" and plan["config"] == "configs/pretrain/cpu-demo.yaml"
    assert plan["stages"] == "setup tokenizer data pretrain eval sft quantize eval_quant gguf summary"


def test_run_sh_times_only_stages_that_did_work(tmp_path):
    """A re-run whose stage finds its output there (setup's venv stamp) keeps the time of the run that made it."""
    for _ in range(2):  # --only data redoes data each time; setup runs too, and finds the venv installed
        r = run_sh("--base", "smollm2", "--only", "data", "--out", str(tmp_path))
        assert r.returncode == 0, r.stderr
    lines = (tmp_path / "runs" / "smollm2" / "pipeline-times.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["setup", "data", "data"]
    questions = (tmp_path / "data" / "chatterbot-en" / "questions.txt").read_text().splitlines()
    assert len(questions) == 3 and (tmp_path / "data" / "chatterbot-en" / "chats.jsonl").stat().st_size > 100_000


def test_run_sh_redo_keeps_a_folder_it_did_not_make(tmp_path):
    """--only/--from drop a stage's run directory only when the toolkit made it (its .llm-owner.json marker)."""
    mine = tmp_path / "runs" / "smollm2" / "sft"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    r = run_sh("--base", "smollm2", "--only", "sft", "--out", str(tmp_path))
    assert r.returncode == 2 and "was not made by this toolkit" in r.stderr and str(mine) in r.stderr, r.stderr
    assert (mine / "notes.txt").read_text() == "my notes"

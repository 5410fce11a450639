"""run.sh's summary table reads what the stages write."""
import json
import runpy
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

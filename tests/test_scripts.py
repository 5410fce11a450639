"""Every script compiles under this interpreter (the CI one), and run.sh's summary table reads what the stages
write."""
import json
import py_compile
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for d in ("llm", "tools", "bench")
                                        for p in (ROOT / d).glob("*.py")))
def test_compiles(path, tmp_path):
    py_compile.compile(str(ROOT / path), doraise=True, cfile=str(tmp_path / "out.pyc"))


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


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/*.yaml")))
def test_config_parses_with_its_cli(config, capsys):
    """Every shipped config is valid for the CLI its header names (a typo in a field fails here, not in a run)."""
    import importlib

    from jsonargparse import CLI

    if config.startswith("configs/pretrain/"):
        main = importlib.import_module("llm.pretrain").pretrain
    else:
        main = importlib.import_module("llm.classify" if "classify" in config else "llm.sft").main
    with pytest.raises(SystemExit) as done:
        CLI(main, args=["--config", str(ROOT / config), "--print_config"], as_positional=False)
    assert done.value.code in (0, None) and "train:" in capsys.readouterr().out

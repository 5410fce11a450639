"""Platform fallbacks of the speed features: compile requested where it cannot run (no C++ compiler) warns once
and decodes eagerly with the same tokens; a GPU without bf16 trains in fp16 with one warning."""
import torch

import llm.compile
import llm.trainer
from llm.config import ModelArgs
from llm.generate import generate
from llm.model import Transformer
from llm.trainer import TrainConfig, preflight


def test_compile_without_a_cxx_compiler_warns_and_runs_eagerly(monkeypatch, tmp_path, capsys):
    llm.compile.compile_problem.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / c++ here
    monkeypatch.setenv("CXX", "no-such-compiler")
    try:
        assert llm.compile.resolve("auto", "cpu", pays=True) is False  # auto: silently eager
        assert capsys.readouterr().out == ""
        torch.manual_seed(0)
        model = Transformer(ModelArgs.from_preset("debug")).eval()
        out = generate(model, [[5, 6, 7]], 12, compile=True)
        lines = capsys.readouterr().out.splitlines()
        assert lines == ["warning: compile requested but no C++ compiler (no-such-compiler) on PATH (apt-get install "
                         "g++) — running eagerly"]
        assert out == generate(model, [[5, 6, 7]], 12, compile=False)
    finally:
        llm.compile.compile_problem.cache_clear()


def test_resolve():
    assert llm.compile.resolve(False, "cpu", pays=True) is False
    assert llm.compile.resolve("false", "cpu", pays=True) is False
    assert llm.compile.resolve("auto", "mps", pays=True) is False  # no inductor backend: eager, no crash


def test_gpu_without_bf16_trains_in_fp16(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(llm.trainer, "on_cpu", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    plan = preflight(TrainConfig(run_dir=str(tmp_path / "run")), world_size=1)
    assert plan.precision == "fp16" and plan.ds_config["fp16"]["enabled"] and not plan.ds_config["bf16"]["enabled"]
    out = [line for line in capsys.readouterr().out.splitlines() if "warning:" in line]  # not DeepSpeed's logs
    assert len(out) == 1 and out[0].startswith("warning: this GPU (Tesla V100-SXM2-16GB) has no bf16")

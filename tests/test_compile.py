"""Platform fallbacks of the speed features: compile requested where it cannot run (no C++ compiler) warns once
and decodes eagerly with the same tokens; a GPU without bf16 trains in fp16 with one warning."""
import torch

import llm.compile
import llm.train.plan
from llm.config import ModelArgs
from llm.generate import generate
from llm.model import Transformer
from llm.train import TrainConfig, preflight


def test_compile_without_a_cxx_compiler_warns_and_runs_eagerly(monkeypatch, tmp_path, capsys):
    import torch._inductor.config  # noqa: F401 - reads CXX once at import: not under the fake one below
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
    monkeypatch.setattr(llm.train.plan, "on_cpu", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    plan = preflight(TrainConfig(run_dir=str(tmp_path / "run")), world_size=1)
    assert plan.precision == "fp16" and plan.ds_config["fp16"]["enabled"] and not plan.ds_config["bf16"]["enabled"]
    out = [line for line in capsys.readouterr().out.splitlines() if "warning:" in line]  # not DeepSpeed's logs
    assert len(out) == 1 and out[0].startswith("warning: this GPU (Tesla V100-SXM2-16GB) has no bf16")


def _loss_and_grads(model, x, loss):
    model.zero_grad()
    value = loss(model, x)
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_equal_eager_under_longlora_and_the_classifier():
    """compile_model (train.compile: blocks, inside wrappers) inside a peft LoRA wrapper with S²-Attn and YaRN (LongLoRA), and inside the
    classifier: loss and every trained gradient equal eager within float tolerance."""
    import copy

    from llm.tasks.classify import Classifier, classify_loss
    from llm.longlora import enable_s2_attn, extend_context, longlora_trainable
    from llm.compile import compile_model
    from llm.tasks.lm import lm_loss
    from llm.tasks.lora import LoraOptions, add_lora

    torch.manual_seed(0)
    base = Transformer(ModelArgs.from_preset("debug"))
    extend_context(base, 2.0)
    lora = add_lora(base, LoraOptions(r=4, alpha=8, dropout=0.0))
    for name, p in lora.named_parameters():
        p.requires_grad_(longlora_trainable(name))
    enable_s2_attn(lora.get_base_model(), 0.25)
    for p in lora.parameters():  # LoRA's B starts at zero: give the adapters a real effect
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    tokens = torch.randint(0, 512, (2, 65))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    clf = Classifier(Transformer(ModelArgs.from_preset("debug")), num_labels=3)
    cbatch = {"input_ids": tokens[:, :-1], "lengths": torch.tensor([64, 40]), "labels": torch.tensor([0, 2])}
    for model, loss, b in ((lora, lm_loss, batch), (clf, classify_loss, cbatch)):
        model.train()
        eager = _loss_and_grads(model, b, lambda m, x: loss(m, x))
        compiled_model = copy.deepcopy(model)
        assert compile_model(compiled_model) == "2 decoder blocks"
        compiled = _loss_and_grads(compiled_model, b, lambda m, x: loss(m, x))
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
        assert compiled[1].keys() == eager[1].keys() and len(eager[1]) > 2
        for n in eager[1]:
            torch.testing.assert_close(compiled[1][n], eager[1][n], rtol=1e-4, atol=1e-6, msg=n)

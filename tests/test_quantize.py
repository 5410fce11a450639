"""tools/quantize.py and llm/quant.py: GPTQ and RTN through GPTQModel on a small Shakespeare model, checked against
transformers (+optimum) loading the same directory and against GPTQModel's own dequantization; bad input.

The SmolLM2-135M run (half an hour on 2 CPU cores) is not here; its command and figures are in tools/quantize.py.
"""
import json
import math
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm.errors import UserError
from llm.config import ModelArgs
from llm.hf_format import load_model, save_model
from llm.gptq_format import dequantize, unpack
from llm.hf_format import TRAINING_DATA_FILE
from llm.quant import LANGUAGE_TEXT, check_shapes, default_calibration, fitting_group_size, model_language, quantize
from llm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")


def tool(name):
    return runpy.run_path(str(ROOT / "tools" / f"{name}.py"))


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer, d=128 model trained for a few seconds on Shakespeare with its own sentencepiece tokenizer: small
    enough for fast GPTQ, trained enough (held-out ppl ~25 of 512) that quantization error shows in perplexity."""
    from llm.evaluate import corpus_tokens
    from llm.model import Transformer

    d = tmp_path_factory.mktemp("quant")
    tool("train_tokenizer")["train_tokenizer"](inputs=["builtin:shakespeare"], out=str(d / "tok" / "tokenizer.model"),
                                               vocab_size=512, max_sentences=5000, preset="debug")
    tok = Tokenizer(d / "tok" / "tokenizer.model")
    ids = torch.as_tensor(corpus_tokens("builtin:shakespeare", tok, split="train", max_tokens=100_000)[0])
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("debug", vocab_size=tok.vocab_size, dim=128, hidden_dim=384))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        i = torch.randint(0, len(ids) - 65, (16,))
        x, y = (torch.stack([ids[j + o:j + o + 64] for j in i]) for o in (0, 1))  # (16, 64)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_model(model, d / "model", tokenizer=tok)


FAST = dict(n_samples=32, seq_len=64, eval_tokens=4096, eval_ctx=128)


@pytest.fixture(scope="session")
def reports(tiny_lm) -> dict:
    """The 4-bit GPTQ pipeline with the defaults (no --calib: the model records no training data, so built-in
    text in its tokenizer's language), and GPTQ vs RTN at 2 bits, where rounding error is large enough on this
    small model for GPTQ's compensation to show clearly (at 4 bits both cost < 0.5% here)."""
    main = tool("quantize")["main"]
    runs = {"gptq": ("gptq", 4, None), "gptq2": ("gptq", 2, "builtin:shakespeare"),
            "rtn2": ("rtn", 2, "builtin:shakespeare")}
    return {k: main(model=str(tiny_lm), out=str(tiny_lm.parent / k), method=m, bits=b, calib=c, **FAST)
            for k, (m, b, c) in runs.items()}


def test_pipeline_report(reports, tiny_lm):
    g = reports["gptq"]
    assert g["group_size"] == 128  # default: 128 divides the in-features 128 and 384
    assert g["desc_act"] is False  # GPTQModel's act-group-aware order by default (act-order: --desc_act true)
    # no training_data.json: the Shakespeare-trained tokenizer's language, English; held out: its validation split
    assert g["calib"] == "builtin:shakespeare" and "in its language (en)" in g["calib_reason"]
    assert g["eval_data"] == "builtin:shakespeare"
    assert json.loads((tiny_lm.parent / "gptq" / "report.json").read_text()) == g
    orig = g["original"]["ppl"]
    assert 10 < orig < 60 and all(r["original"]["ppl"] == orig for r in reports.values())
    q = g["quantized"]
    assert math.isfinite(q["ppl"]) and math.isfinite(q["bpb"])
    assert abs(g["change"]["ppl"]) < 0.03  # 4-bit costs little on this model (~0.2%)
    assert g["size_bytes"]["quantized"] < 0.3 * g["size_bytes"]["original"]
    # GPTQ's error compensation beats plain rounding at the same bits and groups (measured: +3.4% vs +8.8%)
    g2, r2 = reports["gptq2"], reports["rtn2"]
    assert g2["quantized"]["ppl"] < r2["quantized"]["ppl"] and g2["quantized"]["bpb"] < r2["quantized"]["bpb"]
    assert 0 < g2["change"]["ppl"] < 0.75 * r2["change"]["ppl"] < 0.5


def test_calibrates_on_recorded_training_data(tiny_lm, tmp_path, capsys):
    """A model directory that records its training data (TRAINING_DATA_FILE, as the trainer writes it into
    run_dir/final) is calibrated on that data without --calib: SFT chats rendered with the chat template, the way
    the model saw them; the report's held-out text is their validation chats. The record travels with the output."""
    from llm.quant import text_tokens

    sft = tmp_path / "sft"
    shutil.copytree(tiny_lm, sft)
    (sft / TRAINING_DATA_FILE).write_text(json.dumps({"data": "builtin:chitchat"}) + "\n")
    r = tool("quantize")["main"](model=str(sft), out=str(tmp_path / "q"), n_samples=16, seq_len=64, eval_tokens=1024,
                                 eval_ctx=128)
    assert r["calib"] == r["eval_data"] == "builtin:chitchat" and TRAINING_DATA_FILE in r["calib_reason"]
    assert f"calibration text: builtin:chitchat (the training data recorded in {sft / TRAINING_DATA_FILE})" \
        in capsys.readouterr().out
    assert math.isfinite(r["quantized"]["ppl"]) and "eval_command" not in r  # tools/eval.py ppl reads no chats
    assert json.loads((tmp_path / "q" / "report.json").read_text())["calib"] == "builtin:chitchat"
    assert (tmp_path / "q" / TRAINING_DATA_FILE).read_bytes() == (sft / TRAINING_DATA_FILE).read_bytes()
    tok = Tokenizer.from_dir(sft)
    ids, n_bytes = text_tokens("builtin:chitchat", tok, "train", 400)
    assert len(ids) == 400 and tok.decode(ids.tolist()).startswith("<|im_start|>user\n") and n_bytes > 400


def test_calibration_language_of_a_model_from_elsewhere(tiny_lm, smollm2_dir, tmp_path, capsys):
    """No record: built-in text in the language the tokenizer encodes well — English for SmolLM2 (byte-level BPE
    without Chinese characters) and for a Shakespeare tokenizer, Chinese for a People's Daily one, both for one
    trained on builtin:demo. A record naming data that is gone warns and falls back the same way."""
    tok = Tokenizer.from_dir(tiny_lm)
    assert model_language(tok) == "en" and model_language(Tokenizer.from_dir(smollm2_dir)) == "en"
    train = tool("train_tokenizer")["train_tokenizer"]
    for src, lang in (("renmin", "zh"), ("demo", "en+zh")):
        out = tmp_path / src / "tokenizer.model"
        train(inputs=[f"builtin:{src}"], out=str(out), vocab_size=3000, max_sentences=5000, preset="debug")
        assert model_language(Tokenizer(out)) == lang
    assert LANGUAGE_TEXT == {"en": "builtin:shakespeare", "zh": "builtin:renmin", "en+zh": "builtin:demo"}
    moved = tmp_path / "moved"
    shutil.copytree(tiny_lm, moved)
    (moved / TRAINING_DATA_FILE).write_text(json.dumps({"data": str(tmp_path / "gone.jsonl")}))
    capsys.readouterr()
    src, why = default_calibration(moved, tok)
    assert src == "builtin:shakespeare" and "in its language (en)" in why
    assert "gone.jsonl' is not here" in capsys.readouterr().out


def test_transformers_loads_and_matches(reports, tiny_lm):
    """transformers (+optimum, GPTQModel's CPU int4 kernel) loads the directory; its logits match our dequantized
    model's; tokenizer files are the original's, so AutoTokenizer gives our ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tiny_lm.parent / "gptq"
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (tiny_lm / f).read_bytes()
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["bits"], cfg["group_size"], cfg["sym"]) == ("gptq", 4, 128, False)
    tok = Tokenizer.from_dir(out)
    text = "ROMEO. But soft, what light through yonder window breaks?"
    assert AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    ref = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    ours = load_model(out)
    x = torch.tensor([tok.encode(text * 3)[:96]])
    with torch.no_grad():
        a, b = ours(x), ref(x).logits.float()
    assert (a - b).abs().max() < 1e-2 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.97
    gen = ref.generate(x[:, :16], max_new_tokens=8, do_sample=False)
    assert gen.shape[0] == 1 and gen.shape[1] > 16


def test_dequantize_matches_gptqmodel(tiny_lm, tmp_path):
    """3-bit codes straddle int32 words and act-order permutes g_idx: our reader equals GPTQModel's own
    dequantizer and transformers' forward."""
    from gptqmodel.utils.model_dequant import convert_gptq_file
    from transformers import AutoModelForCausalLM

    from llm.evaluate import corpus_tokens

    ids = torch.as_tensor(corpus_tokens("builtin:shakespeare", Tokenizer.from_dir(tiny_lm), "train", 32 * 64)[0])
    out = quantize(tiny_lm, tmp_path / "q3", [ids[i:i + 64].tolist() for i in range(0, len(ids), 64)], bits=3,
                   group_size=32, desc_act=True, sym=False)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    expected = convert_gptq_file(out / "model.safetensors", torch.float32, qcfg, "cpu")
    ours = load_model(out)
    params = dict(ours.named_parameters())
    for k in (k for k in expected if k.endswith("proj.weight")):
        torch.testing.assert_close(params[k], expected[k].float(), rtol=0, atol=0)
    ref = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    x = ids[None, :64]
    with torch.no_grad():
        a, b = ours(x), ref(x).logits.float()
    assert (a - b).abs().max() < 1e-2 * a.abs().max()


def test_unpack_bitstream():
    codes = torch.randint(0, 8, (5, 64))  # 3-bit codes, two 32-code blocks of 3 words per row
    bits = ((codes.unsqueeze(-1) >> torch.arange(3)) & 1).flatten(1)  # (5, 192) little end first
    words = (bits.view(5, 6, 32) << torch.arange(32)).sum(-1)  # (5, 6) as unsigned
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    assert torch.equal(unpack(words, 3, 64), codes)
    # the formula: (q - z) * s with zeros stored minus one (GPTQ v1)
    q = torch.tensor([[3, 0]], dtype=torch.int32)  # packed along in: in=8 codes of 4 bits in one word, out=2
    zeros, scales, g_idx = torch.tensor([[0x77]], dtype=torch.int32), torch.tensor([[0.5, 2.0]]), torch.zeros(8).int()
    w = dequantize(q, zeros, scales, g_idx, bits=4, zeros_minus_one=True)  # zero points 7 + 1 = 8
    assert w.shape == (2, 8) and w[0, 0] == (3 - 8) * 0.5 and w[1, 0] == (0 - 8) * 2.0 and w[0, 1] == -4.0


# ----------------------------------------------------------------------------------------------- bad input
def test_group_size_checks():
    seeds = ModelArgs(dim=512, n_layers=8, n_heads=8, multiple_of=32)  # the seeds' default: SwiGLU 1376 = 32 * 43
    assert seeds.hidden_dim == 1376
    with pytest.raises(UserError, match=r"does not divide the in-features of mlp.down_proj \(1376.* --group_size 32"):
        check_shapes(seeds, 4, 128, "config.json")
    smollm2 = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152)
    assert fitting_group_size(smollm2) == 64
    with pytest.raises(UserError, match="use --group_size 64"):
        check_shapes(smollm2, 4, 128, "config.json")
    check_shapes(smollm2, 4, 64, "config.json")
    check_shapes(smollm2, 4, -1, "config.json")
    with pytest.raises(UserError, match="--bits 5: not supported"):
        check_shapes(smollm2, 5, 64, "config.json")
    with pytest.raises(UserError, match="multiples of 32 — use --bits 4"):  # 3-bit packs 32 codes per 3 words
        check_shapes(ModelArgs(dim=80, n_heads=5, hidden_dim=160), 3, 16, "config.json")


def test_bad_input(tiny_lm, reports, tmp_path):
    main = tool("quantize")["main"]
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question.\n" * 20)
    mine = tmp_path / "mine"  # the user's folder: never replaced, whatever the flags
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    if not (tiny_lm.parent / "rtn2-model").exists():
        shutil.copytree(tiny_lm, tiny_lm.parent / "rtn2-model")  # another model directory of the toolkit
    cases = [
        (dict(model=str(tmp_path / "empty")), "no config.json"),
        (dict(model=str(tiny_lm.parent / "gptq")), "already quantized"),
        (dict(model=str(tiny_lm), bits=5), "--bits 5: not supported"),
        (dict(model=str(tiny_lm), group_size=96), r"does not divide .* use --group_size 64"),
        (dict(model=str(tiny_lm), calib=str(short), n_samples=32, seq_len=64), "fewer than --n_samples 32"),
        (dict(model=str(tiny_lm), out=str(tiny_lm.parent / "gptq")),
         r"already holds a gptq directory — pass --overwrite true to replace it"),
        (dict(model=str(tiny_lm), out=str(tiny_lm), overwrite=True), "is the input"),
        (dict(model=str(tiny_lm), out=str(mine)), r"not made by this toolkit .*\(--overwrite included\)"),
        (dict(model=str(tiny_lm), out=str(mine), overwrite=True), r"not made by this toolkit .*\(--overwrite included\)"),
        (dict(model=str(tiny_lm), out=str(tiny_lm.parent / "rtn2-model"), overwrite=True),
         "holds a model directory of this toolkit, not a gptq one"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            main(**{"out": str(out), **kwargs})
        assert not out.exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(UserError, match=r"no runs-that-do-not-exist/\*/final model directory"):
        tool("quantize")["newest_run_model"]("runs-that-do-not-exist")
    # a failure inside GPTQModel (no calibration windows) leaves nothing behind either
    with pytest.raises(ValueError, match="[Cc]alibration"):
        quantize(tiny_lm, out, [])
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # the command line: one line, exit 2, no traceback
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "quantize.py"), "--model", str(tiny_lm), "--bits", "5"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --bits 5") and "Traceback" not in r.stderr

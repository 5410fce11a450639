"""Evaluation on SmolLM2-135M-Instruct (converted from the GGUF): sliding-window perplexity == transformers' loss on
the same directory and text (4 significant digits), multiple-choice log-likelihoods == transformers' (our packed
scoring runs each context once), HellaSwag accuracy in the published range, passkey retrieval, the CLI's --json
and bits per byte on a prepared .bin split, and its one-line errors."""
import json
import math
import runpy
from pathlib import Path

import pytest
import torch

from llm import evaluate as ev
from llm.cli import run_cli
from llm.corpora import iter_documents
from llm.hf_format import load_model
from llm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
EVAL = runpy.run_path(str(ROOT / "tools" / "eval.py"))
CLI = {name: EVAL[name] for name in ("ppl", "mc", "passkey")}


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return load_model(smollm2_dir), Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text() -> str:
    return next(iter_documents("builtin:shakespeare", "val"))[:2500]


def test_perplexity_matches_transformers(smol, hf, text):
    model, tok = smol
    ids = torch.tensor(tok.encode(text))[:500]
    ctx, stride = 192, 96
    ours = ev.perplexity(model, ids, ctx, stride, batch_size=3)
    assert ours["tokens"] == len(ids) - 1
    assert ev.perplexity(model, ids, ctx, stride, batch_size=1)["nll"] == pytest.approx(ours["nll"], rel=1e-6)
    # the reference: transformers' own shifted cross-entropy, labels -100 on the context-only tokens
    nll, prev_end = 0.0, 1
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + ctx, len(ids))
            scored = end - prev_end
            x = ids[begin:end][None]
            labels = x.clone()
            labels[:, :x.shape[1] - scored] = -100
            nll += hf(x, labels=labels).loss.item() * scored
            prev_end = end
            if end == len(ids):
                break
    ref_ppl = math.exp(nll / (len(ids) - 1))
    assert f"{ours['ppl']:.4g}" == f"{ref_ppl:.4g}" and ours["ppl"] == pytest.approx(ref_ppl, rel=2e-5)
    assert 5 < ours["ppl"] < 100  # Shakespeare for a 135M model


def test_choice_logliks_match_transformers(smol, hf):
    model, tok = smol
    examples = ev.load_task("hellaswag", 3) + ev.load_task("winogrande", 2)
    ours = ev.choice_logliks(model, tok, examples, batch_size=2)
    with torch.no_grad():
        for ex, got in zip(examples, ours):
            for ctx, end, g in zip(ex.contexts, ex.endings, got):
                c = tok.encode(ctx)
                full = tok.encode(ctx + end)
                logp = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), -1)
                want = sum(logp[i - 1, full[i]].item() for i in range(len(c), len(full)))
                assert g == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_hellaswag_accuracy(smol, capsys, tmp_path):
    """Published SmolLM2-135M HellaSwag ~0.41 (acc_norm); 500 questions give 0.4 here (see the report); a quick
    sample of 40 with a loose bound keeps the suite fast."""
    model, tok = smol
    r = ev.multiple_choice(model, tok, ev.load_task("hellaswag", 40), batch_size=20)
    assert r["n"] == 40 and 0.3 <= r["acc_norm"] <= 0.6 and 0.25 <= r["acc"] <= 0.6, r


def test_cli_mc_jsonl_and_passkey(smollm2_dir, tmp_path, capsys):
    qs = tmp_path / "qs.jsonl"
    qs.write_text("\n".join(json.dumps(q) for q in [
        {"context": "The capital of France is", "endings": ["the moon.", "Paris.", "a banana."], "label": 1},
        {"context": "Two plus two equals", "endings": ["four.", "purple.", "Tuesday."], "label": 0},
    ]) + "\n")
    out = tmp_path / "mc.json"
    run_cli(CLI, ["mc", "--model", str(smollm2_dir), "--task", str(qs), "--json", str(out)])
    r = json.loads(out.read_text())
    assert (r["n"], r["acc"], r["acc_norm"], r["written_by"]) == (2, 1.0, 1.0, "tools/eval.py")
    run_cli(CLI, ["mc", "--model", str(smollm2_dir), "--task", str(qs), "--json", str(out), "--limit", "1"])
    assert json.loads(out.read_text())["n"] == 1  # its own report: replaced
    mine = tmp_path / "mine.json"  # a user's file: refused before the work, untouched
    mine.write_text('{"n": 7}')
    with pytest.raises(SystemExit) as e:
        run_cli(CLI, ["mc", "--model", str(smollm2_dir), "--task", str(qs), "--json", str(mine)])
    assert e.value.code == 2 and "is not a report of this toolkit" in capsys.readouterr().err
    assert mine.read_text() == '{"n": 7}'
    out = tmp_path / "pk.json"
    run_cli(CLI, ["passkey", "--model", str(smollm2_dir), "--lengths", "[200]", "--trials", "2", "--batch_size", "2",
                  "--json", str(out)])
    r = json.loads(out.read_text())["results"]
    assert r[0]["length"] == 200 and abs(r[0]["tokens"] - 200) < 30 and r[0]["accuracy"] == 1.0


def test_cli_ppl_on_bin_split(smollm2_dir, smol, text, tmp_path):
    from llm.prepare import prepare

    src = tmp_path / "doc.txt"
    src.write_text(text[:1000] + "\n\n" + text[1000:2000] + "\n", encoding="utf-8")
    data = tmp_path / "data"
    prepare(str(src), out=str(data), tokenizer=str(smollm2_dir / "tokenizer.json"), val_fraction=0.5, workers=1)
    meta = json.loads((data / "meta.json").read_text())
    split = "val" if meta["splits"]["val"]["tokens"] else "train"
    out = tmp_path / "ppl.json"
    run_cli(CLI, ["ppl", "--model", str(smollm2_dir), "--source", str(data), "--split", split, "--ctx_len", "128",
                  "--json", str(out)])
    r = json.loads(out.read_text())
    info = meta["splits"][split]
    assert (r["tokens"], r["bytes"], r["stride"]) == (info["tokens"] - 1, info["bytes"], 64)
    ids, _ = ev.corpus_tokens(str(data), None, split)
    want = ev.perplexity(smol[0], ids, 128, 64)
    assert r["ppl"] == pytest.approx(want["ppl"], rel=1e-6)
    assert r["bpb"] == pytest.approx(want["nll"] / math.log(2) / info["bytes"], rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["mc", "--task", "hellaswagg"], "unknown task 'hellaswagg'"),
    (["mc", "--task", "{bad}"], ":2: bad example"),
    (["ppl", "--source", "no/such/file.txt"], "not a text file, a data directory"),
    (["passkey", "--lengths", "[8]"], "at least 64 tokens"),
])
def test_cli_errors(smollm2_dir, tmp_path, capsys, args, message):
    if "{bad}" in args:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"context": "a", "endings": ["b", "c"], "label": 0}\n{"context": "a", "endings": "b"}\n')
        args = [a.replace("{bad}", str(bad)) for a in args]
    with pytest.raises(SystemExit) as e:
        run_cli(CLI, args[:1] + ["--model", str(smollm2_dir)] + args[1:])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_not_a_model_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(CLI, ["ppl", "--model", str(tmp_path), "--source", "builtin:shakespeare"])
    assert e.value.code == 2 and "config.json" in capsys.readouterr().err

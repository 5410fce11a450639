"""Nothing a user made is ever lost (issue 17): no command deletes or replaces a folder or file it did not create,
with or without --overwrite, also when pointed at its own inputs' folders or at a run directory; a run directory
is used by one training at a time (llm.rundir)."""
import hashlib
import json
import os
import runpy
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llm import writer
from llm.cli import run_cli
from llm.errors import UserError
from llm.corpora import iter_documents
from llm.rundir import LOCK, RunLock

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "pretrain" / "debug.yaml")
PREPARE = runpy.run_path(str(ROOT / "tools" / "prepare_data.py"))
CONVERT = runpy.run_path(str(ROOT / "tools" / "convert.py"))["SUBCOMMANDS"]
from llm.tokenizer_train import HF_FILES, train_tokenizer as TOKENIZER  # noqa: E402,N812


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (sha256) and folder under `roots`: compared before and after a refused command."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]) if root.exists() else []:
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(capsys, component, argv: list[str], path: Path, *roots: Path) -> str:
    """Run a CLI in this process: exit 2, one error line naming `path`, no traceback, nothing under roots changed."""
    before = snapshot(*roots)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(component, args=argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert e.value.code == 2 and len(lines) == 1 and str(path) in lines[0] and "Traceback" not in err, err
    assert snapshot(*roots) == before
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A user's folder: real text, a tokenizer trained on it by the toolkit, and a notes file of their own."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "text.txt").write_text("\n\n".join(iter_documents("builtin:shakespeare", "train", max_bytes=60_000)),
                                encoding="utf-8")
    (d / "notes.md").write_text("my own notes\n")
    TOKENIZER(inputs=[str(d / "text.txt")], out=str(d.parent / "tok" / "tokenizer.model"), vocab_size=400,
              max_sentences=5_000, preset="debug")
    return d


@pytest.fixture(scope="module")
def tok(corpus) -> Path:
    return corpus.parent / "tok" / "tokenizer.model"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok) -> Path:
    from llm.config import ModelArgs
    from llm.hf_format import save_model
    from llm.model import Transformer
    from llm.tokenizer import Tokenizer

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model") / "m"
    save_model(Transformer(ModelArgs.from_preset("debug", vocab_size=400)), d, tokenizer=Tokenizer.from_file(tok))
    return d


def user_dir(root: Path, name="mine") -> Path:
    d = root / name
    (d / "sub").mkdir(parents=True)
    (d / "photo.jpg").write_bytes(b"\xff\xd8 not really")
    (d / "sub" / "thesis.tex").write_text("\\begin{document}")
    return d


def run_dir(root: Path) -> Path:
    """A run directory as training leaves it (marker via the lock; checkpoints, metrics, TensorBoard logs)."""
    d = root / "run"
    with RunLock(d):
        (d / "checkpoints" / "step_00000010").mkdir(parents=True)
        (d / "checkpoints" / "step_00000010" / "trainer_state.json").write_text("{}")
        (d / "metrics.csv").write_text("step,loss\n10,5.0\n")
        (d / "tb").mkdir()
        (d / "tb" / "events.out").write_bytes(b"\0" * 16)
    return d


# ----------------------------------------------------------------------------------------------- prepare_data
@pytest.mark.parametrize("overwrite", [[], ["--overwrite", "true"]], ids=["plain", "overwrite"])
def test_prepare_data_never_replaces_the_inputs_folder_or_a_folder_not_its_own(capsys, corpus, tok, tmp_path,
                                                                               overwrite):
    prep = PREPARE["prepare"]
    base = ["--inputs", str(corpus / "text.txt"), "--tokenizer", str(tok), "--workers", "1", *overwrite]
    refused(capsys, prep, [*base, "--out", str(corpus)], corpus, corpus)  # the corpus's own folder
    refused(capsys, prep, [*base, "--out", str(corpus / "text.txt")], corpus / "text.txt", corpus)  # the input
    refused(capsys, prep, [*base, "--out", str(tok.parent)], tok.parent, tok.parent)  # the tokenizer's folder
    mine = user_dir(tmp_path)
    refused(capsys, prep, [*base, "--out", str(mine)], mine, mine)
    run = run_dir(tmp_path)
    line = refused(capsys, prep, [*base, "--out", str(run)], run, run)
    assert "run directory" in line


def test_prepare_data_replaces_its_own_output_only_with_overwrite(capsys, corpus, tok, tmp_path):
    from llm.prepare import prepare

    out = tmp_path / "data"
    prepare([str(corpus / "text.txt")], out=str(out), tokenizer=str(tok), workers=1)
    assert writer.owner(out) == "data" and json.loads((out / writer.MARKER).read_text())["kind"] == "data"
    prepare([str(corpus / "text.txt")], out=str(out), tokenizer=str(tok), workers=1)  # up to date: a no-op
    base = ["--inputs", str(corpus / "text.txt"), "--tokenizer", str(tok), "--workers", "1", "--out", str(out)]
    refused(capsys, PREPARE["prepare"], [*base, "--seed", "1"], out, out)  # other settings: needs --overwrite
    run_cli(PREPARE["prepare"], args=[*base, "--seed", "1", "--overwrite", "true"])
    assert json.loads((out / "meta.json").read_text())["seed"] == 1
    # a data directory written before markers existed (meta.json "complete": true, shards only) is ours too
    (out / writer.MARKER).unlink()
    assert writer.owner(out) == "data"
    run_cli(PREPARE["prepare"], args=[*base, "--overwrite", "true"])
    assert json.loads((out / "meta.json").read_text())["seed"] == 0 and (out / writer.MARKER).is_file()


# ----------------------------------------------------------------------------------------------- convert
@pytest.mark.parametrize("overwrite", [[], ["--overwrite", "true"]], ids=["plain", "overwrite"])
def test_convert_never_replaces_a_folder_it_did_not_make_or_a_run_directory(capsys, model_dir, tmp_path, overwrite):
    gguf = tmp_path / "m.gguf"
    run_cli(CONVERT, args=["to_gguf", "--src", str(model_dir), "--dst", str(gguf), "--dtype", "f32"])
    mine, run = user_dir(tmp_path), run_dir(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    for dst in (mine, run, model_dir.parent):  # a user's folder, a run directory, the folder holding the input
        for argv in (["from_gguf", "--src", str(gguf)], ["from_deepspeed", "--src", str(run)],
                     ["merge_lora", "--base", str(model_dir), "--adapter", str(adapter)]):
            refused(capsys, CONVERT, [*argv, "--dst", str(dst), *overwrite], dst, mine, run, model_dir.parent)
    line = refused(capsys, CONVERT, ["from_deepspeed", "--src", str(run), "--dst", str(run), *overwrite], run, run)
    assert "input" in line or "run directory" in line
    # a model directory of its own: replaced with --overwrite only
    out = tmp_path / "hf"
    run_cli(CONVERT, args=["from_gguf", "--src", str(gguf), "--dst", str(out)])
    assert writer.owner(out) == "model"
    if not overwrite:
        refused(capsys, CONVERT, ["from_gguf", "--src", str(gguf), "--dst", str(out)], out, out)
    else:
        (out / "stale.txt").write_text("x")  # an extra file: no longer exactly ours, but the marker says it is
        run_cli(CONVERT, args=["from_gguf", "--src", str(gguf), "--dst", str(out), *overwrite])
        assert not (out / "stale.txt").exists() and (out / "config.json").is_file()


def test_to_gguf_replaces_only_a_gguf_and_only_with_overwrite(capsys, model_dir, tmp_path):
    gguf = tmp_path / "m.gguf"
    argv = ["to_gguf", "--src", str(model_dir), "--dtype", "f32", "--dst"]
    run_cli(CONVERT, args=[*argv, str(gguf)])
    refused(capsys, CONVERT, [*argv, str(gguf)], gguf, tmp_path)  # exists: --overwrite needed
    text = tmp_path / "report.txt"
    text.write_text("not a model\n")
    refused(capsys, CONVERT, [*argv, str(text)], text, tmp_path)
    refused(capsys, CONVERT, [*argv, str(text), "--overwrite", "true"], text, tmp_path)  # not a GGUF: never
    refused(capsys, CONVERT, [*argv, str(text / "m.gguf")], text, tmp_path)  # a file in the way of the folder
    line = refused(capsys, CONVERT, [*argv, str(tmp_path), "--overwrite", "true"], tmp_path, tmp_path)
    assert "is a directory" in line
    cfg = model_dir / "config.json"
    refused(capsys, CONVERT, [*argv, str(cfg), "--overwrite", "true"], cfg, model_dir)  # one of the inputs
    gguf.write_bytes(gguf.read_bytes()[:64])  # an (old, damaged) GGUF of ours: replaced with --overwrite
    run_cli(CONVERT, args=[*argv, str(gguf), "--overwrite", "true"])
    assert gguf.stat().st_size > 64 and not list(tmp_path.glob(".m.gguf.tmp-*"))


# ----------------------------------------------------------------------------------------------- tokenizer, save_model
@pytest.mark.parametrize("overwrite", [[], ["--overwrite", "true"]], ids=["plain", "overwrite"])
def test_train_tokenizer_never_replaces_files_it_did_not_write(capsys, corpus, tmp_path, overwrite):
    base = ["--inputs", str(corpus / "text.txt"), "--vocab_size", "400", "--preset", "debug", *overwrite]
    mine = tmp_path / "model"  # someone's model folder with their own tokenizer files
    mine.mkdir()
    (mine / "tokenizer.json").write_text('{"theirs": true}')
    (mine / "weights.bin").write_bytes(b"\1" * 32)
    refused(capsys, TOKENIZER, [*base, "--out", str(mine)], mine / "tokenizer.json", mine)  # DIR = DIR/tokenizer.model
    refused(capsys, TOKENIZER, [*base, "--out", str(mine / "x.model")], mine / "tokenizer.json", mine)
    text = corpus / "text.txt"
    refused(capsys, TOKENIZER, [*base, "--out", str(text)], text, corpus)  # the input itself


def test_train_tokenizer_into_an_existing_folder_writes_inside_it(corpus, tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "README").write_text("mine")
    TOKENIZER(inputs=[str(corpus / "text.txt")], out=str(d), vocab_size=400, max_sentences=5_000, preset="debug")
    assert {p.name for p in d.iterdir()} == {"README", "tokenizer.model", *HF_FILES}
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # nothing written next to the folder


def test_save_model_replaces_only_its_own_model_directories(model_dir, tmp_path):
    from llm.hf_format import load_model, save_model

    model = load_model(model_dir)
    out = tmp_path / "m"
    save_model(model, out)
    save_model(model, out)  # re-saving its own output (run re-runs rely on this)
    assert writer.owner(out) == "model"
    for dst in (user_dir(tmp_path), run_dir(tmp_path)):
        before = snapshot(dst)
        with pytest.raises(UserError, match=str(dst)):
            save_model(model, dst)
        assert snapshot(dst) == before
    with pytest.raises(UserError, match="input"):
        save_model(model, model_dir.parent, inputs=(model_dir,))


# ----------------------------------------------------------------------------------------------- run-directory lock
@pytest.fixture
def locked_run(corpus, tok, tmp_path):
    """(data, run dir, pid): shards made from the corpus, and a run directory another process holds locked."""
    from llm.prepare import prepare

    data = tmp_path / "data"
    prepare([str(corpus / "text.txt")], out=str(data), tokenizer=str(tok), workers=1)
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from llm.rundir import RunLock\n"
                               f"l = RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield data, run, holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_training_in_a_locked_run_directory_fails_in_one_line(locked_run):
    data, run, pid = locked_run
    before = snapshot(run)
    r = subprocess.run([sys.executable, str(ROOT / "llm" / "pretrain.py"), "--config", DEBUG, "--data", str(data),
                        "--train.run_dir", str(run), "--train.max_steps", "4", "--train.sample_prompts", "[]"],
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert str(run) in lines[0] and f"pid {pid} on {socket.gethostname()}" in lines[0], lines
    assert snapshot(run) == before


def test_under_a_launcher_no_rank_waits_for_a_refused_lock(locked_run):
    """2 CPU ranks started as a launcher starts them (its environment, no launcher to kill the rest): rank 0
    cannot take the lock and alone prints the line; every rank exits 2 by itself, none waits in a collective."""
    from test_pretrain import clean_env, free_port

    data, run, pid = locked_run
    before = snapshot(run)
    world = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, str(ROOT / "llm" / "pretrain.py"), "--config", DEBUG, "--data",
                               str(data), "--train.run_dir", str(run), "--train.max_steps", "4",
                               "--train.sample_prompts", "[]"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=clean_env() | world | {"RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    errors = [[line for line in err.splitlines() if line.strip()] for _, err in outs]
    assert [p.returncode for p in ranks] == [2, 2], outs
    assert len(errors[0]) == 1 and f"{run}: in use by another training (pid {pid}" in errors[0][0], errors
    assert errors[1] == [], errors
    assert snapshot(run) == before


def test_a_stale_lock_is_taken_over_with_a_warning(capsys, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}))
    with RunLock(run):
        warning = capsys.readouterr().err.strip()
        assert warning.startswith("warning: ") and f"stale lock of pid {dead.pid}" in warning and "\n" not in warning
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            RunLock(run).acquire()  # held: the next start is refused
    assert not (run / LOCK).exists()  # released at the end
    with pytest.raises(RuntimeError):  # released also when the training fails
        with RunLock(run):
            time.sleep(0)
            raise RuntimeError("boom")
    assert not (run / LOCK).exists()
    with RunLock(run):
        assert capsys.readouterr().err == ""  # no warning: nothing stale was left


def test_os_errors_about_paths_are_one_line(tmp_path, capsys):
    """run_cli turns an OSError about a path (a folder where a file is expected, a missing parent) into one line
    naming the path, exit 2, no traceback."""
    from llm.cli import run_cli

    def write(path: str):
        """Write a file."""
        Path(path).write_text("x")

    for target, words in ((tmp_path, "give a file path"), (tmp_path / "no" / "such" / "f.txt", "check the path")):
        with pytest.raises(SystemExit) as e:
            run_cli(write, ["--path", str(target)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and str(target) in err[0] and words in err[0], err

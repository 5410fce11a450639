"""Reliability suite: the faults real runs meet, on the tiny `debug` model in single CPU processes.

A run SIGKILLed at random steps (twice) and resumed with `--train.resume auto` ends with exactly the weights of an
uninterrupted run; SIGTERM leaves a resumable checkpoint and a clean exit; a truncated newest checkpoint is skipped
with a warning; a prepare_data process killed midway leaves nothing that looks like valid data; a NaN loss step
does not reach the weights or the checkpoints; and every CLI answers bad input with one line naming the culprit.
Every launch is the real command line (`python llm/pretrain.py ...`, `python tools/*.py ...`) in a subprocess.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm.corpora import iter_documents
from llm.tokenizer_train import train_tokenizer
from llm.train.checkpoint import consolidated_state_dict, find_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DEBUG = str(ROOT / "configs" / "pretrain" / "debug.yaml")
STEPS = 10
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {k: v for k, v in os.environ.items() if k not in DIST_ENV} | {"OMP_NUM_THREADS": "1",
                                                                   "PYTHONUNBUFFERED": "1"}


def pretrain_cmd(data: Path, run: Path, *extra) -> list[str]:
    """debug.yaml, a checkpoint every step (so a kill lands between two), no evaluation until the end."""
    return [PY, str(ROOT / "llm" / "pretrain.py"), "--config", DEBUG, "--data", str(data), "--train.run_dir",
            str(run), "--train.max_steps", str(STEPS), "--train.save_every", "1", "--train.keep_checkpoints", "3",
            "--train.eval_every", "1000", "--train.sample_prompts", "[]", *map(str, extra)]


def run_ok(cmd, timeout=240) -> str:
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def complete_steps(run: Path) -> list[int]:
    ck = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in ck.glob("step_*") if (p / "trainer_state.json").is_file()) \
        if ck.is_dir() else []


def launch_until(cmd, log: Path, ready, timeout=180) -> subprocess.Popen:
    """Start cmd in its own process group and return once ready() holds (the process still running)."""
    p = subprocess.Popen(cmd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while not ready():
        if p.poll() is not None or time.time() > deadline:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"never reached the kill point (rc {p.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    return p


def same_weights(a: Path, b: Path):
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Real English + Chinese text, a real 1,500-token sentencepiece tokenizer and shards, built in-process
    (the CLIs themselves are exercised below)."""
    from llm.prepare import prepare

    d = tmp_path_factory.mktemp("faults-data")
    text = [doc.strip() for src in ("builtin:shakespeare", "builtin:renmin")
            for doc in iter_documents(src, "train", max_bytes=60_000)]
    (d / "text.txt").write_text("\n\n".join(text), encoding="utf-8")
    train_tokenizer(
        inputs=[str(d / "text.txt")], out=str(d / "tok" / "tokenizer.model"), vocab_size=1500, preset="debug")
    prepare([str(d / "text.txt")], out=str(d / "data"), tokenizer=str(d / "tok" / "tokenizer.model"),
            val_fraction=0.05, workers=1)
    return d / "data"


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    run = tmp_path_factory.mktemp("faults-ref") / "run"
    run_ok(pretrain_cmd(data_dir, run))
    assert (run / "final" / "model.safetensors").is_file()
    return run


# ----------------------------------------------------------------------------------------------- training faults
def test_sigkill_at_random_steps_then_resume_gives_the_same_weights(data_dir, reference, tmp_path):
    seed = int(os.environ.get("FAULTS_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    first = rng.randint(1, 3)
    kills = [first, rng.randint(first + 2, STEPS - 3)]  # steps reached before each SIGKILL
    print(f"SIGKILL after checkpoints {kills} (FAULTS_SEED={seed} repeats them)")
    run = tmp_path / "run"
    for i, k in enumerate(kills):
        extra = ("--train.resume", "auto") if i else ()
        k = max(k, complete_steps(run)[-1] + 1) if i else k  # a step this launch has to reach itself
        p = launch_until(pretrain_cmd(data_dir, run, *extra), tmp_path / f"log{i}.txt",
                         lambda: complete_steps(run) and complete_steps(run)[-1] >= k)
        os.killpg(p.pid, signal.SIGKILL)  # mid-step or mid-save: whatever it was doing
        assert p.wait(timeout=30) == -signal.SIGKILL
        assert not (run / "final").exists()
        if i:
            assert f"resumed from {run / 'checkpoints'}" in (tmp_path / f"log{i}.txt").read_text()
    out = run_ok(pretrain_cmd(data_dir, run, "--train.resume", "auto"))
    assert "resumed from" in out, out[-3000:]
    same_weights(run, reference)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["skipped_steps"] == 0


@pytest.fixture(scope="module")
def stopped(data_dir, tmp_path_factory) -> tuple[Path, int, str]:
    """A run stopped with SIGTERM after its 3rd checkpoint: (run dir, return code, output)."""
    base = tmp_path_factory.mktemp("faults-term")
    run = base / "run"
    p = launch_until(pretrain_cmd(data_dir, run), base / "log.txt",
                     lambda: complete_steps(run) and complete_steps(run)[-1] >= 3)
    p.send_signal(signal.SIGTERM)  # the process itself: a plain `python` start has no launcher
    rc = p.wait(timeout=60)
    return run, rc, (base / "log.txt").read_text()


def test_sigterm_leaves_a_resumable_checkpoint_and_exits_cleanly(stopped):
    run, rc, out = stopped
    assert rc == 0, out[-3000:]
    assert "stopped by signal 15" in out and "--train.resume auto" in out, out[-3000:]
    assert "Traceback" not in out
    last = find_checkpoint(run)
    k = int(last.name[5:])
    assert 3 <= k < STEPS and not (run / "final").exists()
    assert json.loads((run / "summary.json").read_text())["stopped"] is True
    # resuming it is the next test (which also corrupts the newest checkpoint first)


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(stopped, data_dir, reference):
    """The SIGTERMed run, its newest checkpoint then truncated: resume skips it, loudly, continues from the one
    before and still ends bit-identical to the uninterrupted run."""
    run = stopped[0]
    newest, previous = (run / "checkpoints" / f"step_{s:08d}" for s in complete_steps(run)[-1:-3:-1])
    victim = max((f for f in newest.rglob("*.pt")), key=lambda f: f.stat().st_size)
    os.truncate(victim, victim.stat().st_size // 2)  # a disk that filled up / a copy cut short
    out = run_ok(pretrain_cmd(data_dir, run, "--train.resume", "auto"))
    assert f"warning: skipping checkpoint {newest}" in out and victim.name in out and "truncated" in out, out[-3000:]
    assert f"resumed from {previous} (step {int(previous.name[5:])}" in out, out[-3000:]
    same_weights(run, reference)


NAN_DRIVER = r'''
import sys
import torch
from llm.config import ModelArgs
from llm.data import PretrainDataset
from llm.model import Transformer
from llm.tasks.lm import LanguageModelTask, lm_loss
from llm.train import Split, TrainConfig, fit

data, base, bad = sys.argv[1], sys.argv[2], int(sys.argv[3])

class NaNAtOneStep(LanguageModelTask):
    def loss(self, engine, batch):  # the loss of one step's batch turns NaN (a bad batch, an overflow)
        loss = lm_loss(engine, batch)
        return loss * float("nan") if engine.training and engine.global_steps + 1 == bad else loss

for stage in (0, 1):  # ZeRO-0 fp32: the trainer's own non-finite check; ZeRO-1: DeepSpeed's
    ds = PretrainDataset(data, "train", 32)
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("debug", vocab_size=ds.meta["vocab_size"]))
    cfg = TrainConfig(run_dir=f"{base}/zero{stage}", ds_config=f"zero{stage}", precision="fp32", micro_batch_size=4,
                      lr=3e-3, min_lr=3e-4, warmup_steps=1, max_steps=6, log_every=1, eval_every=100, save_every=1,
                      keep_checkpoints=10)
    fit(NaNAtOneStep(model, Split(ds, sharded=True, seq_len=32),
                           Split(PretrainDataset(data, "val", 32), sharded=True, seq_len=32)), cfg)
'''


@pytest.fixture(scope="module")
def nan_runs(data_dir, tmp_path_factory) -> tuple[Path, str]:
    """Two runs (ZeRO-0 and ZeRO-1, one process) through fit() whose loss is NaN at step 3."""
    base = tmp_path_factory.mktemp("faults-nan")
    (base / "driver.py").write_text(NAN_DRIVER)
    return base, run_ok([PY, str(base / "driver.py"), str(data_dir), str(base), "3"])


@pytest.mark.parametrize("stage", [0, 1])
def test_nan_batch_is_skipped_and_never_reaches_weights_or_checkpoints(nan_runs, stage):
    base, out = nan_runs
    run = base / f"zero{stage}"
    assert "step 3: non-finite loss or gradient" in out and "update skipped" in out, out[-3000:]
    ck = {s: consolidated_state_dict(run / "checkpoints" / f"step_{s:08d}", stage) for s in (2, 3, 4, 6)}
    for k in ck[2]:
        assert torch.equal(ck[2][k], ck[3][k]), k  # the NaN step changed nothing
    assert any(not torch.equal(ck[3][k], ck[4][k]) for k in ck[3])  # and training went on
    for sd in ck.values():
        assert all(torch.isfinite(v).all() for v in sd.values())
    final = load_file(run / "final" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())
    state = json.loads((run / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())["state"]
    assert state["skipped_steps"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["val_loss"] == summary["val_loss"]  # finite, not NaN


# ----------------------------------------------------------------------------------------------- data faults
def test_sigkill_while_preparing_data_leaves_nothing_valid_and_rerun_completes(data_dir, tmp_path):
    src = tmp_path / "big.txt"  # ~1 MB in 50 kB tasks: long enough to be caught midway
    text = "\n\n".join(iter_documents("builtin:shakespeare", "train", max_bytes=1_000_000))
    src.write_text(text, encoding="utf-8")
    tok = json.loads((data_dir / "meta.json").read_text())["tokenizer"]
    out = tmp_path / "data"
    cmd = [PY, str(ROOT / "tools" / "prepare_data.py"), "--inputs", str(src), "--out", str(out), "--tokenizer", tok,
           "--workers", "1", "--chunk_mb", "0.05", "--max_shard_tokens", "20000"]

    def writing() -> bool:  # a shard is being written in the hidden build directory
        return any(f.stat().st_size > 0 for f in tmp_path.glob(".data.tmp-*/train_*.bin"))

    p = launch_until(cmd, tmp_path / "log.txt", writing)
    os.killpg(p.pid, signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert not (out / "meta.json").exists() and not list(out.glob("*.bin"))  # only the hidden build dir is left
    # what is left is recognised as an interrupted build by the readers, with one clear line
    r = subprocess.run(pretrain_cmd(out, tmp_path / "run"), env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{out / 'meta.json'}: not found" in r.stderr or "not complete" in r.stderr, r.stderr
    from llm.errors import UserError
    from llm.data import read_meta

    with pytest.raises(UserError, match="not complete"):
        read_meta(out)
    run_ok(cmd)  # the same command again completes
    meta = read_meta(out)
    assert meta["complete"] and meta["splits"]["train"]["tokens"] > 50_000
    assert len(meta["splits"]["train"]["shards"]) == len(list(out.glob("train_*.bin"))) > 1
    assert not list(tmp_path.glob(".data.tmp-*"))  # the killed build's partial shards were reclaimed


# ----------------------------------------------------------------------------------------------- bad input
def bad_input_cases(data_dir: Path, model_dir: Path, tmp: Path) -> list[tuple[str, list[str], list[str]]]:
    """(name, argv, substrings the error line must contain): the bad inputs named by issues 1-7."""
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n', encoding="utf-8")
    (tmp / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                     '{"role": "assistant", "content": "hello"}]}\nnot json\n')
    (tmp / "table.csv").write_text("a,b\n")
    (tmp / "fake.gguf").write_bytes(b"this is not a GGUF file" * 10)
    (tmp / "not_a_model").mkdir()
    (tmp / "ds.json").write_text('{"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}')
    half = tmp / "half"  # an interrupted prepare_data: shards but no complete meta.json
    half.mkdir()
    (half / "train_000.bin").write_bytes(b"\0" * 64)
    (half / "meta.json").write_text(json.dumps({"complete": False}))
    tok = json.loads((data_dir / "meta.json").read_text())["tokenizer"]
    tt, prep = str(ROOT / "tools" / "train_tokenizer.py"), str(ROOT / "tools" / "prepare_data.py")
    pre, sft = str(ROOT / "llm" / "pretrain.py"), str(ROOT / "llm" / "sft.py")
    ev, qu, cv = (str(ROOT / "tools" / f) for f in ("eval.py", "quantize.py", "convert.py"))
    d = ["--config", DEBUG, "--data", str(data_dir), "--train.run_dir", str(tmp / "r")]
    m = str(model_dir)
    return [
        ("tokenizer: missing input", [tt, "--inputs", str(tmp / "nope.txt"), "--out", str(tmp / "t.model")],
         ["nope.txt", "no such file"]),
        ("prepare: malformed jsonl line", [prep, "--inputs", str(tmp / "bad.jsonl"), "--tokenizer", tok, "--out",
                                           str(tmp / "d1"), "--workers", "1"], ["bad.jsonl:2", "malformed JSON"]),
        ("prepare: unsupported file", [prep, "--inputs", str(tmp / "table.csv"), "--tokenizer", tok, "--out",
                                       str(tmp / "d3")], ["table.csv", "unsupported file type"]),
        ("pretrain: interrupted data", [pre, *d[:2], "--data", str(half)], ["half/meta.json", "complete"]),
        ("pretrain: unknown preset", [pre, *d, "--preset", "huge"], ["--preset huge", "unknown model preset"]),
        ("pretrain: empty global batch", [pre, *d, "--train.global_batch_size", "0"],
         ["global_batch_size=0", "must be >= 1"]),
        ("pretrain: \"auto\" in ds_config", [pre, *d, "--train.ds_config", str(tmp / "ds.json")],
         ["ds.json", "reduce_bucket_size"]),
        ("sft: missing config.json", [sft, "--model", str(tmp / "not_a_model"), "--data", "builtin:chatterbot"],
         ["not_a_model", "no config.json"]),
        ("sft: malformed chat jsonl", [sft, "--model", m, "--data", str(tmp / "chat.jsonl"), "--train.run_dir",
                                       str(tmp / "s")], ["chat.jsonl:2", "invalid JSON"]),
        ("eval: missing config.json", [ev, "ppl", "--model", str(tmp / "not_a_model"), "--source", "builtin:demo"],
         ["not_a_model", "no config.json"]),
        ("eval: classify with a language model", [ev, "classify", "--model", m], ["score.weight",
                                                                                  "not a classification model"]),
        ("quantize: group size not dividing", [qu, "--model", m, "--group_size", "48", "--out", str(tmp / "q")],
         ["config.json", "--group_size 48 does not divide"]),
        ("convert: non-GGUF file", [cv, "from_gguf", "--src", str(tmp / "fake.gguf"), "--dst", str(tmp / "c")],
         ["fake.gguf", "not a readable GGUF"]),
        ("convert: missing config.json", [cv, "to_gguf", "--src", str(tmp / "not_a_model"), "--dst",
                                          str(tmp / "x.gguf")], ["not_a_model", "no config.json"]),
    ]


def test_every_bad_input_gets_one_clear_line(data_dir, reference, tmp_path):
    cases = bad_input_cases(data_dir, reference / "final", tmp_path)

    def run(case):
        r = subprocess.run([PY, *case[1]], env=ENV, capture_output=True, text=True, timeout=180, cwd=tmp_path)
        return case, r

    with ThreadPoolExecutor(4) as pool:  # each case pays a Python + torch start-up; overlap them
        results = list(pool.map(run, cases))
    failures = []
    for (name, argv, want), r in results:
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        ok = (r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1
              and all(w in errors[0] for w in want))
        if not ok:
            failures.append(f"{name}: rc {r.returncode}, want {want}\n  {r.stderr.strip()[-1500:]}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "q").exists() and not (tmp_path / "c").exists() and not (tmp_path / "d1").exists()


# ----------------------------------------------------------------------------------------------- 2-rank kill -9
# The real launcher (`deepspeed --num_gpus 2`, 2 CPU ranks on gloo) SIGKILLed as a whole process group — the
# `deepspeed` runner, its launcher and both ranks — at a chosen point, then resumed with `--train.resume auto` to
# the end: final/model.safetensors must equal the uninterrupted run's bit for bit. The kill point is made exact by
# PAUSE_HOOK, a sitecustomize.py put on the killed launch's PYTHONPATH only: inside the ranks it stops a rank (and
# writes a marker file) at the chosen point, without changing any computation, and the test then kills the group.
PAUSE_HOOK = r'''
import os
_spec = os.environ.get("FAULTS_PAUSE")
if _spec and "LOCAL_RANK" in os.environ:  # the ranks only (not the runner or launcher)
    import pathlib, time
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    _what, _arg = _spec.split(":", 1)
    _marker = pathlib.Path(os.environ["FAULTS_MARKER"])

    def _pause(where):
        _marker.with_name(_marker.name + ".rank" + os.environ["RANK"]).write_text(where)
        if os.environ["RANK"] == "0":
            _marker.write_text(where)
        time.sleep(3600)

    if _what == "step":  # inside training step N, after its backward, before the optimizer changes a weight
        def _pre_hook(opt, args, kwargs):  # DeepSpeed may call step() once per parameter group: the first
            done = {int(s["step"]) for s in opt.state.values() if "step" in s} or {0}  # updates per group so far
            if done == {int(_arg) - 1}:
                _pause(f"the optimizer step of training step {_arg}")

        register_optimizer_step_pre_hook(_pre_hook)
    elif _what == "save":  # in the middle of writing checkpoint step_N: after this rank's first file of it
        _save, _tag = torch.save, f"step_{int(_arg):08d}"

        def _paused_save(obj, f, *a, **k):
            out = _save(obj, f, *a, **k)
            if isinstance(f, (str, os.PathLike)) and pathlib.Path(f).parent.name == _tag:
                _pause(f"saving {f}")
            return out

        torch.save = _paused_save
'''
DS_STEPS = 8  # checkpoints every 2 steps


def ds_launch(script, args, cwd: Path, log: Path, pause: str = "", port: int = 0) -> subprocess.Popen:
    """`deepspeed --num_gpus 2 --master_port PORT script args` in its own process group; with `pause`
    ("step:N" / "save:N") the ranks load PAUSE_HOOK."""
    import socket

    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    env = dict(ENV)
    if pause:
        (cwd / "hook").mkdir(parents=True, exist_ok=True)
        (cwd / "hook" / "sitecustomize.py").write_text(PAUSE_HOOK)
        env |= {"FAULTS_PAUSE": pause, "FAULTS_MARKER": str(cwd / "paused"),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(cwd / "hook"), env.get("PYTHONPATH")]))}
    cmd = [str(Path(PY).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port), str(script),
           *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def ds_run(script, args, cwd: Path, log: Path, timeout=240) -> str:
    p = ds_launch(script, args, cwd, log)
    try:
        rc = p.wait(timeout=timeout)
    finally:
        kill_group(p)
    out = log.read_text()
    assert rc == 0, out[-4000:]
    return out


def kill_group(p: subprocess.Popen, timeout=30):
    """SIGKILL every process of the launch's group (runner, launcher, ranks) and wait until none is left."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=timeout)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"processes of group {p.pid} survived SIGKILL")


def kill_at(script, args, cwd: Path, log: Path, pause: str, timeout=180) -> str:
    """Launch with the pause hook, SIGKILL the whole group once rank 0 has paused there; return what it paused in."""
    p = ds_launch(script, args, cwd, log, pause=pause)
    marker = cwd / "paused"
    deadline = time.time() + timeout
    try:
        while not marker.is_file():
            if p.poll() is not None or time.time() > deadline:
                pytest.fail(f"never reached {pause} (rc {p.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.02)
        time.sleep(0.2)  # let the other rank reach its own pause point (or block on rank 0) too
    finally:
        kill_group(p)
    assert p.returncode == -signal.SIGKILL
    where = marker.read_text()
    for m in cwd.glob("paused*"):
        m.unlink()
    return where


def same_losses(run: Path, ref: Path):
    """metrics.csv: every logged step's training loss (as written, repr) equal to the reference run's, the rows a
    killed launch wrote after its last checkpoint replaced; a failure names the first step that differs."""
    import csv

    def rows(r):
        with open(r / "metrics.csv") as f:
            return [(int(x["step"]), x["loss"]) for x in csv.DictReader(f) if x["loss"]]

    got, want = rows(run), rows(ref)
    assert [s for s, _ in got] == [s for s, _ in want], (got, want)
    diff = [(s, a, b) for (s, a), (_, b) in zip(got, want) if a != b]
    assert not diff, f"first differing step {diff[0][0]}: loss {diff[0][1]} resumed vs {diff[0][2]} uninterrupted"


def ds_pretrain_args(data: Path, run: Path, stage: int, *extra) -> list[str]:
    return ["--config", DEBUG, "--data", data, "--train.run_dir", run, "--train.ds_config", f"zero{stage}",
            "--train.max_steps", DS_STEPS, "--train.save_every", 2, "--train.keep_checkpoints", 2,
            "--train.eval_every", 1000, "--train.sample_prompts", "[]", *extra]


@pytest.fixture(scope="module")
def ds_reference(data_dir, tmp_path_factory):
    """The uninterrupted 2-rank run at each ZeRO stage, made on first use."""
    runs = {}

    def get(stage: int) -> Path:
        if stage not in runs:
            base = tmp_path_factory.mktemp(f"faults-ds-ref{stage}")
            ds_run(ROOT / "llm" / "pretrain.py", ds_pretrain_args(data_dir, base / "run", stage), base,
                   base / "log.txt")
            runs[stage] = base / "run"
        return runs[stage]

    return get


@pytest.mark.parametrize("stage,fault", [(2, "step"), (2, "save"), (3, "step"), (3, "save")])
def test_two_rank_sigkill_then_resume_gives_the_same_weights(data_dir, ds_reference, tmp_path, stage, fault):
    """ZeRO-2 / ZeRO-3 on 2 ranks, killed -9 mid-step 5 (inside the optimizer step: step 5 is lost, the step-4
    checkpoint is complete) or in the middle of writing the step-6 checkpoint (one file of it on disk, no
    trainer_state.json); `--train.resume auto` then ends bit-identical to the uninterrupted run."""
    run = tmp_path / "run"
    script = ROOT / "llm" / "pretrain.py"
    pause = {"step": "step:5", "save": "save:6"}[fault]
    where = kill_at(script, ds_pretrain_args(data_dir, run, stage), tmp_path, tmp_path / "log1.txt", pause)
    print(f"killed -9 while paused in {where}")
    assert not (run / "final").exists()
    ck = run / "checkpoints"
    if fault == "save":
        assert "step_00000006" in where and (ck / "step_00000006").is_dir()
        assert not (ck / "step_00000006" / "trainer_state.json").exists()  # an interrupted save
    assert complete_steps(run)[-1] == 4
    out = ds_run(script, ds_pretrain_args(data_dir, run, stage, "--train.resume", "auto"), tmp_path,
                 tmp_path / "log2.txt")
    if fault == "save":
        assert f"skipping checkpoint {ck / 'step_00000006'}" in out, out[-4000:]
    assert f"resumed from {ck / 'step_00000004'} (step 4" in out, out[-4000:]
    assert "Traceback" not in out
    same_losses(run, ds_reference(stage))
    same_weights(run, ds_reference(stage))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == DS_STEPS and summary["skipped_steps"] == 0


@pytest.fixture(scope="module")
def lora_base(chat_tokenizer, tmp_path_factory):
    """The tiny `debug` model with the ChatML tokenizer, saved as a Hugging Face directory (the SFT base)."""
    from conftest import tiny_model

    from llm.hf_format import save_model

    return save_model(tiny_model(chat_tokenizer), tmp_path_factory.mktemp("faults-lora") / "base",
                      tokenizer=chat_tokenizer)


def lora_args(base: Path, run: Path, *extra) -> list:
    """LoRA SFT (with dropout: the resumed RNG state matters) under ZeRO-1 on 2 ranks, a checkpoint every 2 steps."""
    return ["--model", base, "--data", "builtin:chatterbot", "--mode", "lora", "--pack", "false", "--max_examples",
            32, "--seq_len", 96, "--lora.r", 4, "--lora.dropout", 0.1, "--train.run_dir", run, "--train.ds_config",
            "zero1", "--train.max_steps", DS_STEPS, "--train.save_every", 2, "--train.keep_checkpoints", 2,
            "--train.micro_batch_size", 2, "--train.lr", 2e-2, "--train.warmup_steps", 1, "--train.log_every", 1,
            "--train.eval_every", 1000, "--train.eval_batches", 1, "--train.sample_prompts", "[]", *extra]


def test_lora_sft_sigkill_then_resume_gives_the_same_weights(lora_base, tmp_path):
    """LoRA SFT on 2 ranks killed -9 in the optimizer step of step 5, resumed with `--train.resume auto`: the
    merged final/ and the adapter equal an uninterrupted run's bit for bit."""
    script = ROOT / "llm" / "sft.py"
    ref, run = tmp_path / "ref" / "run", tmp_path / "run"
    (tmp_path / "ref").mkdir()
    ds_run(script, lora_args(lora_base, ref), tmp_path / "ref", tmp_path / "ref.txt")
    where = kill_at(script, lora_args(lora_base, run), tmp_path, tmp_path / "log1.txt", "step:5")
    print(f"killed -9 while paused in {where}")
    assert complete_steps(run)[-1] == 4 and not (run / "final").exists()
    out = ds_run(script, lora_args(lora_base, run, "--train.resume", "auto"), tmp_path, tmp_path / "log2.txt")
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'} (step 4" in out, out[-4000:]
    same_losses(run, ref)
    same_weights(run, ref)
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (run, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- the headline
def test_no_argument_command_trains_on_4_ranks(data_dir, tmp_path):
    """`deepspeed --num_gpus 4 llm/pretrain.py`, no arguments, on 4 CPU ranks, in a directory laid out as run.sh
    leaves it (data/tokenizer/tokenizer.model, data/pretrain; tiny versions): it starts training the default config at
    world size 4 with the default global batch of 16 (micro batch 8 -> 4, no accumulation): the batch line and the
    start line once each, no error. The 300-step run is SIGKILLed (the whole group) once its first step is done."""
    import shutil

    from llm.prepare import prepare

    shutil.copytree(data_dir.parent / "tok", tmp_path / "data" / "tokenizer")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative paths, as run.sh writes them
    try:
        prepare([str(data_dir.parent / "text.txt")], out="data/pretrain", tokenizer="data/tokenizer/tokenizer.model",
                val_fraction=0.05, workers=1)
    finally:
        os.chdir(cwd)
    log = tmp_path / "train.txt"
    p = ds_launch_4(ROOT / "llm" / "pretrain.py", tmp_path, log)
    deadline = time.time() + 480
    try:
        while "1/300" not in log.read_text(errors="replace"):  # rank 0's progress bar: the first step is done
            if p.poll() is not None or time.time() > deadline:
                pytest.fail(f"no training step (rc {p.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
    finally:
        kill_group(p)
    out = log.read_text(errors="replace")
    lines = out.splitlines()
    assert "Traceback" not in out and not [x for x in lines if x.startswith("error")], out[-4000:]
    batch = ("train.global_batch_size=16 on 4 rank(s): micro batch 8 -> 4 (the largest that divides it), grad_accum 1 "
             "(4 x 1 x 4 = 16)")
    assert out.count(batch) == 1, out[-4000:]
    start = [x for x in lines if x.startswith("training ")]
    assert len(start) == 1, out[-4000:]
    assert (" on 4 rank(s) (cpu), ZeRO-1 (zero1.json), fp32, attention sdpa, micro batch 4 x accum 1 x 4 ranks = 16 "
            "sequences/step, 4,096 tokens/step") in start[0], start[0]
    warnings = [x for x in lines if x.startswith("warning")]
    assert len(warnings) == len(set(warnings)), warnings  # each said once, not once per rank


def test_no_argument_command_without_data_prints_one_error_on_4_ranks(tmp_path):
    """The same command before run.sh has laid out data/: exit 2 and one error line (rank 0's), not one per rank."""
    log = tmp_path / "log.txt"
    rc, out, errors = failed_launch(ds_launch_4(ROOT / "llm" / "pretrain.py", tmp_path, log), log, 240)
    assert rc == 2 and "Traceback" not in out, out[-4000:]
    assert len(errors) == 1 and "data/pretrain/meta.json: not found" in errors[0], "\n".join(errors)


def failed_launch(p: subprocess.Popen, log: Path, timeout: int) -> tuple[int, str, list[str]]:
    """(exit code, output, its error lines) of a launch expected to stop with an error."""
    try:
        rc = p.wait(timeout=timeout)
    finally:
        kill_group(p)
    out = log.read_text(errors="replace")
    return rc, out, [x for x in out.splitlines() if x.startswith("error")]


def ds_launch_4(script, cwd: Path, log: Path) -> subprocess.Popen:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(PY).with_name("deepspeed")), "--num_gpus", "4", "--master_port", str(port), str(script)]
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_bad_resume_path_stops_every_rank(data_dir, tmp_path):
    """--train.resume naming no checkpoint, on 2 ranks: rank 0's one error line and exit 2, quickly — rank 1 is
    not left waiting for a broadcast rank 0 never reaches."""
    log = tmp_path / "log.txt"
    p = ds_launch(ROOT / "llm" / "pretrain.py", ds_pretrain_args(data_dir, tmp_path / "run", 2, "--train.resume",
                                                               tmp_path / "nowhere"), tmp_path, log)
    rc, out, errors = failed_launch(p, log, 120)
    assert rc != 0 and "Traceback" not in out, out[-4000:]
    assert len(errors) == 1 and "no such checkpoint" in errors[0], "\n".join(errors)

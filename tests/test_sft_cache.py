"""The token cache of fine-tuning data (llm/sft_cache.py): cached datasets equal the plain per-chat tokenization
item by item (packed, unpacked, truncated, split, subset; classification), a second load tokenizes nothing, the
key follows the data file and the tokenizer, an interrupted build is never taken as complete, and two processes
building at once get the same data from one build."""
import json
import multiprocessing
import random

import numpy as np
import pytest

import llm.sft_cache as sft_cache
from llm.chat import IGNORE_INDEX, tokenize_chat
from llm.errors import UserError
from llm.sft_cache import tokenized_chats, tokenized_labelled
from llm.sft_data import ClassifyDataset, SFTDataset
from llm.sft_sources import load_chats, load_labelled


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_CACHE", str(tmp_path / "llm-cache"))


@pytest.fixture
def chats_file(tmp_path):
    """300 chats: single and multi-turn, some longer than 64 tokens, in both record formats."""
    chats = [c for _, c in load_chats("builtin:chatterbot", None)[:150]]
    chats += [c for _, c in load_chats("builtin:idioms", None)[:120]]
    chats += [[{"role": "user", "content": f"{i} 说说"}, {"role": "assistant", "content": "长回答。" * 7 * i}]
              for i in range(30)]
    f = tmp_path / "chats.jsonl"
    with open(f, "w", encoding="utf-8") as out:
        for i, c in enumerate(chats):
            rec = {"instruction": c[0]["content"], "output": c[1]["content"]} if i % 7 == 3 else {"messages": c}
            out.write(json.dumps(rec, ensure_ascii=False) + ("\n\n" if i % 50 == 0 else "\n"))
    return f


def reference_items(tok, chats, seq_len, pack, truncate):
    """The plain algorithm: tokenize_chat per chat, shift, truncate or skip, greedy packing in order."""
    examples, skipped, truncated = [], 0, 0
    for _, chat in chats:
        ids, labels = tokenize_chat(tok, chat)
        x, y = ids[:-1], labels[1:]
        if len(x) > seq_len:
            if not truncate:
                skipped += 1
                continue
            x, y, truncated = x[:seq_len], y[:seq_len], truncated + 1
        if all(t == IGNORE_INDEX for t in y):
            skipped += 1
            continue
        examples.append((x, y))
    if not pack:
        return [[e] for e in examples], skipped, truncated
    bins, cur, used = [], [], 0
    for e in examples:
        if cur and used + len(e[0]) > seq_len:
            bins.append(cur)
            cur, used = [], 0
        cur.append(e)
        used += len(e[0])
    return bins + [cur], skipped, truncated


@pytest.mark.parametrize("pack,truncate", [(True, False), (False, False), (True, True), (False, True)])
def test_cached_chats_equal_plain_tokenization(chat_tokenizer, chats_file, pack, truncate):
    tok = chat_tokenizer
    src = tokenized_chats(tok, str(chats_file))
    assert len(src) == 300
    for split in (None, "train", "val"):
        chats = load_chats(str(chats_file), split, 0.2)
        ds = SFTDataset.from_tokenized(src, src.select(split, 0.2), 64, pack, truncate)
        items, skipped, truncated = reference_items(tok, chats, 64, pack, truncate)
        assert list(ds) == items
        assert (ds.n_examples, ds.skipped, ds.truncated) == (sum(map(len, items)), skipped, truncated)
        assert skipped + truncated > 0
        if not pack:
            assert list(ds.lengths) == [len(x) for (x, _), in items]
        assert ds.byte_fragments(tok) == tok.count_byte_fragments(x for item in items for x, _ in item)
    # the in-memory dataset is the same thing
    assert list(SFTDataset(tok, load_chats(str(chats_file), None), 64, pack, truncate)) == \
        reference_items(tok, load_chats(str(chats_file), None), 64, pack, truncate)[0]


def test_chat_splits_subset_and_prompts_as_before(chat_tokenizer, chats_file):
    """max_examples draws the same chats as random.sample over the chat list; prompts are the first held-out ones."""
    from llm.chat import render
    from llm.tasks.lm import chat_splits

    train, val, _, prompts = chat_splits(str(chats_file), None, chat_tokenizer, 64, True, True, 0.2, 40, 3)
    train_ds, val_ds = train.dataset, val.dataset
    chats = random.Random(3).sample(load_chats(str(chats_file), "train", 0.2), 40)
    assert list(train_ds) == reference_items(chat_tokenizer, chats, 64, True, True)[0]
    val = load_chats(str(chats_file), "val", 0.2)
    assert val_ds.n_examples == len(val)
    assert prompts == [render(c[:1], add_generation_prompt=True) for _, c in val[:2]]


def test_cached_labelled_equal_plain_tokenization(chat_tokenizer, tmp_path):
    tok = chat_tokenizer
    f = tmp_path / "texts.jsonl"
    texts = [m["content"] for _, c in load_chats("builtin:chatterbot", None)[:200] for m in c[:1]] + ["", "好"]
    f.write_text("".join(json.dumps({"text": t, "label": i % 3}, ensure_ascii=False) + "\n"
                         for i, t in enumerate(texts)), encoding="utf-8")
    src = tokenized_labelled(tok, str(f))
    for split in ("train", "val"):
        examples = load_labelled(str(f), split, 0.3)
        ds = ClassifyDataset.from_tokenized(src, src.select(split, 0.3), 8, tok.eos_id)
        ref = [(tok.encode(t)[:8] or [tok.eos_id], y) for t, y in examples]
        assert list(ds) == ref
        assert list(ds.lengths) == [len(x) for x, _ in ref]
        assert ds.byte_fragments(tok) == tok.count_byte_fragments(x for x, _ in ref)
        assert list(ClassifyDataset(tok, examples, 8)) == ref
    with pytest.raises(UserError, match=r"texts.jsonl:3: label 2 is out of range"):
        tokenized_labelled(tok, str(f), num_labels=2)  # checked against the cached labels, named by line


def test_second_load_reads_the_cache(chat_tokenizer, chats_file, monkeypatch):
    first = tokenized_chats(chat_tokenizer, str(chats_file))
    stamp = (first.directory / "meta.json").stat().st_mtime_ns

    def no_build(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(sft_cache, "write_chats", no_build)
    again = tokenized_chats(chat_tokenizer, str(chats_file))
    assert again.directory == first.directory and (again.directory / "meta.json").stat().st_mtime_ns == stamp
    assert isinstance(again.tokens, np.memmap)
    assert again.directory.parent == chats_file.parent / "chats.jsonl.cache"  # next to the data


def test_key_follows_data_and_tokenizer(chat_tokenizer, chats_file, tmp_path):
    import sentencepiece as spm

    from llm.tokenizer import Tokenizer

    first = tokenized_chats(chat_tokenizer, str(chats_file)).directory
    with open(chats_file, "a", encoding="utf-8") as f:
        f.write(json.dumps({"instruction": "新的问题", "output": "新的回答"}, ensure_ascii=False) + "\n")
    changed = tokenized_chats(chat_tokenizer, str(chats_file))
    assert changed.directory != first and len(changed) == 301
    texts = [m["content"] for _, c in load_chats("builtin:chatterbot") for m in c if m["content"].isascii()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(tmp_path / "other"), vocab_size=600, model_type="bpe",
        byte_fallback=True, user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    other = Tokenizer.from_file(tmp_path / "other.model")
    assert tokenized_chats(other, str(chats_file)).directory not in (first, changed.directory)


def test_interrupted_build_is_not_taken_as_complete(chat_tokenizer, chats_file):
    src = tokenized_chats(chat_tokenizer, str(chats_file))
    good = {k: np.array(v) for k, v in src.arrays.items()}
    cache = src.directory
    # a build killed after writing meta.json into its temporary directory, and a damaged final one
    tmp = cache.with_name(cache.name + ".tmpdead")
    tmp.mkdir()
    (tmp / "meta.json").write_text((cache / "meta.json").read_text())
    tokens = (cache / "tokens.bin").read_bytes()
    (cache / "tokens.bin").write_bytes(tokens[: len(tokens) // 2])
    again = tokenized_chats(chat_tokenizer, str(chats_file))
    assert all(np.array_equal(again.arrays[k], v) for k, v in good.items())
    assert not tmp.exists()


def _build_in_child(tok_path, data, queue):
    from llm.tokenizer import Tokenizer

    built = []
    write = sft_cache.write_chats

    def counting(*a, **k):
        built.append(1)
        return write(*a, **k)

    sft_cache.write_chats = counting
    src = tokenized_chats(Tokenizer.from_file(tok_path), data)
    queue.put((len(built), {k: np.array(v).tobytes() for k, v in src.arrays.items()}))


def test_two_processes_build_once_and_agree(chat_tokenizer, chats_file):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(chat_tokenizer.path, str(chats_file), queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(n for n, _ in results) == [0, 1]  # one built, the other waited and loaded
    assert results[0][1] == results[1][1]
    ref = tokenized_chats(chat_tokenizer, str(chats_file))
    assert results[0][1] == {k: np.array(v).tobytes() for k, v in ref.arrays.items()}


def test_config_errors_come_before_any_data_work(tmp_path, monkeypatch):
    """preflight runs first: a bad schedule is reported without loading a model or reading (tokenizing) data."""
    from llm import classify, sft
    from llm.train import TrainConfig

    def no_data(*a, **k):
        raise AssertionError("data read before the config was checked")

    monkeypatch.setattr(sft_cache, "_cache_dir", no_data)
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), max_steps=5, warmup_steps=10)
    with pytest.raises(UserError, match="warmup_steps=10"):
        sft.main(str(tmp_path / "no-model"), str(tmp_path / "chats.jsonl"), cfg)
    with pytest.raises(UserError, match="warmup_steps=10"):
        classify.main(str(tmp_path / "no-model"), str(tmp_path / "texts.jsonl"), cfg)


def test_bad_data_leaves_no_cache_behind(chat_tokenizer, chats_file, tmp_path):
    """A build that fails on bad data removes what it made (the cache folder, its lock) and nothing else: a cache
    folder that was there stays with what it held, and a cache built before is still used."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "yo"}]}\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match="bad.jsonl:2"):
        tokenized_chats(chat_tokenizer, str(bad))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="no records"):
        tokenized_labelled(chat_tokenizer, str(tmp_path / "empty.jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before + ["empty.jsonl"]
    good = tokenized_chats(chat_tokenizer, str(chats_file)).directory
    mine = good.parent / "notes.txt"
    mine.write_text("mine")
    chats_file.write_text(chats_file.read_text() + "{not json\n")  # a new key: a new build in the same folder
    with pytest.raises(UserError, match="invalid JSON"):
        tokenized_chats(chat_tokenizer, str(chats_file))
    assert sorted(p.name for p in good.parent.iterdir()) == sorted([good.name, f"{good.name}.lock", "notes.txt"])
    assert mine.read_text() == "mine" and sft_cache._complete(good)

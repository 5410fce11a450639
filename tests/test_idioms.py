"""The idiom data end to end (issue 19): builtin:idioms-text (the dictionary as prose for pretraining) never holds
an idiom builtin:idioms' SFT val split holds; a tokenizer trained as run.sh trains it covers the SFT chats (< 5%
byte fragments); the held-out idiom multiple-choice task asks only about held-out idioms, as the SFT chats ask."""
import collections
import re

import pytest

from conftest import tiny_model
from llm.chat import render
from llm.corpora import iter_documents
from llm.data_rules import is_held_out
from llm.evaluate import load_task, multiple_choice
from llm.sft_sources import IDIOMS_VAL_FRACTION, iter_chats, load_chats

SFT_VAL_FRACTION = 0.05  # llm/sft.py's default val_fraction (configs/sft/lora-demo.yaml keeps it)


def _idiom(doc: str) -> str:
    return re.match(r"「(.+?)」（", doc).group(1)


@pytest.fixture(scope="module")
def sft_keys() -> dict[str, set[str]]:
    """The idioms of builtin:idioms' SFT train and val splits, split as llm/sft.py splits them."""
    out = {"train": set(), "val": set()}
    for _, key, _, _, _ in iter_chats("builtin:idioms"):
        out["val" if is_held_out(key, SFT_VAL_FRACTION) else "train"].add(key)
    return out


@pytest.fixture(scope="module")
def text_splits() -> dict[str, list[str]]:
    return {s: list(iter_documents("builtin:idioms-text", s)) for s in ("train", "val")}


def test_idioms_text_holds_out_the_sft_val_idioms(sft_keys, text_splits):
    assert IDIOMS_VAL_FRACTION == SFT_VAL_FRACTION
    train = [_idiom(d) for d in text_splits["train"]]
    val = [_idiom(d) for d in text_splits["val"]]
    assert len(train) > 1000 and len(val) > 100
    assert set(train) <= sft_keys["train"] and set(val) <= sft_keys["val"]
    assert not set(train) & set(val)
    # no held-out idiom is even mentioned in the training prose
    train_text = "".join(text_splits["train"])
    assert not [w for w in val if f"「{w}」" in train_text]
    size = sum(len(d.encode()) for d in text_splits["train"])
    assert 400_000 < size < 520_000, size  # capped: pretraining on demo + idioms-text stays short
    assert text_splits["train"][:50] == list(iter_documents("builtin:idioms-text", "train"))[:50]  # deterministic
    doc = text_splits["train"][0]
    assert "是一个成语，意思是：" in doc and doc.endswith("\n")


def test_idioms_mc_asks_only_held_out_idioms(sft_keys, text_splits):
    ex = load_task("idioms")
    assert len(ex) == 200 and load_task("builtin:idioms-mc", limit=10) == ex[:10]
    assert ex == load_task("idioms")  # deterministic
    assert collections.Counter(e.label for e in ex) == {0: 50, 1: 50, 2: 50, 3: 50}
    text_train = {_idiom(d) for d in text_splits["train"]}
    answers = {}  # idiom -> its meaning answer in the SFT chats
    for _, key, chat, _, _ in iter_chats("builtin:idioms"):
        if chat[0]["content"].endswith("是什么意思？"):
            answers[key] = render(chat)
    for e in ex:
        assert len(e.endings) == 4 and len(set(e.endings)) == 4 and len(set(e.contexts)) == 1
        word = re.search(r"成语「(.+?)」是什么意思", e.contexts[0]).group(1)
        assert word in sft_keys["val"] and word not in sft_keys["train"] and word not in text_train
        # the SFT model is asked exactly as it was trained: the context and the true ending spell its chat
        assert answers[word].startswith(e.contexts[0] + e.endings[e.label] + "<|im_end|>")
    meaning_of = {}
    for _, key, chat, _, _ in iter_chats("builtin:idioms"):
        if chat[0]["content"].endswith("是什么意思？"):
            meaning_of.setdefault(chat[1]["content"].split("）：", 1)[1], set()).add(key)
    for e in ex:  # distractors are meanings of held-out idioms too
        for m in e.endings:
            assert meaning_of[m] & sft_keys["val"]


def test_idioms_mc_scores_a_model(chat_tokenizer):
    """All 200 questions by likelihood (seconds for the debug model on 2 idle cores); on the first 20, the packed
    log-likelihoods are those of each ChatML context + meaning scored alone in one plain forward pass."""
    import torch

    from llm.evaluate import choice_logliks

    model, examples = tiny_model(chat_tokenizer).eval(), load_task("idioms")
    r = multiple_choice(model, chat_tokenizer, examples)
    assert r["n"] == 200 and 0 <= r["acc"] <= 1
    packed = choice_logliks(model, chat_tokenizer, examples[:20])
    with torch.no_grad():
        for ex, got in zip(examples[:20], packed):
            n_ctx = len(chat_tokenizer.encode(ex.contexts[0]))
            for ending, value in zip(ex.endings, got):
                ids = torch.tensor([chat_tokenizer.encode(ex.contexts[0] + ending)])
                logp = torch.log_softmax(model(ids)[0].float(), -1)
                alone = sum(logp[i - 1, ids[0, i]].item() for i in range(n_ctx, ids.shape[1]))
                assert abs(value - alone) < 1e-3 * max(1.0, abs(alone)), (ending, value, alone)


def test_tokenizer_trained_as_run_sh_covers_the_sft_chats(tmp_path):
    """run.sh's tokenizer stage (demo text + the SFT chats' text, 4,096 tokens, characters up to 85% of the
    vocabulary), on a smaller sample: under 5% of builtin:idioms' tokens are byte fragments (37% with builtin:demo
    alone), and the held-out English and Chinese still compress."""
    from llm.tokenizer import BYTE_FRAGMENT_WARN, Tokenizer
    from llm.tokenizer_train import train_tokenizer

    out = tmp_path / "tokenizer.model"
    rep = train_tokenizer(inputs=["builtin:demo", "builtin:idioms"], out=str(out), vocab_size=4096,
                          char_share=0.85, max_sentences=60_000, preset="debug")
    tok = Tokenizer(out)
    texts = [render(c) for _, c in load_chats("builtin:idioms", "train")[::10]]
    fragments, tokens = tok.count_byte_fragments(tok.encode_batch(texts))
    assert fragments / tokens < BYTE_FRAGMENT_WARN
    assert tok.coverage_warning(fragments, tokens, "builtin:idioms") is None
    assert rep["builtin:idioms"]["byte_fragment_share"] < BYTE_FRAGMENT_WARN  # its report: the held-out chats
    assert rep["en"]["bytes_per_token"] > 1.9 and rep["zh"]["bytes_per_token"] > 2.9


def test_chat_builtins_are_tokenizer_inputs_not_corpora():
    from llm.errors import UserError
    from llm.tokenizer_train import expand_text_inputs, input_documents

    assert expand_text_inputs(["builtin:demo", "builtin:idioms"]) == ["builtin:demo", "builtin:idioms"]
    first = next(iter(input_documents("builtin:idioms", "text", "blank_line")))
    assert first.startswith("成语「") and "\n「" in first  # the question, then the answer, one message a line
    with pytest.raises(UserError, match="its text as prose is builtin:idioms-text"):
        list(iter_documents("builtin:idioms"))

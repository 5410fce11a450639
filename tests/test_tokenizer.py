"""Tokenizer: a sentencepiece BPE trained on the built-in bilingual corpus gives exactly the same ids through our
`Tokenizer`, through the tokenizer.json it saves (the `tokenizers` library) and through transformers'
`AutoTokenizer` on the saved directory; decode(encode(text)) is byte-exact; SmolLM2's tokenizer.json too."""
from pathlib import Path

import pytest

from llm import tokenizer_train
from llm.cli import run_cli
from llm.errors import UserError
from llm.corpora import iter_documents
from llm.tokenizer import Tokenizer

TRAIN = vars(tokenizer_train)

# whitespace runs, tabs, digits, full-width digits, rare CJK and emoji (byte fallback), accents, the chat tokens
# glued to text, sentencepiece's own control pieces typed as text, and the empty string
EDGE_CASES = [
    "", " ", "\n", "  two  spaces\tand\ttabs\n\n\nnew lines \n", "Hello, world! 12345 + 3.14159 = 2024",
    "１９９８年，中国人民将满怀信心地开创新的业绩。", "数字123和中文混排mixed中英文text", "emoji 😀🚀, rare 龘齉 chars, ÆØÅ ñ café",
    "<|im_start|>user\n你好，今天天气怎么样？<|im_end|>\n<|im_start|>assistant\n", "a<|im_end|>b<|im_start|>",
    "<s> literal </s> <pad> <unk> are text", "x" * 300, "\u3000全角空格\u3000", "trailing space ",
]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    """A 2,000-token sentencepiece BPE trained on builtin:demo (a sample of lines, a few seconds)."""
    d = tmp_path_factory.mktemp("tok")
    TRAIN["train_tokenizer"](inputs=["builtin:demo"], out=str(d / "tokenizer.model"), vocab_size=2000,
                             max_sentences=20_000, char_share=0.5, preset="debug")
    return d


@pytest.fixture(scope="session")
def texts() -> list[str]:
    held_out = list(iter_documents("builtin:shakespeare", "val", max_bytes=60_000))
    held_out += list(iter_documents("builtin:renmin", "val", max_bytes=60_000))
    held_out += list(iter_documents("builtin:poems", "val"))
    return EDGE_CASES + held_out


def test_special_ids(tok_dir):
    tok = Tokenizer.from_file(tok_dir / "tokenizer.model")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)  # ModelArgs' defaults
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert (im_start, im_end) == (4, 5)
    assert tok.stop_ids == [2, 5]
    assert tok.encode("<|im_start|>user", bos=True, eos=True)[:2] == [1, 4]
    assert tok.encode("x", eos=True)[-1] == 2
    assert tok.token_to_id("no such piece") is None
    assert tok.id_to_piece(tok.encode("1")[0]) == "1"
    assert len(tok.encode("2024")) == 4  # digits split one per token
    assert tok.vocab_size == 2000 and len(tok.sha256) == 64


def test_round_trip_byte_exact(tok_dir, texts):
    tok = Tokenizer.from_file(tok_dir / "tokenizer.model")
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(texts[:20]) == [tok.encode(t) for t in texts[:20]]


def test_transformers_autotokenizer_same_ids(tok_dir, texts, tmp_path):
    """Both ways: our ids == AutoTokenizer on our saved files, and our Tokenizer on what transformers re-saves."""
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(tok_dir / "tokenizer.model")
    saved = tmp_path / "saved"
    ours.save_pretrained(saved)
    assert {p.name for p in saved.iterdir()} == {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                                 "special_tokens_map.json"}
    hf = AutoTokenizer.from_pretrained(saved)
    from_json = Tokenizer.from_file(saved / "tokenizer.json")
    for text in texts:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text[:80]
        assert hf(text)["input_ids"] == ids  # no bos added behind our back
        assert from_json.encode(text) == ids
        if ids and max(ids) > ours.eos_id:  # sentencepiece renders control tokens as "", transformers as "<s>"
            assert hf.decode(ids) == ours.decode(ids) == from_json.decode(ids)
    assert [hf.convert_ids_to_tokens(i) for i in range(ours.vocab_size)] == \
        [ours.id_to_piece(i) for i in range(ours.vocab_size)]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 0, 3)
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi!"}]
    rendered = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n<|im_start|>assistant\n"

    resaved = tmp_path / "resaved"  # the other way: transformers writes, we read
    hf.save_pretrained(resaved)
    back = Tokenizer.from_dir(resaved)
    assert (back.bos_id, back.eos_id, back.pad_id) == (1, 2, 0)
    for text in texts:
        assert back.encode(text) == ours.encode(text)


def test_smollm2_tokenizer_json(smollm2_dir, tmp_path):
    """A byte-level BPE tokenizer.json (SmolLM2, converted from its GGUF by conftest's fixture) through our Tokenizer."""
    from transformers import AutoTokenizer

    model_dir = smollm2_dir
    tok = Tokenizer.from_dir(model_dir)
    hf = AutoTokenizer.from_pretrained(model_dir)
    assert tok.vocab_size == 49152 and tok.path.endswith("tokenizer.json")
    assert len(tok.encode("<|im_start|>")) == 1 and tok.token_to_id("<|im_end|>") in tok.stop_ids
    tok.save_pretrained(tmp_path)
    hf2 = AutoTokenizer.from_pretrained(tmp_path)
    for text in EDGE_CASES + ["The capital of France is"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False) == hf2.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text == hf.decode(ids)


def test_report_numbers(tok_dir, capsys):
    """Compression on held-out text and the embedding share, computed independently of the tool."""
    from llm.config import ModelArgs

    tok = Tokenizer.from_file(tok_dir / "tokenizer.model")
    rep = TRAIN["report"](tok, "cpu-demo")
    zh = "".join(iter_documents("builtin:renmin", "val", max_bytes=300_000))
    assert rep["zh"]["chars_per_token"] == pytest.approx(len(zh) / len(tok.encode(zh)))
    assert rep["zh"]["bytes_per_token"] == pytest.approx(len(zh.encode()) / len(tok.encode(zh)))
    assert 2.0 < rep["en"]["chars_per_token"] < 5 and rep["zh"]["chars_per_token"] > 0.8
    args = ModelArgs.from_preset("cpu-demo", vocab_size=2000)
    assert rep["embedding_share"] == pytest.approx(2000 * args.dim / args.n_params)
    assert "chars/token" in capsys.readouterr().out


def test_coverage_leaves_room_for_merges():
    lines = list(iter_documents("builtin:renmin", "train", max_bytes=200_000))
    assert TRAIN["pick_coverage"](lines, 64_000) == 0.9999
    assert TRAIN["pick_coverage"](lines, 2000) < 0.9995


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(UserError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        Tokenizer.from_file(tmp_path / "junk.model")
    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit) as e:  # the command line, in this process
        run_cli(TRAIN["train_tokenizer"], args=["--inputs", f"[{empty}]", "--out", str(tmp_path / "t" / "x.model")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == f"error: {empty}: no text to train on — the input is empty"
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


def test_failed_training_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    """sentencepiece's own error (source file, failed check) becomes one sentence with the fix; the folders the
    failed training created are gone."""
    out = tmp_path / "new" / "tok" / "tokenizer.model"
    with pytest.raises(SystemExit) as e:
        run_cli(TRAIN["train_tokenizer"], args=["--inputs", "builtin:poems", "--vocab_size", "200000",
                                                "--max_sentences", "2000", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "Vocabulary size too high" in err and "--vocab_size" in err and ".cc(" not in err, err
    assert not (tmp_path / "new").exists()

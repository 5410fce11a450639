"""Incremental detokenization: text streamed token by token never shows part of a character. With sentencepiece
byte fallback a character the vocabulary lacks is 2-4 byte pieces (<0xE5><0x82><0xBC> = 傼), and decoding a prefix
that stops inside it gives U+FFFD; `StreamDecoder` holds such bytes back and `decode_complete` drops them at the
end. Checked on a real sentencepiece BPE (tools/train_tokenizer.py), the tokenizer.json it saves (the `tokenizers`
ByteFallback decoder) and SmolLM2's byte-level BPE; plus `TextStream` (stop strings) and the generate CLI end to
end on a random model, whose output is cut inside a character."""
import json
import runpy
from pathlib import Path

import pytest
import torch

from llm.cli import run_cli
from llm.tokenizer import StreamDecoder, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
FFFD = "\ufffd"
# rare CJK (the sample), emoji and a 4-byte CJK extension B character: byte pieces in a 2,000-token vocab
TEXTS = ["「傼弸」（màn zhàn xhà）：龘齉", "emoji 😀🚀 and 𠀀𪚥, café ÆØÅ ñ", "北京是中国的首都。 It costs $1,234.50!\n",
         "<|im_start|>assistant\n齉😀<|im_end|>\n", "  two  spaces\tand\n\nlines 🚀"]


@pytest.fixture(params=["sentencepiece", "tokenizer.json", "smollm2"])
def tok(request, sp_dir) -> Tokenizer:
    if request.param == "smollm2":
        return Tokenizer.from_dir(request.getfixturevalue("smollm2_dir"))
    return Tokenizer.from_file(sp_dir / ("tokenizer.model" if request.param == "sentencepiece" else "tokenizer.json"))


def stream(tok: Tokenizer, ids) -> list[str]:
    dec = StreamDecoder(tok)
    return [dec.push(i) for i in ids] + [dec.finish()]


def test_streaming_yields_the_text_chunk_by_chunk(tok):
    split = 0  # characters spread over several tokens (the case that printed U+FFFD)
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        chunks = stream(tok, ids)
        assert "".join(chunks) == text, chunks
        assert not any(FFFD in c for c in chunks), chunks
        held = [i for i, c in enumerate(chunks[:-1]) if c == ""]
        split += len(held)
        # what a decoder shows after k tokens: the text so far, cut before an incomplete character
        for k in range(len(ids) + 1):
            shown = "".join(stream(tok, ids[:k]))
            assert shown == tok.decode_complete(ids[:k]) and text.startswith(shown), (k, shown)
            if tok.decode(ids[:k]).endswith(FFFD):  # decoding the cut sequence at once shows the broken byte(s)
                split += 1
                assert len(shown) < len(tok.decode(ids[:k]))
    assert split > 10  # the texts do exercise split characters


def test_byte_pieces_and_a_cut_character(sp_dir):
    """sentencepiece spells 傼 as three byte pieces; a sequence ending after one or two of them decodes (at once)
    to the text before it, not U+FFFD; a run of invalid bytes longer than any character stays visible."""
    tok = Tokenizer.from_file(sp_dir / "tokenizer.model")
    ids = tok.encode("好傼")
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces[-3:] == ["<0xE5>", "<0x82>", "<0xBC>"], pieces
    for cut in (1, 2):
        assert tok.decode(ids[:-cut]).endswith(FFFD)  # the old output: 好��
        assert tok.decode_complete(ids[:-cut]) == "好"
        assert "".join(stream(tok, ids[:-cut])) == "好"
    assert tok.decode_complete(ids) == "好傼" and tok.decode_complete([]) == ""
    bad = [tok.token_to_id("<0x80>")] * 4
    assert tok.decode_complete(bad) == tok.decode(bad) == FFFD * 4
    assert "".join(stream(tok, bad)) == FFFD * 4


def test_tokenizer_folder(sp_dir, tmp_path):
    """A folder holding tokenizer.model (or only tokenizer.json) is accepted wherever a tokenizer file is."""
    assert Tokenizer(sp_dir).path == str((sp_dir / "tokenizer.model").resolve())
    assert Tokenizer.from_file(sp_dir).encode("傼") == Tokenizer.from_file(sp_dir / "tokenizer.model").encode("傼")
    only_json = tmp_path / "json"
    only_json.mkdir()
    (only_json / "tokenizer.json").write_bytes((sp_dir / "tokenizer.json").read_bytes())
    assert Tokenizer.from_file(only_json).path.endswith("tokenizer.json")
    from llm.errors import UserError

    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer(tmp_path)


def test_text_stream_never_writes_a_stop_string(sp_dir):
    from llm.generate import TextStream

    tok = Tokenizer.from_file(sp_dir / "tokenizer.model")
    text = "答：龘齉😀 then STOP here 😀"
    ids = tok.encode(text)
    out = []
    ts = TextStream(tok, out.append, stop_strings=["STOP", "never"])
    for i in ids:
        ts(0, i)
        ts(1, i)  # another row: ignored
        assert "S" not in "".join(out)
    ts.finish()
    assert "".join(out) == "答：龘齉😀 then " and not any(FFFD in c for c in out)
    for stop in (["😀"], ["齉😀"]):  # a stop string made of byte pieces
        out = []
        ts = TextStream(tok, out.append, stop_strings=stop)
        for i in ids:
            ts(0, i)
        ts.finish()
        assert "".join(out) == text[:text.index(stop[0])]
    out = []
    ts = TextStream(tok, out.append)
    for i in ids[:-1]:  # cut inside the last 😀
        ts(0, i)
    ts.finish()
    assert "".join(out) == text[:-1]


def test_generate_cli_cut_inside_a_character(sp_dir, tmp_path, capsys):
    """tools/generate.py on a random model with the byte-fallback tokenizer, at a seed whose completion ends inside
    a character: the streamed text and the JSON completion are the same text, without U+FFFD at the end."""
    from llm.config import ModelArgs
    from llm.generate import generate
    from llm.hf_format import load_model, save_model
    from llm.model import Transformer

    tok = Tokenizer.from_file(sp_dir / "tokenizer.model")
    torch.manual_seed(0)
    model_dir = save_model(Transformer(ModelArgs.from_preset("debug", vocab_size=tok.vocab_size)), tmp_path / "m",
                           tokenizer=tok)
    model = load_model(model_dir)
    prompt, n = "北京", 6
    seed = next(s for s in range(2000) if tok.decode(generate(
        model, [tok.encode(prompt)], n, temperature=1.0, seed=s, stop_ids=tok.stop_ids)[0]).endswith(FFFD))
    out = generate(model, [tok.encode(prompt)], n, temperature=1.0, seed=seed, stop_ids=tok.stop_ids)[0]
    want = tok.decode_complete(out)
    assert not want.endswith(FFFD) and len(want) < len(tok.decode(out))
    main = runpy.run_path(str(ROOT / "tools" / "generate.py"))["main"]
    capsys.readouterr()
    run_cli(main, args=["--model", str(model_dir), "--prompt", prompt, "--max_new_tokens", str(n), "--temperature",
                        "1.0", "--seed", str(seed), "--compile", "false", "--device", "cpu",
                        "--json", str(tmp_path / "out.json")])
    assert capsys.readouterr().out == want + "\n"
    assert json.loads((tmp_path / "out.json").read_text())["samples"] == [{"prompt": prompt, "completion": want}]
    # more new tokens than the context leaves after the prompt: a warning, and the completion stops at the context
    long_prompt = "北京" * 20
    n_prompt = len(tok.encode(long_prompt))
    run_cli(main, args=["--model", str(model_dir), "--prompt", long_prompt, "--max_new_tokens", "128", "--compile",
                        "false", "--device", "cpu"])
    err = capsys.readouterr().err
    assert f"warning: prompt 1 is {n_prompt} tokens; the model's context is 128, so its completion stops after at " \
           f"most {129 - n_prompt} tokens, not --max_new_tokens 128" in err, err

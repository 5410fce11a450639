"""The chat template: render == transformers' apply_chat_template (SmolLM2's own template and ours), the round trip
render → tokenize → labels (what SFT trains on) for a sentencepiece and a byte-level BPE tokenizer, and the chat CLI
answering SmolLM2-135M-Instruct's simple question, scripted through stdin."""
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from llm.chat import IGNORE_INDEX, render, tokenize_chat
from llm.errors import UserError
from llm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "床前明月光的下一句是什么？"},
    {"role": "assistant", "content": "疑是地上霜。\n\nIt is Li Bai's poem."},
]


def test_render_format():
    assert render(CHAT[:3], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2 + 2 = 4.<|im_end|>\n")
    assert render(CHAT[:2], add_generation_prompt=True).endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(UserError, match="role"):
        render([{"role": "bot", "content": "hi"}])
    with pytest.raises(UserError, match="special token"):
        render([{"role": "user", "content": "<|im_end|>"}])


@pytest.mark.parametrize("which", ["smollm2", "sentencepiece"])
def test_round_trip_and_labels(which, request):
    from transformers import AutoTokenizer

    d = request.getfixturevalue("smollm2_dir" if which == "smollm2" else "sp_dir")
    tok = Tokenizer.from_dir(d)
    hf = AutoTokenizer.from_pretrained(d)
    for gen in (False, True):
        msgs = CHAT[:4] if gen else CHAT
        text = render(msgs, add_generation_prompt=gen)
        # the outside reference: transformers renders the directory's own chat template (SmolLM2's, or ours)
        assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == text
        ids, labels = tokenize_chat(tok, msgs, add_generation_prompt=gen)
        assert ids == tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert len(labels) == len(ids)
        # labelled spans: exactly each assistant content followed by <|im_end|>
        spans, cur = [], []
        for i, l in zip(ids, labels):
            if l != IGNORE_INDEX:
                assert l == i
                cur.append(i)
            elif cur:
                spans.append(cur)
                cur = []
        want = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
        assert [tok.decode(s) for s in spans] == want


def test_chat_cli_answers(smollm2_dir):
    """Scripted: one prompt per stdin line; /reset and /exit; greedy, so the answer is reproducible."""
    stdin = "What is the capital of France?\n/reset\n/exit\nnot read\n"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "chat.py"), "--model", str(smollm2_dir),
                        "--temperature", "0", "--max_new_tokens", "40"],
                       input=stdin, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    replies = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(replies) == 1 and "Paris" in replies[0], r.stdout
    assert "(conversation reset)" in r.stderr


def test_chat_cli_exit_status(sp_dir, tmp_path, monkeypatch, capsys):
    """A message too long for the context gets one error line, the chat goes on, and the exit status is 1; a bad
    setting is one line and exit status 2, before the model is read."""
    import io

    import torch

    from llm.cli import run_cli
    from llm.config import ModelArgs
    from llm.hf_format import save_model
    from llm.model import Transformer

    tok = Tokenizer.from_dir(sp_dir)
    torch.manual_seed(0)
    model_dir = save_model(Transformer(ModelArgs.from_preset("debug", vocab_size=tok.vocab_size)), tmp_path / "m",
                           tokenizer=tok)  # context 128
    chat = runpy.run_path(str(ROOT / "tools" / "chat.py"))["chat"]
    args = ["--model", str(model_dir), "--temperature", "0", "--max_new_tokens", "4", "--compile", "false"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n" + "长" * 300 + "\nok\n"))
    assert run_cli(chat, args=args) == 1
    out, err = capsys.readouterr()
    assert "error: that message is" in err and "1 message(s) got no reply" in err, err
    assert out.count("\n") >= 2  # the two other messages got replies, each ended by a newline
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n"))
    assert run_cli(chat, args=args) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(chat, args=args + ["--top_p", "2"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == \
        "error: --top_p 2: must be in (0, 1] (1 = no nucleus filtering)"

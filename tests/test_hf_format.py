"""Checkpoints as Hugging Face Llama directories (llm.hf_format) and GGUF files (llm.gguf, tools/convert.py):
round trips through transformers, and the errors a user gets for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llm import ModelArgs, RopeScaling, Transformer, load_model, save_model
from llm.errors import UserError
from llm.gguf import gguf_to_hf, hf_to_gguf

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=128)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory, sample_text):
    """A byte-level BPE trained (tokenizers library) on real text, as llm.tokenizer.Tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from llm.tokenizer import Tokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([sample_text], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer.from_file(path)


def tiny_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**TINY, "vocab_size": 400, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # logits of order 1, norms != 1
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.15)
    return model


def tokens(n=40, vocab=400):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------- HF directories
@pytest.mark.parametrize("overrides", [dict(tie_word_embeddings=True),
                                       dict(rope_scaling=RopeScaling("yarn", 4.0, 32))], ids=["tied", "untied-yarn"])
def test_save_model_loads_in_transformers(tmp_path, bpe_tokenizer, sample_text, overrides):
    model = tiny_model(**overrides)
    save_model(model, tmp_path / "m", tokenizer=bpe_tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    x = tokens(100)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x))
    assert AutoTokenizer.from_pretrained(tmp_path / "m")(sample_text)["input_ids"] == bpe_tokenizer.encode(sample_text)
    assert not list(tmp_path.glob(".m.tmp-*"))  # the temporary directory was renamed into place


@pytest.mark.parametrize("shard", [None, "60KB"], ids=["single", "sharded"])
def test_load_model_of_transformers_dir(tmp_path, shard):
    ref = tiny_model(seed=1)
    hf = LlamaForCausalLM(LlamaConfig(**ref.args.to_hf_config())).eval()
    hf.load_state_dict(ref.state_dict())
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (len(list(tmp_path.glob("*.safetensors"))) > 1) == bool(shard)
    model = load_model(tmp_path)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def saved(tmp_path):
    """A valid directory written by transformers, to be damaged by each test."""
    hf = LlamaForCausalLM(LlamaConfig(**tiny_model().args.to_hf_config()))
    hf.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def edit_weights(d: Path, fn):
    f = d / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


K = "model.layers.1.self_attn.k_proj.weight"
BAD = {  # name: (damage, strings the one-line message must contain)
    "no-config": (lambda d: (d / "config.json").unlink(), ["config.json"]),
    "not-llama": (lambda d: edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                  ["config.json", "model_type", "gpt2"]),
    "rope-type": (lambda d: edit_config(d, rope_scaling={"rope_type": "longrope", "factor": 2.0}),
                  ["config.json", "rope_scaling", "longrope"]),
    "missing": (lambda d: edit_weights(d, lambda sd: sd.pop(K)), ["missing", K]),
    "extra": (lambda d: edit_weights(d, lambda sd: sd.update({"model.layers.9.mlp.up_proj.weight": sd[K].clone()})),
              ["unexpected", "model.layers.9.mlp.up_proj.weight"]),
    "shape": (lambda d: edit_weights(d, lambda sd: sd.update({K: sd[K][:-1]})), [K, "(31, 64)", "(32, 64)"]),
    "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                  ["model.safetensors", "truncated"]),
}


@pytest.mark.parametrize("case", BAD)
def test_load_model_bad_input(saved, case):
    damage, expected = BAD[case]
    damage(saved)
    with pytest.raises(UserError) as e:
        load_model(saved)
    msg = str(e.value)
    assert str(saved) in msg and "\n" not in msg
    for s in expected:
        assert s in msg


def run_convert(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools/convert.py"), *args], capture_output=True, text=True)


def test_convert_cli_errors(tmp_path, saved):
    """One line on stderr, exit code 2, no traceback, nothing written."""
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("just text\n" * 10)
    r = run_convert("from_gguf", "--src", str(not_gguf), "--dst", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert str(not_gguf) in r.stderr and "GGUF" in r.stderr
    (saved / "config.json").unlink()
    r = run_convert("to_gguf", "--src", str(saved), "--dst", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "config.json" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "notes.gguf"]


def test_gguf_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UserError, match=r"gpt2\.gguf: general\.architecture is 'gpt2'"):
        gguf_to_hf(tmp_path / "gpt2.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- GGUF
def test_gguf_round_trip_f16_untied_yarn(tmp_path, bpe_tokenizer, sample_text):
    """The GGUF paths SmolLM2 (test_smollm2.py) does not take: an untied output head, YaRN metadata, head_dim !=
    dim / n_heads, f16 storage (weights come back as their f16 values), a GPT-2-style BPE. transformers' own GGUF
    reader reads our file to the same weights: an outside check of names, Q/K permutation and metadata."""
    model = tiny_model(head_dim=32, rope_scaling=RopeScaling("yarn", 4.0, 32), rope_theta=50000.0,
                       bos_token_id=None, eos_token_id=0, pad_token_id=None)
    save_model(model, tmp_path / "src", tokenizer=bpe_tokenizer)
    hf_to_gguf(tmp_path / "src", tmp_path / "m.gguf", dtype="f16")
    back = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "back")
    assert load_model(back).args.to_hf_config() == model.args.to_hf_config()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(p.half().float())  # what f16 storage keeps
        x = tokens(120)
        torch.testing.assert_close(load_model(back)(x), model(x))
    assert AutoTokenizer.from_pretrained(back)(sample_text)["input_ids"] == bpe_tokenizer.encode(sample_text)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    for k, t in model.state_dict().items():
        assert torch.equal(ref.state_dict()[k], t), k
    with pytest.raises(UserError, match="not a readable GGUF"):  # a truncated file
        (tmp_path / "cut.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:100_000])
        gguf_to_hf(tmp_path / "cut.gguf", tmp_path / "cut")
    assert not (tmp_path / "cut").exists()


def test_gguf_round_trip_sentencepiece(tmp_path, shakespeare, sample_text):
    """Our own tokenizers are sentencepiece BPE (tools/train_tokenizer.py's options): to_gguf writes them as
    llama.cpp's "llama" vocabulary (pieces, scores, types, normalizer flags) and from_gguf rebuilds tokenizer.model."""
    import sentencepiece as spm

    from llm.tokenizer import Tokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(shakespeare.splitlines()), model_prefix=str(tmp_path / "sp"), model_type="bpe",
        vocab_size=600, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    tok = Tokenizer.from_file(tmp_path / "sp.model")
    save_model(tiny_model(vocab_size=tok.vocab_size), tmp_path / "src", tokenizer=tok)
    hf_to_gguf(tmp_path / "src", tmp_path / "m.gguf", dtype="f32")
    back = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "back")
    again = Tokenizer.from_dir(back)
    assert again.path.endswith("tokenizer.model")
    ids = tok.encode(sample_text)
    assert again.encode(sample_text) == ids and again.decode(ids) == sample_text
    assert AutoTokenizer.from_pretrained(back)(sample_text)["input_ids"] == ids
    assert [again.id_to_piece(i) for i in range(600)] == [tok.id_to_piece(i) for i in range(600)]
    assert (again.bos_id, again.eos_id, again.pad_id, again.stop_ids) == (1, 2, 0, tok.stop_ids)

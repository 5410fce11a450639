"""Training a sentencepiece BPE tokenizer (Kudo & Richardson 2018; LLaMA-2's recipe) for Chinese and English text
(`tools/train_tokenizer.py` runs `train_tokenizer`).

BPE with byte fallback (no unknown tokens), digits split one per token, printable ASCII always in the vocabulary,
identity normalization and whitespace kept as is (so decode(encode(text)) == text), and the specials <pad>=0 <s>=1
</s>=2 <unk>=3 plus the ChatML roles <|im_start|>, <|im_end|> as single tokens. Training reads a reservoir sample of
at most `max_sentences` lines, so the input can be far larger than memory. Writes tokenizer.model and the Hugging
Face files (tokenizer.json, tokenizer_config.json, ...) next to it, then reports characters and bytes per token on
held-out Chinese and English text and the share of a model preset's parameters the embedding would take.
"""
from __future__ import annotations

import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

from llm import writer
from llm.errors import UserError
from llm.config import ModelArgs
from llm.corpora import DEMO_TOKENIZER, DEMO_TOKENIZER_INPUTS, expand_inputs, iter_documents
from llm.sft_sources import is_chat_builtin, load_chats
from llm.tokenizer import CHAT_TOKENS, Tokenizer

COVERAGES = (0.9999, 0.9995, 0.999, 0.998, 0.995, 0.99, 0.98)  # sentencepiece rejects < 0.98
ASCII = "".join(map(chr, range(0x21, 0x7F)))  # always own tokens, even if rare in the sample (digits in poems)
HELD_OUT = {"en": "builtin:shakespeare", "zh": "builtin:renmin"}
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # written next to tokenizer.model


def expand_text_inputs(inputs: list[str]) -> list[str]:
    """expand_inputs, with chat built-ins kept as they are."""
    return [f for spec in inputs for f in ([spec] if is_chat_builtin(spec) else expand_inputs([spec]))]


def input_documents(src: str, text_key: str, txt_docs: str):
    """The training-split documents of one input: a chat built-in's chats (the split llm/sft.py trains on at its
    default val_fraction) as their messages' text, one message a line; else iter_documents."""
    if is_chat_builtin(src):
        return ("\n".join(m["content"] for m in chat) for _, chat in load_chats(src, "train"))
    return iter_documents(src, "train", text_key=text_key, txt_docs=txt_docs)


def sample_lines(inputs: list[str], max_sentences: int, seed: int, text_key: str, txt_docs: str,
                 max_input_mb: float = float("inf")) -> list[str]:
    """A uniform sample (reservoir, Vitter's algorithm R) of the non-empty lines of the inputs' first
    `max_input_mb` MB of text (each input gets an equal share of that budget)."""
    rng = random.Random(seed)
    sample: list[str] = []
    n = 0
    files = expand_text_inputs(inputs)
    for src in files:
        budget = max_input_mb * 1e6 / len(files)
        for doc in input_documents(src, text_key, txt_docs):
            budget -= len(doc)
            if budget < 0:
                break
            for line in doc.split("\n"):
                if not line.strip():
                    continue
                n += 1
                if len(sample) < max_sentences:
                    sample.append(line)
                else:
                    j = rng.randrange(n)
                    if j < max_sentences:
                        sample[j] = line
    if not sample:
        raise UserError(f"{', '.join(inputs)}: no text to train on — the input is empty")
    return sample


def pick_coverage(lines: list[str], vocab_size: int, max_chars: int = 20_000_000, char_share: float = 0.5) -> float:
    """The largest character coverage whose required characters fill at most `char_share` of the vocabulary: full
    CJK coverage for large vocabularies, rarer characters left to byte fallback for small ones (a 4k vocabulary
    cannot hold 3,000 Chinese characters and still learn many English merges)."""
    text = "".join(lines)[:max_chars].replace(" ", "")
    _, counts = np.unique(np.frombuffer(text.encode("utf-32-le"), np.uint32), return_counts=True)
    cum = np.cumsum(np.sort(counts)[::-1]) / counts.sum()
    for cov in COVERAGES:
        if int(np.searchsorted(cum, cov)) + 1 <= vocab_size * char_share:
            return cov
    return COVERAGES[-1]


def report(tok: Tokenizer, preset: str, chat_sources: tuple[str, ...] = ()) -> dict:
    """Characters and bytes per token on held-out text (and the share of byte fragments in the held-out chats of
    `chat_sources`), and the embedding's share of the preset's parameters."""
    from llm.chat import render

    out = {"vocab_size": tok.vocab_size}
    print(f"vocab size: {tok.vocab_size}")
    for lang, src in HELD_OUT.items():
        text = "".join(iter_documents(src, "val", max_bytes=300_000))
        n = len(tok.encode(text))
        out[lang] = {"chars_per_token": len(text) / n, "bytes_per_token": len(text.encode("utf-8")) / n}
        print(f"held-out {lang} ({src} val, {len(text):,} chars): {out[lang]['chars_per_token']:.2f} chars/token, "
              f"{out[lang]['bytes_per_token']:.2f} bytes/token")
    for src in chat_sources:
        fragments, n = tok.count_byte_fragments(tok.encode_batch([render(c) for _, c in load_chats(src, "val")]))
        out[src] = {"byte_fragment_share": fragments / max(n, 1)}
        print(f"held-out chats of {src}: {fragments / max(n, 1):.1%} of {n:,} tokens are byte fragments")
    args = ModelArgs.from_preset(preset, vocab_size=tok.vocab_size)
    emb = tok.vocab_size * args.dim * (1 if args.tie_word_embeddings else 2)
    out["embedding_share"] = emb / args.n_params
    warn = "  <- most of the model is vocabulary: use a smaller --vocab_size or a bigger preset"
    print(f"preset {preset} with this vocabulary: {args.n_params / 1e6:.1f}M parameters, embeddings "
          f"{'(tied) ' if args.tie_word_embeddings else '(input + output) '}{emb / 1e6:.1f}M = "
          f"{100 * out['embedding_share']:.0f}%" + (warn if out["embedding_share"] > 0.5 else ""))
    return out


def spm_message(e: RuntimeError) -> str:
    """sentencepiece's error as one sentence, without its source location and failed check: `INTERNAL:
    src/trainer_interface.cc(744) [(a) == (b)] Vocabulary size too high (100000). ...` -> `Vocabulary size ...`."""
    msg = " ".join(str(e).split())
    return re.sub(r"^\w+: \S+\(\d+\) \[.*?\)\] ", "", msg)[-300:]


def train_tokenizer(inputs: Union[list[str], str, None] = None, out: str = DEMO_TOKENIZER,
                    vocab_size: int = 4096, character_coverage: Optional[float] = None, char_share: float = 0.85,
                    max_sentences: int = 2_000_000, max_input_mb: float = 4000, max_sentence_length: int = 16384,
                    text_key: str = "text",
                    txt_docs: str = "blank_line", seed: int = 0, threads: int = 2, preset: str = "cpu-demo",
                    overwrite: bool = False) -> dict:
    """Train a sentencepiece BPE tokenizer and report how well it compresses held-out Chinese and English.

    Args:
        inputs: one or a list of files, globs or folders of .txt / .jsonl / .jsonl.gz / .parquet, builtin:
            corpora, or built-in chat data (builtin:idioms, builtin:chatterbot, builtin:chitchat: the text of the
            chats llm/sft.py trains on, held-out chats left out). Default: builtin:demo and builtin:idioms, the
            text run.sh's cpu-demo model pretrains and is fine-tuned on.
        out: the tokenizer.model to write; the Hugging Face tokenizer files go next to it. An existing directory
            means DIR/tokenizer.model. Files already there are replaced only with --overwrite, and only in a
            tokenizer directory this toolkit made.
        vocab_size: number of tokens, specials included (match the model preset's vocab_size).
        character_coverage: share of characters that get their own token (the rest fall back to bytes);
            default: the largest of 0.9999 ... 0.98 whose characters fill at most `char_share` of the vocabulary.
        char_share: the share of the vocabulary characters may take when character_coverage is not given (more:
            fewer byte fragments on text with many rare characters, fewer merges, so fewer bytes per token).
        max_sentences: lines sampled from the inputs for training (bounds memory on huge inputs).
        max_input_mb: read at most this much text (in million characters, split evenly over the input files)
            to draw the sample from (bounds time on huge inputs).
        max_sentence_length: longer lines (in bytes) are skipped by sentencepiece.
        text_key: field of jsonl records / parquet column with the text.
        txt_docs: how .txt files split into documents (blank_line, line, file).
        seed: sampling seed.
        threads: sentencepiece training threads.
        preset: model preset for the embedding-share line of the report.
        overwrite: retrain even if `out` exists (replacing only a tokenizer this toolkit wrote).
    """
    import sentencepiece as spm

    inputs = list(DEMO_TOKENIZER_INPUTS) if inputs is None else [inputs] if isinstance(inputs, str) else list(inputs)
    out_path = Path(out)
    try:
        ModelArgs.from_preset(preset)
    except ValueError as e:
        raise UserError(f"--preset: {e}") from None
    if out_path.is_dir():
        out_path = out_path / "tokenizer.model"
    if out_path.is_file() and not overwrite:
        print(f"{out_path}: exists (--overwrite retrains); its report:")
        return report(Tokenizer(out_path), preset, tuple(i for i in inputs if is_chat_builtin(i)))
    # before the training: every file written must be new, or (--overwrite) a tokenizer file of ours
    if not 0 < char_share < 1:
        raise UserError(f"--char_share {char_share}: give a share of the vocabulary between 0 and 1")
    files = expand_text_inputs(inputs)
    for name in ("tokenizer.model", *HF_FILES):
        writer.check_file(out_path if name == "tokenizer.model" else out_path.parent / name, "tokenizer",
                          files, overwrite, flag="--out")
    lines = sample_lines(inputs, max_sentences, seed, text_key, txt_docs, max_input_mb)
    coverage = (character_coverage if character_coverage is not None
                else pick_coverage(lines, vocab_size, char_share=char_share))
    print(f"training on {len(lines):,} lines ({sum(map(len, lines)):,} chars), vocab {vocab_size}, "
          f"character coverage {coverage}")
    new_dirs = [d for d in (out_path.parent, *out_path.parent.parents) if not d.exists()]
    writer.make_dir(out_path.parent, "tokenizer")
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=out_path.parent))
    ok = False
    try:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_prefix=str(tmp / "tokenizer"), model_type="bpe",
                vocab_size=vocab_size, character_coverage=coverage, byte_fallback=True, split_digits=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                allow_whitespace_only_pieces=True, max_sentence_length=max_sentence_length,
                pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>",
                unk_piece="<unk>", user_defined_symbols=list(CHAT_TOKENS), required_chars=ASCII,
                num_threads=threads,
                input_sentence_size=0, minloglevel=2)
        except RuntimeError as e:
            raise UserError(f"{out_path}: sentencepiece cannot train a {vocab_size}-token vocabulary on this text: "
                            f"{spm_message(e)} — change --vocab_size (or --character_coverage)") from None
        tok = Tokenizer(tmp / "tokenizer.model")
        tok.save_pretrained(tmp)
        (tmp / "tokenizer.vocab").unlink(missing_ok=True)
        # the model file last: its presence is what later runs check
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == "tokenizer.model"):
            dst = out_path if f.name == "tokenizer.model" else out_path.parent / f.name
            f.replace(dst)
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok and new_dirs:  # a failed training leaves no folder behind, its marker gone with it
            shutil.rmtree(out_path.parent, ignore_errors=True)
            for d in new_dirs[1:]:  # the parents it made, innermost first, while empty
                try:
                    d.rmdir()
                except OSError:
                    break
    print(f"wrote {out_path} (+ tokenizer.json, tokenizer_config.json, special_tokens_map.json)")
    return report(Tokenizer(out_path), preset, tuple(i for i in inputs if is_chat_builtin(i)))

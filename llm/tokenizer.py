"""One `Tokenizer` over a sentencepiece `tokenizer.model` or a Hugging Face `tokenizer.json`.

Our own tokenizers are sentencepiece BPE models (Kudo & Richardson 2018, as LLaMA-2 uses) trained by
tools/train_tokenizer.py; models converted from GGUF (SmolLM2) carry a byte-level BPE `tokenizer.json` (the
`tokenizers` library). `save_pretrained(dir)` writes the files a Hugging Face model directory needs: for a
sentencepiece model it also builds an equivalent `tokenizer.json` with `tokenizers` (vocab, merges ranked by piece
score, byte fallback, user-defined symbols as added tokens), because transformers 5.x converting a bare
`tokenizer.model` through `LlamaTokenizer` can produce different ids. tests/test_tokenizer.py checks that
`transformers.AutoTokenizer` on the saved directory gives exactly our ids.

Generated ids may stop inside a character (byte-fallback pieces <0xE5><0x82><0xBC> spell 傼), which `decode` renders
as U+FFFD: `decode_complete` drops such a cut character, and `StreamDecoder` decodes a token stream piece by piece
without ever showing part of one (tests/test_decode.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from functools import cached_property
from pathlib import Path
from typing import Iterable, Optional

from llm.errors import UserError

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
REPLACEMENT = "\ufffd"  # what decoding renders an incomplete or invalid UTF-8 byte sequence as
MAX_PARTIAL_TOKENS = 3  # an incomplete UTF-8 character is at most 3 bytes, so at most 3 tokens
BYTE_FRAGMENT_WARN = 0.05  # above this share of byte fragments the vocabulary does not fit the text
# ChatML, the same format llm/chat.py renders; written to tokenizer_config.json for `apply_chat_template`.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_in(d: Path) -> Path:
    """The tokenizer file of the folder `d`: tokenizer.model, else tokenizer.json."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if (d / name).is_file():
            return d / name
    raise UserError(f"{d}: no tokenizer.model or tokenizer.json in the directory — save the model with a "
                    "tokenizer (save_model(..., tokenizer=...)) or copy the tokenizer files next to config.json")


class Tokenizer:
    """Text <-> token ids. Build with `Tokenizer.from_file(path)` or `Tokenizer.from_dir(model_dir)`."""

    def __init__(self, path: str | os.PathLike):
        """path: a tokenizer.model / tokenizer.json, or a folder holding one (tokenizer.model first)."""
        if Path(path).is_dir():
            path = _file_in(Path(path))
        self.path = str(Path(path).resolve())
        if not Path(self.path).is_file():
            raise UserError(f"{path}: tokenizer file not found — train one with `python tools/train_tokenizer.py` "
                            "or pass a model directory's tokenizer.model / tokenizer.json")
        self.sha256 = file_sha256(self.path)
        self.sp = self.hf = None
        if self.path.endswith(".json"):
            self._init_hf()
        else:
            self._init_sp()
        self.stop_ids = sorted({i for i in (self.eos_id, self.token_to_id("<|im_end|>")) if i is not None})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        return cls(path)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "Tokenizer":
        return cls(_file_in(Path(model_dir)))

    # --- backends -----------------------------------------------------------------------------------------------
    def _init_sp(self):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise UserError(f"{self.path}: not a sentencepiece model ({e}) — pass a tokenizer.model written by "
                            "tools/train_tokenizer.py or a tokenizer.json") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            i if i >= 0 else None for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id(), self.sp.unk_id()))

    def _init_hf(self):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.hf = HFTokenizer.from_file(self.path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed files
            raise UserError(f"{self.path}: not a Hugging Face tokenizer.json ({e})") from None
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        cfg_file = Path(self.path).with_name("tokenizer_config.json")
        self.config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.hf.encode_special_tokens = bool(self.config.get("split_special_tokens", False))

        def special(key, *fallbacks):
            tok = self.config.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            for t in ([tok] if tok else []) + list(fallbacks):
                if self.hf.token_to_id(t) is not None:
                    return self.hf.token_to_id(t)
            return None

        self.bos_id = special("bos_token", "<s>", "<|begin_of_text|>")
        self.eos_id = special("eos_token", "</s>", "<|endoftext|>", "<|end_of_text|>")
        self.pad_id = special("pad_token", "<pad>")
        self.unk_id = special("unk_token", "<unk>")

    # --- API ----------------------------------------------------------------------------------------------------
    @property
    def pad_or_eos(self) -> int:
        """The id batches are padded with: <pad>, or </s> for a tokenizer without one (SmolLM2's)."""
        return self.pad_id if self.pad_id is not None else self.eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text) if self.sp is not None else self.hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Iterable[str], num_threads: int = 1, eos: bool = False,
                     numpy: bool = False) -> list:
        """Ids of each text, eos appended with `eos`: lists of ints, or with `numpy` int32 arrays, which sentencepiece
        fills without making a Python int per token (a fifth less time than lists; its return_type="numpy")."""
        texts = list(texts)
        if self.sp is not None:
            try:
                return self.sp.encode(texts, num_threads=num_threads, add_eos=eos,
                                      **({"return_type": "numpy"} if numpy else {}))
            except (TypeError, ValueError):  # a sentencepiece without return_type="numpy"
                if not numpy:
                    raise
            ids = self.sp.encode(texts, num_threads=num_threads, add_eos=eos)
        else:
            ids = [e.ids + ([self.eos_id] if eos else []) for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        if numpy:
            import numpy as np

            return [np.array(x, dtype=np.int32) for x in ids]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. sentencepiece renders its control tokens (bos/eos/pad) as nothing; the chat tokens are
        user-defined symbols and come back as text. A tokenizer.json renders every token (as transformers does)."""
        ids = [int(i) for i in ids]
        return self.sp.decode(ids) if self.sp is not None else self.hf.decode(ids, skip_special_tokens=False)

    def decode_complete(self, ids: Iterable[int]) -> str:
        """`decode(ids)` without a character cut off at the end: text decoded from ids that stop inside a UTF-8
        byte sequence (byte-fallback pieces such as <0xE5>, or byte-level BPE tokens) ends in U+FFFD; the longest
        text of ids losing at most the last MAX_PARTIAL_TOKENS that does not end in U+FFFD is returned instead.
        (More trailing U+FFFD than that come from invalid bytes, and stay.) For generated text cut by a token
        budget, and what `StreamDecoder` shows in total."""
        ids = [int(i) for i in ids]
        text = self.decode(ids)
        for k in range(1, min(MAX_PARTIAL_TOKENS, len(ids)) + 1):
            if not text.endswith(REPLACEMENT):
                break
            text = self.decode(ids[:-k])
        return text if not text.endswith(REPLACEMENT) else self.decode(ids)

    def token_to_id(self, token: str) -> Optional[int]:
        if self.sp is not None:
            i = self.sp.piece_to_id(token)
            return i if self.sp.id_to_piece(i) == token else None  # piece_to_id answers unk for unknown pieces
        return self.hf.token_to_id(token)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i)) if self.sp is not None else self.hf.id_to_token(int(i))

    @cached_property
    def is_byte_fragment(self):
        """Bool array over the vocabulary: the byte-fallback pieces <0x80>..<0xFF>, which spell a character the
        vocabulary lacks as 2-4 UTF-8 bytes (ASCII bytes such as <0x0A> are whole characters; byte-level BPE such as
        GPT-2's has no such pieces)."""
        import numpy as np

        pieces = (self.id_to_piece(i) for i in range(self.vocab_size))
        return np.fromiter((bool(re.fullmatch(r"<0x[89A-F][0-9A-F]>", p)) for p in pieces), bool, self.vocab_size)

    def count_byte_fragments(self, seqs: Iterable) -> tuple[int, int]:
        """(byte fragments, tokens) over the id sequences `seqs` (lists or arrays)."""
        import numpy as np

        n_byte = n = 0
        for ids in seqs:
            n_byte += int(self.is_byte_fragment[np.asarray(ids, dtype=np.int64)].sum())
            n += len(ids)
        return n_byte, n

    def coverage_warning(self, fragments: int, tokens: int, source: str) -> Optional[str]:
        """A warning when more than 5% of `source`'s tokens are byte fragments: many of its characters are missing
        from the vocabulary, so a model spends its capacity spelling them out (text in another script or domain
        than the tokenizer was trained on)."""
        share = fragments / max(tokens, 1)
        if share <= BYTE_FRAGMENT_WARN:
            return None
        return (f"warning: {share:.1%} of {source}'s tokens are byte fragments — {self.path} lacks many of its "
                "characters, and a model learns such text poorly; train a tokenizer on text like it "
                "(python tools/train_tokenizer.py --inputs '[..., YOUR_TEXT]') before pretraining")

    def __repr__(self):
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"

    # --- Hugging Face files -------------------------------------------------------------------------------------
    @cached_property
    def hf_tokenizer(self):
        """A `tokenizers.Tokenizer` with exactly our ids (built from the sentencepiece model if that is the source)."""
        return self.hf if self.hf is not None else _tokenizers_from_sentencepiece(self.path)

    def save_pretrained(self, dir: str | os.PathLike) -> list[Path]:
        """Write tokenizer.model (sentencepiece only), tokenizer.json, tokenizer_config.json and
        special_tokens_map.json into `dir` so that `transformers.AutoTokenizer.from_pretrained(dir)` gives our ids."""
        d = Path(dir)
        d.mkdir(parents=True, exist_ok=True)
        written = []
        if self.sp is not None and Path(self.path) != (d / "tokenizer.model").resolve():
            shutil.copyfile(self.path, d / "tokenizer.model")
            written.append(d / "tokenizer.model")
        if Path(self.path) != (d / "tokenizer.json").resolve():
            if self.hf is not None:
                shutil.copyfile(self.path, d / "tokenizer.json")
            else:
                self.hf_tokenizer.save(str(d / "tokenizer.json"))
            written.append(d / "tokenizer.json")
        names = {k: self.id_to_piece(i) for k, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                                                     ("pad_token", self.pad_id), ("unk_token", self.unk_id))
                 if i is not None}
        cfg = dict(getattr(self, "config", {}))
        cfg.update(names)
        cfg.update({
            # the generic fast class: model-specific classes (LlamaTokenizer) rebuild normalizers and prefixes
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        })
        if self.sp is not None:
            cfg["split_special_tokens"] = True  # sentencepiece never matches "<s>" typed in text
            cfg["model_max_length"] = cfg.get("model_max_length", int(1e30))
        if all(self.token_to_id(t) is not None for t in CHAT_TOKENS):
            cfg.setdefault("chat_template", CHAT_TEMPLATE)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        (d / "special_tokens_map.json").write_text(json.dumps(names, indent=2, ensure_ascii=False) + "\n")
        return written + [d / "tokenizer_config.json", d / "special_tokens_map.json"]


class StreamDecoder:
    """Text of a token stream, piece by piece, never showing part of a character (vLLM's incremental detokenizer).

    `push(ids)` returns the text the new ids complete: it decodes a short window of the latest ids and holds the
    text back while it ends in U+FFFD (a character whose UTF-8 bytes are split over several byte-fallback or
    byte-level tokens, e.g. <0xE5><0x82><0xBC> = 傼). `finish()` returns what is still held, without a trailing
    incomplete character. Everything pushed and finished, joined, equals `tokenizer.decode_complete(all ids)` (for
    ids that spell valid UTF-8, or whose decoding of a prefix does not change later characters).
    The window starts where an earlier piece ended (a character boundary), and its text is taken relative to the
    decoded text before that point, so tokenizers that drop the leading space of the first token decode alike.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # the window (ids decoded each step) starts here
        self.read = 0  # ids before this are shown
        self.prefix_text = ""  # decode(ids[prefix:read])

    def push(self, ids: int | Iterable[int]) -> str:
        """Add one id or several; the text they complete ("" while a character is still incomplete)."""
        self.ids.extend(map(int, ids) if isinstance(ids, Iterable) else [int(ids)])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(self.prefix_text) or text.endswith(REPLACEMENT):
            return ""
        new = text[len(self.prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        # decoded on its own, as the next window will be (its first token may lose a leading space there)
        self.prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        return new

    def finish(self) -> str:
        """The text of the ids still held, without a trailing incomplete character; then start over."""
        text = self.tokenizer.decode_complete(self.ids[self.prefix:]) if len(self.ids) > self.read else ""
        new = text[len(self.prefix_text):]
        self.__init__(self.tokenizer)
        return new


def _tokenizers_from_sentencepiece(model_file: str):
    """The `tokenizers` equivalent of a sentencepiece model (what transformers' LlamaConverter builds, without
    needing a slow tokenizer): same vocab and ids, BPE merges ranked by the score of the merged piece (sentencepiece
    BPE merges the best-scored adjacent pair first), byte fallback, control pieces as special added tokens and
    user-defined symbols (the chat tokens) as plain added tokens, which sentencepiece also matches anywhere in text."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    P = pb.ModelProto.SentencePiece
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    byte_fallback = proto.trainer_spec.byte_fallback
    unk = proto.trainer_spec.unk_piece
    if proto.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM:
        model = Unigram([(p, s) for p, s, _ in pieces], unk_id=proto.trainer_spec.unk_id, byte_fallback=byte_fallback)
    elif proto.trainer_spec.model_type == pb.TrainerSpec.BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        mergeable = {p: s for p, s, t in pieces if t == P.NORMAL}
        merges = []  # (score of the merged piece, left id, right id, left, right)
        for piece, score in mergeable.items():
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in mergeable and right in mergeable:
                    merges.append((-score, vocab[left], vocab[right], left, right))
        merges.sort()
        model = BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True,
                    byte_fallback=byte_fallback, dropout=None)
    else:
        raise UserError(f"{model_file}: sentencepiece model type {proto.trainer_spec.model_type} cannot be saved as "
                        "tokenizer.json (only BPE and unigram)")
    tok = HFTokenizer(model)
    norm = [normalizers.Replace(" ", "▁")]
    if proto.normalizer_spec.precompiled_charsmap:
        norm.insert(0, normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:  # LLaMA-style models: "▁" before the text, stripped when decoding
        norm.insert(-1, normalizers.Prepend("▁"))
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence(dec)
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, t in pieces if t == P.USER_DEFINED])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, _, t in pieces if t in (P.CONTROL, P.UNKNOWN)])
    tok.encode_special_tokens = True  # as sentencepiece: "<s>" in text is three characters, not bos
    return tok

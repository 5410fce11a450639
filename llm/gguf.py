"""GGUF (llama.cpp's file format) <-> Hugging Face Llama directory, with the `gguf` package.

Follows llama.cpp's `convert_hf_to_gguf.py` (class LlamaModel) in both directions:
- tensor names through `gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers)`;
- q_proj / k_proj rows permuted into llama.cpp's interleaved rotary layout (`_permute`) and back (`_unpermute`),
  because our model and transformers rotate halves (`rotate_half`) while ggml rotates adjacent pairs;
- quantized tensors (Q4_1, Q8_0, K-quants...) dequantized to float32 with `gguf.quants.dequantize`;
- the vocabulary: a GPT-2 byte-level BPE (`tokenizer.ggml.model == "gpt2"`, e.g. SmolLM2) becomes a `tokenizer.json`
  built with the `tokenizers` library plus `tokenizer_config.json` (special tokens, chat template), so transformers'
  `AutoTokenizer` and `llm.tokenizer.Tokenizer` read it; writing goes the other way from `tokenizer.json` or a
  sentencepiece `tokenizer.model` (`gguf.vocab`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from llm.errors import UserError
from llm.config import ModelArgs, RopeScaling
from llm.hf_format import load_state_dict, read_config, save_model
from llm.model import Transformer

# Llama-3's pre-tokenizer split (llama.cpp's "llama-bpe"); GPT-2's is built into tokenizers' ByteLevel(use_regex=True)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE_TOKENIZERS = ("gpt-2", "smollm", "llama-bpe")  # llama.cpp's `tokenizer.ggml.pre` names we can express


# ----------------------------------------------------------------------------------------------- weights
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rows (head, [first half | second half], in) -> llama.cpp rows (head, interleaved pairs, in)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `_permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _name_map(args: ModelArgs) -> dict[str, str]:
    """Our (= HF) parameter names -> GGUF tensor names."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, args.n_layers)
    with torch.device("meta"):
        keys = Transformer(args).state_dict().keys()
    out = {}
    for k in keys:
        if args.tie_word_embeddings and k == "lm_head.weight":
            continue
        out[k] = tmap.get_name(k, try_suffixes=(".weight", ".bias"))
    return out


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    # float32 metadata back to the decimal it was written from (9.999999747378752e-06 -> 1e-05)
    return float(str(np.float32(v))) if isinstance(v, float) else v


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - bad magic, truncated file, unknown version: all "not a usable GGUF"
        raise UserError(f"{path}: not a readable GGUF file ({e}); pass a llama.cpp .gguf model") from None


def read_gguf(path: str | os.PathLike) -> tuple[ModelArgs, dict[str, torch.Tensor], "GGUFTokenizer"]:
    """(ModelArgs, float32 HF state dict, tokenizer) of a llama-architecture GGUF file."""
    import gguf

    path = Path(path)
    r = _open(path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF models can be converted")
    tensors = {t.name: t for t in r.tensors}

    def hp(key, default=None):
        value = _field(r, f"llama.{key}", default)
        if value is None:
            raise UserError(f"{path}: metadata key llama.{key} is missing")
        return value

    n_heads = int(hp("attention.head_count"))
    dim = int(hp("embedding_length"))
    tokenizer = GGUFTokenizer.from_reader(r, path)
    scaling = None
    kind = _field(r, "llama.rope.scaling.type", "none")
    if kind in ("linear", "yarn"):
        scaling = RopeScaling(kind, float(hp("rope.scaling.factor")),
                              _field(r, "llama.rope.scaling.original_context_length"))
        if kind == "yarn":
            scaling.beta_fast = float(_field(r, "llama.rope.scaling.yarn_beta_fast", 32.0))
            scaling.beta_slow = float(_field(r, "llama.rope.scaling.yarn_beta_slow", 1.0))
            scaling.attention_factor = _field(r, "llama.rope.scaling.yarn_attn_factor")
    elif kind != "none":
        raise UserError(f"{path}: llama.rope.scaling.type {kind!r} is not supported (none, linear or yarn)")
    args = ModelArgs(
        dim=dim, n_layers=int(hp("block_count")), n_heads=n_heads,
        n_kv_heads=int(_field(r, "llama.attention.head_count_kv", n_heads)),
        vocab_size=int(_field(r, "llama.vocab_size", len(tokenizer.tokens))),
        hidden_dim=int(hp("feed_forward_length")),
        head_dim=int(_field(r, "llama.attention.key_length", _field(r, "llama.rope.dimension_count", dim // n_heads))),
        norm_eps=float(hp("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(r, "llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling, max_seq_len=int(hp("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
    )
    names = _name_map(args)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    unknown = sorted(set(tensors) - set(names.values()))
    if unknown:
        raise UserError(f"{path}: tensor(s) {unknown[:3]} have no Llama counterpart; this GGUF is not a plain "
                        "LLaMA model (llama3-style rope_freqs and other extras are not supported)")
    sd = {}
    for hf_name, gguf_name in names.items():
        t = tensors.get(gguf_name)
        if t is None:
            raise UserError(f"{path}: tensor {gguf_name} ({hf_name}) is missing")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise UserError(f"{path}: tensor {gguf_name}: {e}; re-quantize the file or convert from F16") from None
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))  # ggml lists dims fastest first
        if w.shape != shapes[hf_name]:
            raise UserError(f"{path}: tensor {gguf_name} has shape {w.shape}, the metadata implies {shapes[hf_name]}")
        if hf_name.endswith("q_proj.weight"):
            w = _unpermute(w, args.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = _unpermute(w, args.n_kv_heads)
        sd[hf_name] = torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: F32 tensors are read-only memmaps
    return args, sd, tokenizer


def gguf_to_hf(src: str | os.PathLike, dst: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> Path:
    """Write the HF Llama directory `dst` (atomically) from the GGUF file `src`. Quantized tensors are dequantized
    to float32 (default: keep float32, the exact values; `dtype` e.g. torch.bfloat16 halves the size)."""
    args, sd, tokenizer = read_gguf(src)
    with torch.device("meta"):
        shell = Transformer(args)  # save_model wants the args; the tensors come from `sd`
    return save_model(shell, dst, tokenizer=tokenizer, dtype=dtype, state_dict=sd)


# ----------------------------------------------------------------------------------------------- tokenizer
class GGUFTokenizer:
    """The vocabulary of a GGUF file, written out as HF tokenizer files by `save_pretrained` (called by save_model):
    a GPT-2 byte-level BPE ("gpt2") as tokenizer.json, a sentencepiece BPE ("llama") as tokenizer.model (plus the
    tokenizer.json that llm.tokenizer.Tokenizer derives from it)."""

    def __init__(self, meta: dict, path: Path, model_max_length: int):
        self.meta, self.path, self.model_max_length = meta, path, model_max_length  # meta: "tokenizer.*" keys
        self.kind = meta.get("tokenizer.ggml.model")
        if self.kind not in ("gpt2", "llama"):
            raise UserError(f"{path}: tokenizer.ggml.model is {self.kind!r}; only GPT-2 byte-level BPE ('gpt2', e.g. "
                            "SmolLM2) and sentencepiece BPE ('llama') vocabularies can be converted")
        self.pre = meta.get("tokenizer.ggml.pre", "gpt-2")
        if self.kind == "gpt2" and self.pre not in BPE_PRE_TOKENIZERS:
            raise UserError(f"{path}: tokenizer.ggml.pre {self.pre!r} is not supported "
                            f"({', '.join(BPE_PRE_TOKENIZERS)})")
        self.tokens = meta["tokenizer.ggml.tokens"]
        self.token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(self.tokens)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (meta.get(f"tokenizer.ggml.{k}_token_id")
                                                              for k in ("bos", "eos", "padding", "unknown"))
        im_end = self.tokens.index("<|im_end|>") if "<|im_end|>" in self.tokens else None
        self.stop_ids = sorted({i for i in (self.eos_id, im_end) if i is not None})

    @classmethod
    def from_reader(cls, r, path: Path) -> "GGUFTokenizer":
        if "tokenizer.ggml.tokens" not in r.fields:
            raise UserError(f"{path}: no tokenizer.ggml.tokens; the GGUF carries no vocabulary to convert")
        meta = {k: _field(r, k) for k in r.fields if k.startswith("tokenizer.")}
        return cls(meta, path, int(_field(r, "llama.context_length", 2048)))

    def backend(self):
        """The `tokenizers.Tokenizer` of a "gpt2" vocabulary: byte-level BPE with the pre-tokenizer that llama.cpp's
        `pre` name stands for."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

        vocab = {t: i for i, t in enumerate(self.tokens)}
        merges = [tuple(m.split(" ", 1)) for m in self.meta.get("tokenizer.ggml.merges", [])]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=self.pre != "llama-bpe")
        if self.pre == "smollm":  # llama.cpp: split every digit first ("\p{N}"), then GPT-2's regex
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif self.pre == "llama-bpe":
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        post = processors.ByteLevel(trim_offsets=False)
        if self.meta.get("tokenizer.ggml.add_bos_token") and self.bos_id is not None:
            bos = self.tokens[self.bos_id]
            post = processors.Sequence([post, processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)])])
        tok.post_processor = post
        # CONTROL (3) tokens are special and matched whole; USER_DEFINED (4) are matched whole but decoded
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(self.tokens, self.token_types) if ty == 3])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(self.tokens, self.token_types) if ty == 4])
        return tok

    def sentencepiece_proto(self) -> bytes:
        """The sentencepiece model of a "llama" vocabulary: pieces, scores and types (the numbering of GGUF's token
        types is sentencepiece's), BPE, and the normalizer flags llama.cpp keeps."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        m = pb.ModelProto()
        scores = self.meta.get("tokenizer.ggml.scores") or [0.0] * len(self.tokens)
        for t, score, ty in zip(self.tokens, scores, self.token_types):
            m.pieces.add(piece=t, score=score, type=ty)
        ts, ns = m.trainer_spec, m.normalizer_spec
        ts.model_type, ts.vocab_size, ts.byte_fallback = pb.TrainerSpec.BPE, len(self.tokens), 6 in self.token_types
        for field, i in (("unk_id", self.unk_id), ("bos_id", self.bos_id), ("eos_id", self.eos_id),
                         ("pad_id", self.pad_id)):
            setattr(ts, field, -1 if i is None else i)
        charsmap = self.meta.get("tokenizer.ggml.precompiled_charsmap")
        ns.name = "user_defined" if charsmap else "identity"
        if charsmap:
            ns.precompiled_charsmap = bytes(np.asarray(charsmap, dtype=np.uint8))
        ns.add_dummy_prefix = bool(self.meta.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's default
        ns.remove_extra_whitespaces = bool(self.meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
        ns.escape_whitespaces = True
        return m.SerializeToString()

    def save_pretrained(self, directory: str | os.PathLike):
        directory = Path(directory)
        template = self.meta.get("tokenizer.chat_template")
        if self.kind == "llama":
            from llm.tokenizer import Tokenizer

            (directory / "tokenizer.model").write_bytes(self.sentencepiece_proto())
            Tokenizer.from_file(directory / "tokenizer.model").save_pretrained(directory)
            if template:  # the GGUF's template wins over Tokenizer's default ChatML one
                cfg_file = directory / "tokenizer_config.json"
                cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "chat_template": template},
                                               indent=2, ensure_ascii=False) + "\n")
            return
        self.backend().save(str(directory / "tokenizer.json"))
        name = lambda i: self.tokens[i] if i is not None else None  # noqa: E731
        special = {"bos_token": name(self.bos_id), "eos_token": name(self.eos_id), "unk_token": name(self.unk_id),
                   "pad_token": name(self.pad_id)}
        special = {k: v for k, v in special.items() if v is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                  "add_bos_token": bool(self.meta.get("tokenizer.ggml.add_bos_token", False)),
                  "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "model_max_length": self.model_max_length}
        if template:
            config["chat_template"] = template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def _bpe_pre_name(pre: Optional[dict], source: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer that `GGUFTokenizer.backend` rebuilds."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    raise UserError(f"{source}: pre_tokenizer {kinds} has no llama.cpp equivalent we know "
                    f"({', '.join(BPE_PRE_TOKENIZERS)})")


def _add_vocab(writer, src: Path, vocab_size: int):
    """Tokenizer metadata as llama.cpp's converter writes it: tokens, scores/merges, token types, special ids."""
    import gguf
    from gguf.vocab import SpecialVocab

    if (src / "tokenizer.model").is_file():
        from sentencepiece import sentencepiece_model_pb2 as pb

        m = pb.ModelProto()
        m.ParseFromString((src / "tokenizer.model").read_bytes())
        if m.trainer_spec.model_type != pb.TrainerSpec.BPE:
            kind = pb.TrainerSpec.ModelType.Name(m.trainer_spec.model_type)
            raise UserError(f"{src / 'tokenizer.model'}: a sentencepiece {kind} model; llama.cpp's 'llama' "
                            "vocabulary is sentencepiece BPE")
        tokens, scores, types = zip(*((p.piece, p.score, p.type) for p in m.pieces))  # GGUF types = sp types
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(list(scores))
        writer.add_add_space_prefix(m.normalizer_spec.add_dummy_prefix)
        writer.add_remove_extra_whitespaces(m.normalizer_spec.remove_extra_whitespaces)
        if m.normalizer_spec.precompiled_charsmap:
            writer.add_precompiled_charsmap(m.normalizer_spec.precompiled_charsmap)
        merges = False
    elif (src / "tokenizer.json").is_file():
        tj = json.loads((src / "tokenizer.json").read_text())
        if tj["model"]["type"] != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
            raise UserError(f"{src / 'tokenizer.json'}: only byte-level BPE tokenizer.json files can go into GGUF "
                            "(or provide a sentencepiece tokenizer.model)")
        pieces = {i: (t, gguf.TokenType.NORMAL) for t, i in tj["model"]["vocab"].items()}
        for a in tj.get("added_tokens", []):
            pieces[a["id"]] = (a["content"], gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED)
        tokens, types = zip(*(pieces[i] for i in sorted(pieces)))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_bpe_pre_name(tj.get("pre_tokenizer"), src / "tokenizer.json"))
        merges = True
    else:
        raise UserError(f"{src}: no tokenizer.model or tokenizer.json; llama.cpp needs the vocabulary in the GGUF")
    if len(tokens) != vocab_size:
        raise UserError(f"{src}: the tokenizer has {len(tokens)} tokens but config.json says vocab_size={vocab_size}")
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(types))
    SpecialVocab(src, load_merges=merges, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def hf_to_gguf(src: str | os.PathLike, dst: str | os.PathLike, dtype: Literal["f16", "f32"] = "f16") -> Path:
    """Write the HF Llama directory `src` as the GGUF file `dst` (atomically): 2-D weights in `dtype`, norms in f32."""
    import gguf

    src, dst = Path(src), Path(dst)
    args, cfg = read_config(src)
    if cfg.get("quantization_config"):
        raise UserError(f"{src / 'config.json'}: quantization_config is set; convert the unquantized model instead")
    if dtype not in ("f16", "f32"):
        raise UserError(f"dtype {dtype!r}: choose f16 or f32")
    sd = load_state_dict(src, torch.float32)
    names = _name_map(args)
    if args.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if set(sd) != set(names):
        raise UserError(f"{src}: tensors {sorted(set(sd) ^ set(names))[:3]} do not match config.json")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(src.resolve().name)
        w.add_context_length(args.max_seq_len)
        w.add_embedding_length(args.dim)
        w.add_block_count(args.n_layers)
        w.add_feed_forward_length(args.hidden_dim)
        w.add_head_count(args.n_heads)
        w.add_head_count_kv(args.n_kv_heads)
        w.add_rope_dimension_count(args.head_dim)
        if args.head_dim != args.dim // args.n_heads:
            w.add_key_length(args.head_dim)
            w.add_value_length(args.head_dim)
        w.add_layer_norm_rms_eps(args.norm_eps)
        w.add_rope_freq_base(args.rope_theta)
        w.add_vocab_size(args.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        s = args.rope_scaling
        # llama.cpp has no dynamic NTK: within max_seq_len (the context length written) it is plain RoPE anyway
        if s is not None and s.rope_type in ("linear", "yarn"):
            w.add_rope_scaling_type(gguf.RopeScalingType(s.rope_type))  # "linear" / "yarn"
            w.add_rope_scaling_factor(s.factor)
            if s.rope_type == "yarn":
                w.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings or args.max_seq_len)
                w.add_rope_scaling_yarn_beta_fast(s.beta_fast)
                w.add_rope_scaling_yarn_beta_slow(s.beta_slow)
                if s.attention_factor is not None:
                    w.add_rope_scaling_yarn_attn_factor(s.attention_factor)
        _add_vocab(w, src, args.vocab_size)
        for hf_name, gguf_name in names.items():
            t = sd[hf_name].numpy()
            if hf_name.endswith("q_proj.weight"):
                t = _permute(t, args.n_heads)
            elif hf_name.endswith("k_proj.weight"):
                t = _permute(t, args.n_kv_heads)
            # llama.cpp keeps 1-D tensors (norms) in f32
            half = dtype == "f16" and t.ndim > 1
            w.add_tensor(gguf_name, np.ascontiguousarray(t, dtype=np.float16 if half else np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
        w.close()
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst

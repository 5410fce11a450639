"""Weight-only quantization of our Hugging Face Llama directories: GPTQ and round-to-nearest, through GPTQModel.

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
arXiv 2210.17323) quantizes each Linear of a decoder layer column by column and spreads every rounding error over
the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs on calibration text. RTN rounds
each weight to the nearest point of the same grid: the baseline GPTQ is measured against. GPTQModel (the maintained
successor of AutoGPTQ) does the work on CPU or GPU; both methods write the GPTQ checkpoint format that transformers
(with optimum), vLLM and GPTQModel load, and our `llm.hf_format.load_model` reads (llm/gptq_format.py).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llm.errors import UserError
from llm.config import ModelArgs
from llm import writer
from llm.gptq_format import SUPPORTED_BITS
from llm.hf_format import TRAINING_DATA_FILE, read_config, recorded_training_data

# the tokenizer files of a model directory (sentencepiece and HF), chat template included
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt")


# ----------------------------------------------------------------------------------------------- checks
def linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each Linear of a decoder layer: what GPTQ quantizes (embeddings and lm_head
    stay in floating point)."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return {"self_attn.q_proj": (args.dim, q), "self_attn.k_proj": (args.dim, kv), "self_attn.v_proj": (args.dim, kv),
            "self_attn.o_proj": (q, args.dim), "mlp.gate_proj": (args.dim, args.hidden_dim),
            "mlp.up_proj": (args.dim, args.hidden_dim), "mlp.down_proj": (args.hidden_dim, args.dim)}


def fitting_group_size(args: ModelArgs, at_most: int = 128) -> int:
    """The largest power of two <= at_most that divides every Linear's in_features (kernels want powers of two), or
    -1 (one group per output row) when that would be below 16."""
    common = math.gcd(*(fin for fin, _ in linear_shapes(args).values()))
    size = 1
    while size * 2 <= at_most and common % (size * 2) == 0:
        size *= 2
    return size if size >= 16 else -1


def check_shapes(args: ModelArgs, bits: int, group_size: int, where: str):
    """Raise UserError unless every Linear can be packed at `bits` with groups of `group_size` input features.

    The CPU int4 kernel that transformers picks for the result (GPTQModel's TorchAtenLinear) needs whole groups: a
    checkpoint quantized with a group size that does not divide in_features is written, but does not load."""
    if bits not in SUPPORTED_BITS:
        raise UserError(f"--bits {bits}: not supported — use one of {', '.join(map(str, SUPPORTED_BITS))} "
                        "(the GPTQ format packs 2/3/4/8-bit codes into int32 words)")
    if group_size != -1 and group_size < 1:
        raise UserError(f"--group_size {group_size}: must be a positive number of input features, or -1 for one "
                        "group per output row")
    shapes = linear_shapes(args)
    ins = sorted({fin for fin, _ in shapes.values()})
    if group_size != -1 and any(fin % group_size for fin in ins):
        name, (fin, _) = next((n, s) for n, s in shapes.items() if s[0] % group_size)
        raise UserError(f"{where}: --group_size {group_size} does not divide the in-features of {name} ({fin}; the "
                        f"Linears' in-features are {', '.join(map(str, ins))}) — use --group_size "
                        f"{fitting_group_size(args, group_size)}")
    align = 32 // math.gcd(32, bits)  # codes per whole number of int32 words: 4-bit 8, 3-bit 32, 2-bit 16, 8-bit 4
    for name, (fin, fout) in shapes.items():
        if fin % align or fout % align:
            raise UserError(f"{where}: {name} is {fin} -> {fout} features; {bits}-bit GPTQ packs {align} codes per "
                            f"word group, so both must be multiples of {align} — use --bits 4 or --bits 8")


def check_source(model_dir: str | os.PathLike) -> tuple[ModelArgs, dict]:
    """(ModelArgs, config dict) of a full-precision model directory with a tokenizer, else UserError."""
    args, cfg = read_config(model_dir)
    q = cfg.get("quantization_config")
    if q:
        raise UserError(f"{Path(model_dir) / 'config.json'}: the model is already quantized ({q.get('quant_method')} "
                        f"{q.get('bits')}-bit) — quantize the full-precision model it was made from")
    if not any((Path(model_dir) / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        raise UserError(f"{model_dir}: no tokenizer.model or tokenizer.json — calibration text is tokenized with the "
                        "model's tokenizer; save the model with its tokenizer (save_model(..., tokenizer=...))")
    return args, cfg


# ----------------------------------------------------------------------------------------------- calibration
def is_chat_source(source: str) -> bool:
    """Chats (a jsonl of llm/sft.py's formats, or builtin:chatterbot/idioms/chitchat) rather than plain text or
    token shards."""
    from llm.sft_sources import is_chat_builtin

    return is_chat_builtin(source) or (source.endswith(".jsonl") and Path(source).is_file())


def text_tokens(source: str, tok, split: str, max_tokens: int, vocab_size: Optional[int] = None,
                seed: int = 0) -> tuple[np.ndarray, int]:
    """(token ids, UTF-8 bytes they encode) of `split` of `source` as the model saw it in training: chats rendered
    with the chat template and tokenized as llm/sft.py does (`tokenize_chat`), in an order shuffled by `seed`;
    anything else as `llm.evaluate.corpus_tokens` reads it (text documents joined with eos, or token shards)."""
    if not is_chat_source(source):
        from llm.evaluate import corpus_tokens

        return corpus_tokens(source, tok, split=split, max_tokens=max_tokens, vocab_size=vocab_size)
    from llm.chat import render, tokenize_chat
    from llm.sft_sources import load_chats

    chats = [c for _, c in load_chats(source, split)]
    np.random.default_rng(seed).shuffle(chats)
    ids: list[int] = []
    n_bytes = 0
    for chat in chats:
        ids += tokenize_chat(tok, chat)[0]
        n_bytes += len(render(chat).encode("utf-8"))
        if len(ids) >= max_tokens:
            n_bytes = round(n_bytes * max_tokens / len(ids))
            break
    return np.asarray(ids[:max_tokens], dtype=np.int64), n_bytes


# built-in text per language of a model from elsewhere; their validation splits are never drawn for calibration
LANGUAGE_TEXT = {"en": "builtin:shakespeare", "zh": "builtin:renmin", "en+zh": "builtin:demo"}


def recorded_data(model_dir: str | os.PathLike) -> Optional[str]:
    """The training data `model_dir` records in TRAINING_DATA_FILE, or None (no record, or one naming data that is
    no longer there: then a warning)."""
    spec = recorded_training_data(model_dir, warn=print)
    if spec is not None and not (spec.startswith("builtin:") or Path(spec).exists()):
        print(f"warning: {Path(model_dir) / TRAINING_DATA_FILE}: the training data {spec!r} is not here — "
              "calibrating on built-in text instead (pass --calib to choose)")
        return None
    return spec


def _sample(source: str, n_chars: int = 4000) -> str:
    from llm.corpora import iter_documents

    text = ""
    for doc in iter_documents(source, split="train"):
        text += doc
        if len(text) >= n_chars:
            break
    return text[:n_chars]


def model_language(tok) -> str:
    """"en", "zh" or "en+zh": the languages whose text the tokenizer encodes as a tokenizer trained on it does.
    Chinese needs its characters in the vocabulary (>= 0.8 characters per token on People's Daily; byte-level or
    byte-fallback vocabularies without them give ~0.5, as SmolLM2's does); English needs word pieces (>= 1.8
    characters per token on Shakespeare; single letters give ~1-1.5)."""
    en, zh = _sample(LANGUAGE_TEXT["en"]), _sample(LANGUAGE_TEXT["zh"])
    en_ok = len(en) / max(1, len(tok.encode(en))) >= 1.8
    zh_ok = len(zh) / max(1, len(tok.encode(zh))) >= 0.8
    return "en+zh" if en_ok and zh_ok else "zh" if zh_ok else "en"


def default_calibration(model_dir: str | os.PathLike, tok) -> tuple[str, str]:
    """(calibration source, why): the training data the model records (TRAINING_DATA_FILE), else built-in text in
    the language of its tokenizer (`model_language`)."""
    spec = recorded_data(model_dir)
    if spec is not None:
        return spec, f"the training data recorded in {Path(model_dir) / TRAINING_DATA_FILE}"
    lang = model_language(tok)
    return LANGUAGE_TEXT[lang], f"no {TRAINING_DATA_FILE} in the model directory: built-in text in its language ({lang})"


def calibration_samples(ids: np.ndarray, n_samples: int, seq_len: int, seed: int, where: str) -> list[list[int]]:
    """`n_samples` distinct windows of `seq_len` tokens drawn at random from `ids` (GPTQ's calibration set)."""
    if seq_len < 16:
        raise UserError(f"--seq_len {seq_len}: calibration windows need at least 16 tokens")
    n_windows = len(ids) // seq_len
    if n_windows < n_samples:
        hint = f"--n_samples {n_windows}" if n_windows >= 8 else f"a smaller --seq_len (e.g. {max(16, len(ids) // 16)})"
        raise UserError(f"{where}: {len(ids)} tokens of calibration text make {n_windows} window(s) of --seq_len "
                        f"{seq_len}, fewer than --n_samples {n_samples} — pass longer text, or {hint}")
    picks = np.sort(np.random.default_rng(seed).choice(n_windows, n_samples, replace=False))
    return [ids[i * seq_len:(i + 1) * seq_len].tolist() for i in picks]


# ----------------------------------------------------------------------------------------------- quantize
def quantize(model_dir: str | os.PathLike, out: str | os.PathLike, samples: Optional[list[list[int]]],
             method: Literal["gptq", "rtn"] = "gptq", bits: int = 4, group_size: int = 128, desc_act: bool = False,
             sym: bool = False, damp_percent: float = 0.05, device: str = "cpu", save_dtype=torch.float16,
             overwrite: bool = False) -> Path:
    """Quantize the decoder Linears of `model_dir` with GPTQModel and write the GPTQ directory `out` atomically.

    `samples`: calibration token windows (GPTQ only). Tensors left in floating point (embeddings, norms, lm_head)
    are stored in `save_dtype` (fp16, the activation dtype of GPTQ kernels); tokenizer and generation files are
    copied from `model_dir` byte for byte, so the quantized model tokenizes exactly as the original. `overwrite`
    replaces an earlier GPTQ output of the toolkit at `out` (never anything else)."""
    model_dir, out = Path(model_dir), Path(out)
    if device == "cpu":  # GPTQModel's CPU default is half the cores; one worker per core is fastest here
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    from gptqmodel import GPTQModel, QuantizeConfig

    qkw = dict(bits=bits, group_size=group_size, sym=sym, device=device)
    if method == "rtn":
        qkw["weight_only"] = {"method": "rtn"}
    else:
        qkw.update(desc_act=desc_act, damp_percent=damp_percent)
    writer.check_dir(out, "gptq", [model_dir], overwrite)  # before the work
    # GPTQModel parks finished layers on disk; our own temp dir, so that an interrupted run leaves nothing behind
    qkw["offload_to_disk_path"] = offload = tempfile.mkdtemp(prefix="gptq-offload-")
    try:
        with writer.write_dir(out, "gptq", [model_dir], overwrite) as tmp:
            # fp32 on CPU: GPTQModel would pick bf16 there, which costs accuracy in the Hessian's inputs
            model = GPTQModel.load(str(model_dir), QuantizeConfig(**qkw),
                                   **({"dtype": torch.float32} if device == "cpu" else {}))
            calib = None if method == "rtn" else [{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples]
            model.quantize(calib, batch_size=1)
            model.save(str(tmp))
            _finish_dir(model_dir, tmp, save_dtype)
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    return out


def _finish_dir(src: Path, dst: Path, dtype: torch.dtype):
    """Cast the floating-point tensors GPTQModel left in the load dtype to `dtype` and replace its tokenizer files
    (it re-saves them through transformers, which may change them) with the source's; generation settings and the
    training data record are copied too."""
    for f in dst.glob("*.safetensors"):
        sd = load_file(str(f))
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, str(f),
                  metadata={"format": "pt"})
    cfg_file = dst / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = str(dtype).removeprefix("torch.")
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    for name in TOKENIZER_FILES:
        (dst / name).unlink(missing_ok=True)
    for name in (*TOKENIZER_FILES, "generation_config.json", TRAINING_DATA_FILE):  # not eval/sample reports
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def dir_size(path: str | os.PathLike) -> int:
    """Bytes of all files in a model directory."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------- report
def newest_run_model(runs: str = "runs") -> Path:
    """The most recently written `runs/*/final` model directory."""
    found = sorted((p for p in Path(runs).glob("*/final") if (p / "config.json").is_file()),
                   key=lambda p: (p / "config.json").stat().st_mtime)
    if not found:
        raise UserError(f"no --model given and no {runs}/*/final model directory — train one first (`bash run.sh`, "
                        "or `deepspeed llm/pretrain.py --config configs/pretrain/cpu-demo.yaml`), or pass --model DIR")
    return found[-1]


def quality(model_dir: Path, ids, n_bytes: int, ctx_len: int, device: str) -> dict:
    """Perplexity and bits per byte of the model in `model_dir` on `ids`: windows of ctx_len tokens advancing by
    half of that, so every token is scored once with at least ctx_len/2 tokens of context."""
    from llm.evaluate import perplexity
    from llm.hf_format import load_model

    model = load_model(model_dir, dtype=torch.float32, device=device)
    r = perplexity(model, ids, ctx_len=ctx_len, stride=ctx_len // 2, batch_size=4, progress=True)
    return {"ppl": r["ppl"], "bpb": r["nll"] / math.log(2) / n_bytes, "tokens": r["tokens"]}


def print_table(r: dict):
    mb = {k: v / 1e6 for k, v in r["size_bytes"].items()}
    flags = ("" if r["sym"] else " asym") + (" act" if r["desc_act"] else "")
    name = f"{r['method']} w{r['bits']} g{r['group_size']}{flags}"
    rows = [("size on disk (MB)", f"{mb['original']:.1f}", f"{mb['quantized']:.1f}",
             f"{mb['quantized'] / mb['original'] - 1:+.1%}")]
    if "quantized" in r:
        rows += [(label, f"{r['original'][k]:{fmt}}", f"{r['quantized'][k]:{fmt}}", f"{r['change'][k]:+.2%}")
                 for label, k, fmt in (("perplexity", "ppl", ".3f"), ("bits per byte", "bpb", ".4f"))]
    rows.append(("quantize time (s)", "", f"{r['quantize_seconds']:.1f}", ""))
    print(f"\n{r['out']}  ({name}; held-out: {r['eval_data']})")
    w = len(name) + 4
    print(f"{'':20}{'original':>12}{name:>{w}}{'change':>10}")
    for label, a, b, c in rows:
        print(f"{label:20}{a:>12}{b:>{w}}{c:>10}")

"""Checkpoints as Hugging Face Llama directories: config.json + (sharded) model.safetensors + tokenizer files.

`load_model` builds a `Transformer` from any such directory (ours, transformers', converted from GGUF, merged
LoRA); `save_model` writes one that `transformers.AutoModelForCausalLM.from_pretrained` loads. Writes go through
`llm.writer`: a temporary directory renamed into place at the end, replacing only the toolkit's own model dirs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llm import writer
from llm.errors import UserError
from llm.config import ModelArgs
from llm.model import Transformer

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old transformers checkpoints carry this buffer
# What a trained model directory records about its training data, `{"data": SPEC}` (SPEC: the training command's
# `--data`, paths absolute): written by the language-modelling tasks, read by quantization to calibrate on it and by
# SFT to replay it.
TRAINING_DATA_FILE = "training_data.json"


def recorded_training_data(model_dir: str | os.PathLike, warn=None) -> Optional[str]:
    """The data `model_dir` records it was trained on (TRAINING_DATA_FILE), or None: no record, or an unreadable one
    (then `warn`ed about when given)."""
    f = Path(model_dir) / TRAINING_DATA_FILE
    try:
        spec = json.loads(f.read_text())["data"]
        if not isinstance(spec, str):
            raise TypeError(f"'data' is {type(spec).__name__}, not a string")
        return spec
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        if warn is not None:
            warn(f"warning: {f}: unreadable ({e!r}) — ignored")
        return None


def read_config(path: str | os.PathLike) -> tuple[ModelArgs, dict]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise UserError(f"{path}: no such model directory")
    if not cfg_file.is_file():
        raise UserError(f"{path}: no config.json — not a Hugging Face model directory "
                        "(pretraining writes one to runs/<run>/final; GGUF files go through tools/convert.py from_gguf)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file}:{e.lineno}: invalid JSON ({e.msg})") from None
    try:
        return ModelArgs.from_hf_config(cfg, str(cfg_file)), cfg
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    if list(path.glob("*.bin")):
        raise UserError(f"{path}: only PyTorch .bin weights found; re-save them as safetensors "
                        "(transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise UserError(f"{path}: no model.safetensors (or index) in the model directory")


def load_state_dict(path: str | os.PathLike, dtype: Optional[torch.dtype] = None, device="cpu") -> dict[str, torch.Tensor]:
    sd = {}
    for f in weight_files(Path(path)):
        if not f.is_file():
            raise UserError(f"{f}: listed in model.safetensors.index.json but missing")
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as fh:
                for k in fh.keys():
                    if k.endswith(IGNORED_SUFFIXES):
                        continue
                    t = fh.get_tensor(k)
                    sd[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for truncated/corrupt files
            raise UserError(f"{f}: cannot read safetensors file ({e}); the file is truncated or corrupt") from None
    return sd


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" = the GPU when torch can use one, else the CPU; "cuda" without a usable GPU is one clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device — use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch sees no usable GPU here (a CPU-only torch, or no driver) — use "
                        "--device cpu (or auto)")
    return device


def materialize(model: Transformer, device="cpu") -> Transformer:
    """Finish a Transformer built on the meta device whose tensors were then assigned (`load_state_dict(...,
    assign=True)`, also inside a peft or classifier wrapper): re-tie lm_head to the embeddings, build the RoPE
    tables on `device`."""
    if model.args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope(torch.device(device))
    return model


def build_model(args: ModelArgs, state_dict: dict[str, torch.Tensor], device="cpu", where: str = "the weights") \
        -> Transformer:
    """The one way to make a `Transformer` from `args` and a state dict: names and shapes checked (one UserError
    naming `where`), tensors assigned without a copy, lm_head tied when the config says so."""
    sd = dict(state_dict)
    with torch.device("meta"):
        model = Transformer(args)
    expected = dict(model.state_dict())
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        sd.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
        raise UserError(f"{where}: weights do not match config.json ({'; '.join(parts)}); "
                        "is config.json from a different model?")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise UserError(f"{where}: tensor {k} has shape {tuple(sd[k].shape)} but config.json implies "
                            f"{tuple(t.shape)}; config.json and the weights disagree")
    model.load_state_dict(sd, strict=False, assign=True)
    return materialize(model, device)


def load_model(path: str | os.PathLike, dtype: Optional[torch.dtype] = torch.float32, device="cpu") -> Transformer:
    """A `Transformer` with the weights of the Hugging Face Llama directory `path` (GPTQ weights dequantized to
    `dtype`, llm.gptq_format). device: cpu, cuda[:N] or auto (`resolve_device`)."""
    device = resolve_device(device)
    args, cfg = read_config(path)
    if cfg.get("quantization_config"):
        from llm.gptq_format import dequantized_state_dict

        sd = dequantized_state_dict(load_state_dict(path, device=device), cfg["quantization_config"], path, dtype)
    else:
        sd = load_state_dict(path, dtype, device)
    return build_model(args, sd, device, str(path)).eval()


def load_tokenizer(path: str | os.PathLike, required: bool = False):
    """The tokenizer saved in a model directory (tokenizer.model or tokenizer.json): None when there is none, or
    with `required` a UserError saying so."""
    from llm.tokenizer import Tokenizer

    d = Path(path)
    if required or (d / "tokenizer.model").is_file() or (d / "tokenizer.json").is_file():
        return Tokenizer.from_dir(d)
    return None


def save_model(model: Transformer, path: str | os.PathLike, tokenizer=None, dtype: Optional[torch.dtype] = None,
               state_dict: Optional[dict[str, torch.Tensor]] = None, extra_config: Optional[dict] = None,
               overwrite: bool = True, inputs: tuple = (), extra_files: Optional[dict[str, str]] = None) -> Path:
    """Write `model` as a Hugging Face Llama directory at `path` (atomically, by `llm.writer`).

    `extra_files` ({name: text}) are written beside them. `state_dict` overrides the model's tensors (e.g. weights consolidated from a ZeRO-3 checkpoint); `tokenizer`
    (llm.tokenizer.Tokenizer) writes its files next to the weights. An existing `path` is replaced only if it is
    a model directory of the toolkit and `overwrite`, and never if it is or holds one of `inputs`.
    """
    path = Path(path)
    writer.check_dir(path, "model", inputs, overwrite, flag="--dst")
    args = model.args
    sd = state_dict if state_dict is not None else model.state_dict()
    out = {}
    for k, t in sd.items():
        if args.tie_word_embeddings and k == "lm_head.weight":
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t.contiguous().cpu()
    with writer.write_dir(path, "model", inputs, overwrite, flag="--dst") as tmp:
        cfg = args.to_hf_config()
        some = next(iter(out.values()))
        cfg["torch_dtype"] = str(some.dtype).removeprefix("torch.")
        cfg.update(extra_config or {})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        gen = {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id, "pad_token_id": args.pad_token_id}
        if tokenizer is not None and getattr(tokenizer, "stop_ids", None):
            gen["eos_token_id"] = sorted(set([args.eos_token_id, *tokenizer.stop_ids]))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():  # e.g. TRAINING_DATA_FILE
            (tmp / name).write_text(text, encoding="utf-8")
    return path


def from_deepspeed(checkpoint_dir: str | os.PathLike, dst: str | os.PathLike, dtype: Optional[str] = None,
                   tokenizer=None) -> Path:
    """A DeepSpeed checkpoint of the trainer (step_N dir, checkpoints/ or run dir) -> a Hugging Face Llama
    directory. fp32 weights come from DeepSpeed's own consolidation (zero_to_fp32; ZeRO-0 checkpoints hold the
    whole module), are cast to `dtype` (fp32/bf16/fp16; default the training's save dtype) and saved with the
    tokenizer the run used."""
    from llm.tokenizer import Tokenizer
    from llm.train import DTYPES
    from llm.train.checkpoint import STATE_FILE, consolidated_state_dict, find_checkpoint

    tag_dir = find_checkpoint(checkpoint_dir)
    if tag_dir is None:
        raise UserError(f"{checkpoint_dir}: no DeepSpeed checkpoint (step_N directory) found")
    meta = json.loads((tag_dir / STATE_FILE).read_text())
    if meta.get("model_config") is None:
        raise UserError(f"{tag_dir}: the checkpoint records no model config (not a Transformer run)")
    args = ModelArgs.from_hf_config(meta["model_config"])
    sd = consolidated_state_dict(tag_dir, meta["zero_stage"])
    if tokenizer is None and meta.get("tokenizer") and Path(meta["tokenizer"]).is_file():
        tokenizer = Tokenizer.from_file(meta["tokenizer"])
    with torch.device("meta"):
        shell = Transformer(args)  # only its args are used: the tensors come from `sd`
    return save_model(shell, dst, tokenizer=tokenizer, dtype=DTYPES[dtype or meta["save_dtype"]], state_dict=sd)

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
from llm.cli import UserError
from llm.config import ModelArgs
from llm.model import Transformer

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old transformers checkpoints carry this buffer


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


def _weight_files(path: Path) -> list[Path]:
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
    for f in _weight_files(Path(path)):
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


def load_model(path: str | os.PathLike, dtype: Optional[torch.dtype] = torch.float32, device="cpu",
               args: Optional[ModelArgs] = None, state_dict: Optional[dict[str, torch.Tensor]] = None) -> Transformer:
    """A `Transformer` with the weights of the Hugging Face Llama directory `path` (or `state_dict`, checked
    against its config.json: llm.quant.load_quantized passes the dequantized weights of a GPTQ directory).
    device: cpu, cuda[:N] or auto (`resolve_device`)."""
    device = resolve_device(device)
    path = Path(path)
    model_args, cfg = read_config(path)
    if cfg.get("quantization_config") and state_dict is None:
        from llm.quant import load_quantized  # dequantizes GPTQ weights into our model
        return load_quantized(path, dtype=dtype, device=device)
    args = args or model_args
    sd = dict(state_dict) if state_dict is not None else load_state_dict(path, dtype, device)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v for k, v in model.state_dict().items()}
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
        raise UserError(f"{path}: weights do not match config.json ({'; '.join(parts)}); "
                        "is config.json from a different model?")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise UserError(f"{path}: tensor {k} has shape {tuple(sd[k].shape)} but config.json implies "
                            f"{tuple(t.shape)}; config.json and the weights disagree")
    model.load_state_dict(sd, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope(torch.device(device))
    return model.eval()


def save_model(model: Transformer, path: str | os.PathLike, tokenizer=None, dtype: Optional[torch.dtype] = None,
               state_dict: Optional[dict[str, torch.Tensor]] = None, extra_config: Optional[dict] = None,
               overwrite: bool = True, inputs: tuple = ()) -> Path:
    """Write `model` as a Hugging Face Llama directory at `path` (atomically, by `llm.writer`).

    `state_dict` overrides the model's tensors (e.g. weights consolidated from a ZeRO-3 checkpoint); `tokenizer`
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
    return path

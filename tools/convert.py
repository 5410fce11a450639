"""Checkpoint conversion: GGUF (llama.cpp) <-> Hugging Face Llama directory.

    python tools/convert.py from_gguf --src model.gguf --dst DIR      # dequantize, un-permute Q/K, tokenizer.json
    python tools/convert.py to_gguf --src DIR --dst model.gguf [--dtype f32]

The work is done in `llm.gguf` (after llama.cpp's convert_hf_to_gguf.py); errors the user can cause print one line.
An existing --dst is replaced only with --overwrite true, and only if it is this toolkit's output of the same kind
(a model directory it made, a GGUF file); never a folder it did not make, a run directory, or a path holding an
input (`llm.writer`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from llm import writer
from llm.cli import run_cli
from llm.errors import UserError


def from_gguf(src: str, dst: str, dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
              overwrite: bool = False):
    """Convert a llama-architecture GGUF file into a Hugging Face Llama directory.

    Args:
        src: the .gguf file (any quantization the gguf package can dequantize).
        dst: output directory (written atomically).
        dtype: dtype of the saved weights; default float32, the dequantized values exactly.
        overwrite: replace an existing --dst, only if it is a model directory this toolkit made.
    """
    if Path(src).is_dir():
        raise UserError(f"--src {src}: is a folder — give the .gguf file")
    import torch

    from llm.gguf import gguf_to_hf

    writer.check_dir(dst, "model", [src], overwrite, flag="--dst")
    out = gguf_to_hf(src, dst, dtype=getattr(torch, dtype) if dtype else None)
    print(f"wrote {out}")


def to_gguf(src: str, dst: str, dtype: Literal["f16", "f32"] = "f16", overwrite: bool = False):
    """Convert a Hugging Face Llama directory into a GGUF file llama.cpp can run.

    Args:
        src: the model directory (config.json, safetensors, tokenizer.model or tokenizer.json).
        dst: the .gguf file to write (atomically).
        dtype: f16 (half the size) or f32 for the 2-D weights; norms stay f32.
        overwrite: replace an existing --dst, only if it is a GGUF file.
    """
    from llm.gguf import hf_to_gguf

    with writer.write_file(dst, "gguf", [src], overwrite, flag="--dst") as tmp:
        hf_to_gguf(src, tmp, dtype)
    print(f"wrote {dst}")


def from_deepspeed(src: str, dst: str, dtype: Optional[Literal["fp32", "bf16", "fp16"]] = None,
                   overwrite: bool = False):
    """Consolidate a DeepSpeed checkpoint of llm/pretrain.py or llm/sft.py into a Hugging Face Llama directory.

    Args:
        src: a run directory, its checkpoints/ directory, or one checkpoints/step_N.
        dst: output directory (not the run directory itself).
        dtype: weight dtype; default the training precision.
        overwrite: replace an existing --dst, only if it is a model directory this toolkit made.
    """
    from llm.hf_format import from_deepspeed as ds_to_hf

    writer.check_dir(dst, "model", [src], overwrite, flag="--dst")
    print(f"wrote {ds_to_hf(src, dst, dtype)}")


def merge_lora(base: str, adapter: str, dst: str, dtype: Optional[Literal["fp32", "bf16", "fp16"]] = None,
               overwrite: bool = False):
    """Merge a LoRA adapter into its base model and write a Hugging Face Llama directory.

    Args:
        base: the Hugging Face directory the adapter was trained on.
        adapter: the adapter directory (adapter_config.json + adapter_model.safetensors).
        dst: output directory.
        dtype: weight dtype; default the base model's.
        overwrite: replace an existing --dst, only if it is a model directory this toolkit made.
    """
    if not (Path(adapter) / "adapter_config.json").is_file():  # before the (slow, noisy) peft import
        raise UserError(f"--adapter {adapter}: not a LoRA adapter directory (no adapter_config.json) — pass the "
                        "adapter/ folder of an llm/sft.py --mode lora run")
    writer.check_dir(dst, "model", [base, adapter], overwrite, flag="--dst")
    from llm.tasks.lora import merge_lora as merge

    print(f"wrote {merge(base, adapter, dst, dtype)}")


SUBCOMMANDS = {"from_gguf": from_gguf, "to_gguf": to_gguf, "from_deepspeed": from_deepspeed, "merge_lora": merge_lora}

if __name__ == "__main__":
    run_cli(SUBCOMMANDS)

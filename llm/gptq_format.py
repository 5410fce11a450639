"""Reading GPTQ checkpoints (the format GPTQModel, AutoGPTQ, transformers + optimum and vLLM share) into dense
weights for our `Transformer` (llm.hf_format.load_model), so generation, chat and evaluation take 4-bit models.

Per quantized Linear (in -> out features):

    qweight (in*bits/32, out) int32   `bits`-bit codes q, packed back to back (little end first) along `in`
    qzeros  (groups, out*bits/32)     zero points z, packed the same way along `out`; format "gptq" stores z - 1
    scales  (groups, out) fp16        s
    g_idx   (in,) int32               the group of each input feature (a permutation of groups with desc_act)
    weight[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o]
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from llm.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first `n` `bits`-bit codes stored back to back, least significant bit first, in the int32 words along
    the last dim of `words`: (..., W) -> (..., n) int64. One rule for 2/4/8 bits and for 3, whose codes straddle
    words."""
    shifts = torch.arange(32, device=words.device)
    stream = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 1  # (..., W, 32) bits of each word
    codes = stream.flatten(-2)[..., :n * bits].unflatten(-1, (n, bits))  # (..., n, bits)
    return (codes << torch.arange(bits, device=words.device)).sum(-1)


def dequantize(qweight, qzeros, scales, g_idx, bits: int, zeros_minus_one: bool) -> torch.Tensor:
    """The float32 (out, in) weight of one GPTQ Linear (formula in the module docstring)."""
    n_in, n_out = g_idx.shape[0], scales.shape[1]
    q = unpack(qweight.t(), bits, n_in)  # (out, in)
    z = unpack(qzeros, bits, n_out)  # (groups, out)
    if zeros_minus_one:  # GPTQ v1 format (AutoGPTQ's): zero points stored minus one, modulo 2**bits
        z = (z + 1) & ((1 << bits) - 1)
    g = g_idx.long()
    return (q - z.t()[:, g]).float() * scales.t().float()[:, g]


def dequantized_state_dict(sd: dict[str, torch.Tensor], qcfg: dict, path: str | os.PathLike,
                           dtype: Optional[torch.dtype] = torch.float32) -> dict[str, torch.Tensor]:
    """The GPTQ checkpoint's tensors `sd` (config.json's quantization_config `qcfg`) with every quantized Linear's
    qweight/qzeros/scales/g_idx replaced by its dense `weight`, all floats in `dtype` (float32 if None)."""
    fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
    if qcfg.get("quant_method") != "gptq" or fmt not in ("gptq", "gptq_v2") or qcfg.get("bits") not in SUPPORTED_BITS:
        raise UserError(f"{Path(path) / 'config.json'}: quantization_config {qcfg.get('quant_method')}/{fmt} "
                        f"{qcfg.get('bits')}-bit is not a GPTQ checkpoint this loader reads (gptq or gptq_v2 format, "
                        "2/3/4/8 bits) — load it with transformers instead")
    dtype = dtype or torch.float32
    sd = dict(sd)
    for key in [k for k in sd if k.endswith(".qweight")]:
        p = key.removesuffix(".qweight")
        try:
            parts = [sd.pop(f"{p}.{n}") for n in ("qweight", "qzeros", "scales", "g_idx")]
        except KeyError as e:
            raise UserError(f"{path}: {p} has a qweight but no {e.args[0]} — the checkpoint is incomplete") from None
        sd[f"{p}.weight"] = dequantize(*parts, qcfg["bits"], zeros_minus_one=fmt == "gptq")
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

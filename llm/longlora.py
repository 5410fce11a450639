"""LongLoRA: shifted sparse attention (S²-Attn) for training, RoPE scaling for the longer context, and the
"LoRA+" parameter choice (LoRA adapters plus trainable embeddings and norms).

Follows Chen et al. 2023, "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models"
(arXiv 2309.12307) and its reference code (dvlab-research/LongLoRA, `llama_attn_replace.py`, the flash-attn
path): the sequence is cut into groups of `group_size_ratio * T` tokens (1/4 by default) and each head attends
causally within its group; the second half of the heads uses groups shifted by half a group, so information
flows between neighbouring groups. As in the flash-attn reference (`cu_seqlens` offset by half a group) the
shifted groups do not wrap around, so no token ever sees a later one. Inference uses full attention: the hook is
installed on `Attention.train_attn_fn`, which `llm.model` only calls in training mode.
"""
from __future__ import annotations

import functools
import math
import re

import torch

from llm.errors import UserError
from llm.config import RopeScaling
from llm.model import Transformer, repeat_kv, sdpa


def _causal_runs(q, k, v, group: int, first: int) -> torch.Tensor:
    """Causal attention within runs of tokens [0, first), [first, first + group), [first + group, first + 2*group), ...;
    the last run may be shorter (`first` = 0: no first run).

    q: (B, T, h, D), k/v: (B, T, h_kv, D) -> (B, T, h, D). The whole runs are folded into the batch,
    (B * n, group, h, D), and every run is plain causal attention (`is_causal`, no mask), so any fused kernel
    takes it; they are views of the input when the runs tile it (first = 0, T divisible by group).
    """
    B, T, h, D = q.shape
    n = (T - first) // group
    edges = [0, first, first + n * group, T]

    def attend(a: int, b: int, batch: int) -> torch.Tensor:  # runs of (b - a) / batch tokens, (B, b - a, h, D)
        qs, ks, vs = (x[:, a:b].reshape(B * batch, (b - a) // batch, x.shape[2], D).transpose(1, 2) for x in (q, k, v))
        return sdpa(qs, ks, vs, is_causal=True).transpose(1, 2).reshape(B, b - a, h, D)

    parts = [attend(a, b, n if i == 1 else 1) for i, (a, b) in enumerate(zip(edges, edges[1:])) if b > a]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size_ratio: float = 0.25) -> torch.Tensor:
    """Shifted sparse attention. q: (B, H, T, D), k/v: (B, n_kv, T, D) -> (B, H, T, D).

    Heads [0, H/2) attend causally within groups [0, g), [g, 2g), ...; heads [H/2, H) within groups shifted by
    g/2: [0, g - g/2), [g - g/2, 2g - g/2), ... (the shift's front padding of the reference forms its own block,
    so the first shifted group is just the first g - g/2 tokens). The last group of either half may be shorter.
    With a single group (g >= T) there is nothing to shift across: plain causal attention.
    """
    B, H, T, D = q.shape
    group = max(2, int(T * group_size_ratio))
    if group >= T:
        return sdpa(q, k, v, is_causal=True)
    half, rep = H // 2, H // k.shape[1]
    # The halves split the K/V heads too; where a K/V head serves query heads of both halves (an odd n_kv, as in
    # MQA), each is repeated just enough for the split to fall between K/V heads.
    k, v = repeat_kv(k, v, rep // math.gcd(half, rep))
    kv_half = half * k.shape[1] // H
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, heads, D): views in the model
    plain = _causal_runs(q[:, :, :half], k[:, :, :kv_half], v[:, :, :kv_half], group, first=0)
    shifted = _causal_runs(q[:, :, half:], k[:, :, kv_half:], v[:, :, kv_half:], group, first=group - group // 2)
    return torch.cat([plain, shifted], dim=2).transpose(1, 2)


def enable_s2_attn(model: Transformer, group_size_ratio: float = 0.25) -> None:
    """Use S²-Attn in every layer while the model is in training mode (eval mode keeps full attention)."""
    if not 0 < group_size_ratio <= 1:
        raise UserError(f"--s2_group_ratio {group_size_ratio}: must be in (0, 1] (LongLoRA uses 0.25)")
    fn = functools.partial(s2_attention, group_size_ratio=group_size_ratio)
    for layer in model.model.layers:
        layer.self_attn.train_attn_fn = fn


def disable_s2_attn(model: Transformer) -> None:
    """Back to full attention (S²-Attn is a training-time hook: an exported model must not carry it)."""
    for layer in model.model.layers:
        layer.self_attn.train_attn_fn = None


def extend_context(model: Transformer, factor: float, rope_type: str = "yarn") -> None:
    """Scale RoPE so the model covers `factor` times its trained context; updates args and the cos/sin tables.

    The saved config then carries `rope_scaling` = {rope_type, factor, original_max_position_embeddings} and
    `max_position_embeddings` = the new length, which transformers reads the same way.
    """
    args = model.args
    if factor <= 1:
        raise UserError(f"--context_factor {factor}: must be > 1 to extend the context")
    if args.rope_scaling is not None:
        raise UserError(f"the model already has rope_scaling {args.rope_scaling.to_dict()}; "
                        "extend the original (unscaled) model instead")
    if rope_type not in ("yarn", "linear"):
        raise UserError(f"--rope_type {rope_type!r}: use yarn or linear")
    original = args.max_seq_len
    args.max_seq_len = int(original * factor)
    args.rope_scaling = RopeScaling(rope_type=rope_type, factor=float(factor),
                                    original_max_position_embeddings=original if rope_type == "yarn" else None)
    model.reset_rope()


# Names of the parameters LongLoRA trains besides LoRA ("--trainable_params embed,norm" in the reference code).
_LONGLORA_EXTRA = re.compile(r"(embed_tokens|norm)\.weight$")


def longlora_trainable(name: str) -> bool:
    """True for LoRA adapter weights, the token embedding and every RMSNorm weight."""
    return "lora_" in name or bool(_LONGLORA_EXTRA.search(name))

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
import re

import torch
import torch.nn.functional as F

from llm.cli import UserError
from llm.config import RopeScaling
from llm.model import Transformer


def _grouped_causal(x_q, x_k, x_v, group: int, front: int) -> torch.Tensor:
    """Causal attention within groups of `group` tokens whose boundaries sit at front, front+group, ...

    x_*: (B, h, T, D). The sequence is padded with `front` slots before it and up to a multiple of `group` after
    it, viewed as (B, h, n_groups, group, D) and attended group by group (cost T*group instead of T²).
    Returns (B, h, T, D).
    """
    B, h, T, D = x_q.shape
    n = -(-(T + front) // group)
    back = n * group - T - front

    def fold(x):
        return F.pad(x, (0, 0, front, back)).view(B, h, n, group, D)

    i = torch.arange(group, device=x_q.device)
    causal = i[None, :] <= i[:, None]  # (g, g)
    mask = causal.expand(n, group, group).clone()
    # In the first group the `front` padding slots form their own block: real tokens must not attend to them,
    # and the padding queries attend only among themselves (so no row is empty, which would give NaN).
    pad = i < front
    mask[0] &= ~(pad[:, None] ^ pad[None, :])  # same side of the padding boundary (xor: inductor-friendly)
    y = F.scaled_dot_product_attention(fold(x_q), fold(x_k), fold(x_v), attn_mask=mask)  # (B, h, n, g, D)
    return y.reshape(B, h, n * group, D)[:, :, front:front + T]


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size_ratio: float = 0.25) -> torch.Tensor:
    """Shifted sparse attention. q: (B, H, T, D), k/v: (B, n_kv, T, D) -> (B, H, T, D).

    Heads [0, H/2) attend within groups [0, g), [g, 2g), ...; heads [H/2, H) within groups shifted by g/2:
    [0, g/2), [g/2, 3g/2), ... With a single group (g >= T) there is nothing to shift across: plain causal
    attention.
    """
    B, H, T, D = q.shape
    group = max(2, int(T * group_size_ratio))
    if group >= T:
        return F.scaled_dot_product_attention(q, *_repeat_kv(k, v, H), is_causal=True)
    k, v = _repeat_kv(k, v, H)
    half = H // 2
    plain = _grouped_causal(q[:, :half], k[:, :half], v[:, :half], group, front=0)
    shifted = _grouped_causal(q[:, half:], k[:, half:], v[:, half:], group, front=group // 2)
    return torch.cat([plain, shifted], dim=1)


def _repeat_kv(k, v, n_heads: int):
    rep = n_heads // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def enable_s2_attn(model: Transformer, group_size_ratio: float = 0.25) -> None:
    """Use S²-Attn in every layer while the model is in training mode (eval mode keeps full attention)."""
    if not 0 < group_size_ratio <= 1:
        raise UserError(f"--s2_group_ratio {group_size_ratio}: must be in (0, 1] (LongLoRA uses 0.25)")
    fn = functools.partial(s2_attention, group_size_ratio=group_size_ratio)
    for layer in model.model.layers:
        layer.self_attn.train_attn_fn = fn


def disable_s2_attn(model: Transformer) -> None:
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

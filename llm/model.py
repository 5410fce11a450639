"""The LLaMA-2 decoder in plain PyTorch (after gpt-fast and nanoGPT), with Hugging Face Llama parameter names.

RMSNorm, SwiGLU MLP, grouped-query attention through `scaled_dot_product_attention` (flash-attn's kernels when
it is importable on CUDA, its variable-length one for packed documents), rotary embeddings in the `rotate_half`
layout with linear / dynamic-NTK / YaRN scaling computed exactly as transformers' `modeling_rope_utils` does
(YaRN: Peng et al. 2023, arXiv 2309.00071), and a KV cache written by position. No deepspeed / peft /
transformers import here.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llm.config import ModelArgs

try:  # optional CUDA kernels; SDPA is the default everywhere
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except Exception:  # noqa: BLE001 - any import failure (missing, wrong CUDA) means "not available"
    flash_attn_func = flash_attn_varlen_func = None

# SDPA attends grouped K/V itself since torch 2.5 (enable_gqa): CUDA's flash and memory-efficient kernels and the
# CPU flash kernel take n_kv < H heads. ROCm's memory-efficient kernel does not (a masked call would fall back to the
# math path), nor does torch 2.4: there K/V are repeated to every head.
NATIVE_GQA = torch.version.hip is None and tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


# ----------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(args: ModelArgs, seq_len: Optional[int] = None, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the attention scale for cos/sin, for `args.rope_scaling`.

    `seq_len` matters only for dynamic NTK scaling, whose base grows with the current sequence length.
    """
    dim, base = args.head_dim, args.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base**exponents)
    s = args.rope_scaling
    if s is None:
        return inv_freq, 1.0
    if s.rope_type == "linear":
        return inv_freq / s.factor, 1.0
    if s.rope_type == "dynamic":  # as transformers: the trained length is max_seq_len (original_... is unused)
        seq_len = max(seq_len or 0, args.max_seq_len)
        base = base * ((s.factor * seq_len / args.max_seq_len) - (s.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**exponents), 1.0
    original = s.original_max_position_embeddings or args.max_seq_len
    # YaRN: interpolate low frequencies, keep high ones, ramp in between; scale attention by mscale.
    # The factor as given (transformers 5): Qwen-style configs set original == max_position_embeddings, factor 4.
    factor = s.factor
    attention_factor = s.attention_factor if s.attention_factor is not None else (
        0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(original / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 where the original frequency is kept
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, attention_factor


def rope_tables(args: ModelArgs, seq_len: int, device=None, dynamic_len: Optional[int] = None):
    """cos, sin of shape (seq_len, head_dim), float32, in the rotate_half layout."""
    inv_freq, scale = rope_inv_freq(args, dynamic_len, device)
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
    return emb.cos() * scale, emb.sin() * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos/sin: (B, T, D) or (T, D). Computed in float32, returned in x's dtype."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 (as LLaMA and transformers do), scale in the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Keys/values for incremental decoding, (B, n_kv_heads, max_seq_len, head_dim), written by position."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k/v (B, n_kv, T, D) at slots `input_pos` (T,); return the whole cache. Static shapes (gpt-fast's
        design): slots not written yet are hidden by the causal mask, so no step reads a length off the device."""
        self.k[:, :, input_pos] = k.to(self.k.dtype)
        self.v[:, :, input_pos] = v.to(self.v.dtype)
        return self.k, self.v


AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def repeat_kv(k: torch.Tensor, v: torch.Tensor, rep: int, dim: int = 1):
    """k/v with every head repeated `rep` times along `dim` (head j -> heads j*rep ... j*rep + rep-1)."""
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=dim), v.repeat_interleave(rep, dim=dim)


def sdpa(q, k, v, mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
    """Grouped-query SDPA. q: (B, H, T, D), k/v: (B, n_kv, S, D), mask: bool broadcastable to (B, H, T, S).

    Query head h reads K/V head h // (H / n_kv), passed to the kernel as they are (enable_gqa) where NATIVE_GQA."""
    gqa = k.shape[1] != q.shape[1]
    if gqa and not NATIVE_GQA:
        k, v = repeat_kv(k, v, q.shape[1] // k.shape[1])
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                          **({"enable_gqa": True} if gqa else {}))


def flash_ok(x: torch.Tensor) -> bool:
    """Whether flash-attn's kernels can take activations like x (CUDA, fp16/bf16), given that it is importable."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def attention_kernel(device: torch.device, precision: str) -> str:
    """The attention a training forward takes on `device` in `precision`: flash-attn's when it is importable on
    CUDA in 16-bit (flash_ok), else torch's scaled_dot_product_attention."""
    half = precision in ("bf16", "fp16")
    return "flash-attn" if flash_attn_func is not None and device.type == "cuda" and half else "sdpa"


def document_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) document index per token -> bool (B, 1, T, T): causal within a document, nothing across documents."""
    i = torch.arange(segments.shape[1], device=segments.device)
    return ((segments[:, :, None] == segments[:, None, :]) & (i[None, :] <= i[:, None]))[:, None]


def document_offsets(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) document index per token -> cu_seqlens (n_docs + 1,) int32 for flash-attn's variable-length kernel:
    where each run of equal indices starts in the flattened (B*T) tokens, then B*T. Every row starts a run. Its
    length depends on the data, so this reads the device once (nonzero) — in hidden_states, outside the blocks."""
    B, T = segments.shape
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = start.flatten().nonzero().flatten()
    return F.pad(starts, (0, 1), value=B * T).to(torch.int32)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=bias)
        self.kv_cache: Optional[KVCache] = None
        # Training-time replacement of causal attention (LongLoRA's shifted sparse attention), set from outside.
        self.train_attn_fn: Optional[AttnFn] = None

    def forward(self, x, cos, sin, input_pos=None, mask=None, cu_seqlens=None):
        """x: (B, T, dim). mask: bool (B, 1, T, S) or None. cu_seqlens: flash-attn's document offsets over the
        flattened (B*T) tokens (see Transformer.hidden_states), for causal attention within each document."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, T, H, D)

        if cu_seqlens is not None:  # packed documents; T bounds the longest one (no length read off the device)
            y = flash_attn_varlen_func(q.reshape(B * T, self.n_heads, self.head_dim),
                                       k.reshape(B * T, self.n_kv_heads, self.head_dim),
                                       v.reshape(B * T, self.n_kv_heads, self.head_dim),
                                       cu_seqlens, cu_seqlens, T, T, causal=True)  # (B*T, H, D)
            return self.o_proj(y.reshape(B, T, -1))
        if self.kv_cache is None and mask is None and flash_attn_func is not None and flash_ok(q) \
                and self.train_attn_fn is None:
            y = flash_attn_func(q, k, v, causal=True)  # (B, T, H, D), GQA handled by the kernel
            return self.o_proj(y.reshape(B, T, -1))

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, S, D)
            causal = torch.arange(k.shape[2], device=x.device)[None, :] <= input_pos[:, None]  # (T, S)
            mask = causal if mask is None else mask[..., :k.shape[2]] & causal
            y = sdpa(q, k, v, mask)
        elif self.train_attn_fn is not None and self.training and mask is None:
            y = self.train_attn_fn(q, k, v)
        else:
            y = sdpa(q, k, v, mask, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, input_pos=None, mask=None, cu_seqlens=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, cu_seqlens)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """Holds the parameters under the `model.` prefix, as in LlamaForCausalLM."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


# ----------------------------------------------------------------------------------------------- model
class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaBody(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.reset_rope()
        self.apply(self._init_weights)

    # -- set-up
    def reset_rope(self, device=None):
        """(Re)build the cos/sin tables for args.max_seq_len (after loading on meta, or changing rope_scaling)."""
        device = torch.device(device or self.model.embed_tokens.weight.device)
        cos, sin = rope_tables(self.args, self.args.max_seq_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, module: nn.Module):
        std = self.args.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        # GPT-2's residual scaling: projections into the residual stream get std/sqrt(2L)
        for name in ("o_proj", "down_proj"):
            if isinstance(getattr(module, name, None), nn.Linear):
                nn.init.normal_(getattr(module, name).weight, mean=0.0, std=std / math.sqrt(2 * self.args.n_layers))

    def setup_cache(self, batch_size: int, max_seq_len: Optional[int] = None, dtype=None, device=None):
        max_seq_len = max_seq_len or self.args.max_seq_len
        weight = self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, self.args.n_kv_heads, max_seq_len, self.args.head_dim,
                                               dtype or weight.dtype, device or weight.device)
        if max_seq_len > self.rope_cos.shape[0]:
            cos, sin = rope_tables(self.args, max_seq_len, self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos, sin

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    # -- forward
    def _rope(self, T: int, input_pos: Optional[torch.Tensor], position_ids: Optional[torch.Tensor]):
        """cos/sin (T, D) or (B, T, D), float32, for the positions of this forward. Positions are bounded by the
        shapes (below T without a cache, below the cache's size with one), so no value is read off the device: a
        host sync per forward, and a graph break under torch.compile. Dynamic NTK is the exception: its
        frequencies depend on the longest position itself (as in transformers)."""
        positions = position_ids if position_ids is not None else input_pos
        s = self.args.rope_scaling
        if s is not None and s.rope_type == "dynamic":
            needed = int(positions.max()) + 1 if positions is not None else T
            if needed > self.args.max_seq_len:
                cos, sin = rope_tables(self.args, needed, self.rope_cos.device, dynamic_len=needed)
                return (cos[positions], sin[positions]) if positions is not None else (cos[:T], sin[:T])
        cache = self.model.layers[0].self_attn.kv_cache if input_pos is not None else None
        bound = cache.k.shape[2] if cache is not None else T
        cos, sin = self.rope_cos, self.rope_sin
        if bound > cos.shape[0]:
            cos, sin = rope_tables(self.args, bound, cos.device)
        return (cos[positions], sin[positions]) if positions is not None else (cos[:T], sin[:T])

    def hidden_states(self, tokens: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                      position_ids: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim).

        tokens: (B, T). input_pos: (T,) cache slots when decoding with a cache. position_ids: (B, T) rotary positions
        (default: input_pos, or 0..T-1) — per-example positions for packed or left-padded batches; they must lie
        below T (below the cache's size when decoding).
        mask: bool (B, 1, T, S), True = may attend; it must include causality when given without a cache. Or, for
        packed documents without a cache, an integer (B, T) document index per token (llm.sft_data.SFTCollator's,
        padding -1; one run of equal indices per document): each token attends causally within its document. That
        runs flash-attn's variable-length kernel where it can (importable, CUDA, fp16/bf16), and is otherwise the
        same `document_mask` (B, 1, T, T), built here on the device rather than shipped from the host.
        """
        cos, sin = self._rope(tokens.shape[1], input_pos, position_ids)
        x = self.model.embed_tokens(tokens)
        cu_seqlens = None
        if mask is not None and mask.dim() == 2 and not (mask.dtype == torch.bool or mask.is_floating_point()):
            if input_pos is not None:
                raise ValueError("document indices (B, T) are for a forward without a KV cache; pass a bool mask")
            if flash_attn_varlen_func is not None and flash_ok(x):
                mask, cu_seqlens = None, document_offsets(mask)
            else:
                mask = document_mask(mask)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, input_pos, mask, cu_seqlens, use_reentrant=False)
            else:
                x = layer(x, cos, sin, input_pos, mask, cu_seqlens)
        return self.model.norm(x)

    def forward(self, tokens: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, vocab_size)."""
        return self.lm_head(self.hidden_states(tokens, input_pos, position_ids, mask))

"""Model hyper-parameters: `ModelArgs`, a dataclass that maps 1:1 to transformers' `LlamaConfig`, and presets.

Field names follow gpt-fast/LLaMA (`dim`, `n_layers`, ...); `to_hf_config()` / `from_hf_config()` translate to
and from the Hugging Face names so that a checkpoint directory is a plain Llama directory.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Literal, Optional

from llm.settings_check import check_value, describe


@dataclass
class RopeScaling:
    """RoPE scaling as transformers spells it in `config.json["rope_scaling"]`."""

    rope_type: Literal["linear", "dynamic", "yarn"] = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: Optional[int] = None
    """Context length the model was trained at (YaRN); defaults to max_seq_len. Dynamic NTK ignores it and, as
    transformers does, starts scaling beyond max_seq_len."""
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None
    """YaRN's attention temperature; None = 0.1*ln(factor)+1 as in the paper and transformers."""

    def to_dict(self) -> dict:
        d = {"rope_type": self.rope_type, "factor": float(self.factor)}
        if self.original_max_position_embeddings is not None:
            d["original_max_position_embeddings"] = int(self.original_max_position_embeddings)
        if self.rope_type == "yarn":
            d.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow)
            if self.attention_factor is not None:
                d["attention_factor"] = self.attention_factor
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> Optional["RopeScaling"]:
        d = dict(d)
        kind = d.pop("rope_type", d.pop("type", None))
        if kind in (None, "default"):
            return None
        if kind not in ("linear", "dynamic", "yarn"):
            raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported (use linear, dynamic or yarn)")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(rope_type=kind, **{k: v for k, v in d.items() if k in known and v is not None})


@dataclass
class ModelArgs:
    """A LLaMA-2 decoder's shape. Every field has a LlamaConfig counterpart (see `to_hf_config`)."""

    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: Optional[int] = None
    """Grouped-query attention: key/value heads (None = n_heads)."""
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None
    """SwiGLU inner size; None = 8/3*dim rounded up to `multiple_of` (LLaMA's rule)."""
    multiple_of: int = 32
    head_dim: Optional[int] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: Optional[int] = 0
    initializer_range: float = 0.02
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        self.check()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.hidden_dim is None:
            h = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * math.ceil(h / self.multiple_of)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling.from_dict(self.rope_scaling)

    def check(self):
        """Types and sizes of the fields (from a YAML, a --model override or a config.json): ValueError naming
        the field."""
        hints = typing.get_type_hints(ModelArgs)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (f.name == "rope_scaling" and isinstance(value, (dict, RopeScaling))) or \
                    (f.name.endswith("_id") and value is None):
                continue  # converted below / a config.json without that token
            strict = isinstance(value, str) and hints[f.name] is not str  # numbers, not strings that look like them
            if problem := (f"{f.name}: expected {describe(hints[f.name])}, got {value!r}" if strict
                           else check_value(f.name, value, hints[f.name])):
                raise ValueError(problem)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of",
                     "head_dim", "max_seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")

    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B: 6N + 12*L*d*T."""
        non_emb = self.n_params - self.vocab_size * self.dim * (0 if self.tie_word_embeddings else 1)
        return 6 * non_emb + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len

    def to_hf_config(self) -> dict:
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_dict() if self.rope_scaling else None,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "torch_dtype": "float32",
        }
        return cfg

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Read a LlamaConfig dict (transformers 4 style, or 5 style with `rope_parameters`)."""
        if cfg.get("model_type", "llama") not in ("llama", "mistral") and "LlamaForCausalLM" not in cfg.get("architectures", []):
            raise ValueError(f"{source}: model_type {cfg.get('model_type')!r} is not a Llama model")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (LLaMA uses silu)")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in cfg]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        rope_params = dict(cfg.get("rope_parameters") or {})
        rope_theta = cfg.get("rope_theta", rope_params.pop("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or rope_params or None
        eos = cfg.get("eos_token_id", 2)
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            hidden_dim=cfg.get("intermediate_size"),
            head_dim=cfg.get("head_dim") or None,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=RopeScaling.from_dict(scaling, source) if scaling else None,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=cfg.get("pad_token_id"),
            initializer_range=cfg.get("initializer_range", 0.02),
            attention_bias=cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
        )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # seconds on a CPU: unit tests
    "debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=128, multiple_of=16),
    # minutes on a 2-core CPU: run.sh's default on the built-in corpus. FFN sizes are multiples of 128 so that
    # GPTQ's default group size divides every Linear (the seeds' 1,376 did not).
    "cpu-demo": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=4096, max_seq_len=256,
                     tie_word_embeddings=True, multiple_of=128),
    # the seeds' single 24 GB GPU recipe (dim 512, 8 layers, 8 heads, seq 512)
    "25M": dict(dim=512, n_layers=8, n_heads=8, vocab_size=8000, max_seq_len=512, multiple_of=128),
    "125M": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32000, max_seq_len=1024, multiple_of=256),
    "350M": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, vocab_size=32000, max_seq_len=2048, multiple_of=256),
    "1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, max_seq_len=2048, hidden_dim=5632),
}

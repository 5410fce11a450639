"""Model hyper-parameters: `ModelArgs`, a dataclass that maps 1:1 to transformers' `LlamaConfig`, and presets.

Field names follow gpt-fast/LLaMA (`dim`, `n_layers`, ...); `to_hf_config()` / `from_hf_config()` translate to
and from the Hugging Face names so that a checkpoint directory is a plain Llama directory.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


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
            if (f.name == "rope_scaling" and isinstance(value, dict)) or (f.name.endswith("_id") and value is None):
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


# ----------------------------------------------------------------------------------------------- checking settings
# Every CLI's settings (`--config FILE.yaml` and `--name value`) are checked here against the typed signature before
# jsonargparse sees them, so a mistake is one line naming the file, line and key (`llm.cli.run_cli`).
SIGNED_INTS = {"seed", "top_k", "group_size", "bos_token_id", "eos_token_id", "pad_token_id"}
"""Integer settings that may be negative (group_size -1: one group per row); every other one is a size or a count,
so a negative value is an error."""


def accepts(value: Any, tp: Any) -> bool:
    """Whether `value` (as YAML or a command line gives it) is a valid `tp`, the way jsonargparse will read it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object or isinstance(tp, typing.TypeVar):
        return True
    if tp is type(None):
        return value is None
    if origin is Union or origin is types.UnionType:
        return any(accepts(value, t) for t in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return _number(value, int)
    if tp is float:
        return _number(value, float)
    if tp is str:
        return value is not None and not isinstance(value, (list, tuple, dict))
    if origin in (list, tuple, set, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(accepts(v, t) for v, t in zip(value, args))
        return all(accepts(v, args[0]) for v in value) if args else True
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (dict, tp))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True  # a type this check does not know: jsonargparse decides


def _number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):  # "1e-3" is a string to YAML 1.1, a number to jsonargparse
        try:
            kind(value)
            return True
        except ValueError:
            return False
    return isinstance(value, numbers.Integral if kind is int else numbers.Real)


def describe(tp: Any) -> str:
    """`tp` in words, for an error message."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        words = [describe(t) for t in args if t is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if origin in (list, tuple, set, collections.abc.Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(describe(t) for t in args)})"
        return f"a list of {describe(args[0]) if args else 'values'}"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a mapping (key: value)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def check_value(name: str, value: Any, tp: Any) -> Optional[str]:
    """Why `value` is not a valid setting `name` of type `tp` (a phrase naming it), or None when it is."""
    if not accepts(value, tp):
        return f"{name}: expected {describe(tp)}, got {value!r}"
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value < 0 and leaf not in SIGNED_INTS:
        return f"{name}: must be >= 0, got {value} (a size or a count)"
    return None


Schema = dict  # setting name -> its type, or a nested Schema (the subcommands of a command with several)


def schema_of(component: Any) -> Schema:
    """The settings a CLI component takes: a function's typed parameters, or {subcommand: its schema}."""
    if isinstance(component, dict):
        return {name: schema_of(c) for name, c in component.items()}
    hints = typing.get_type_hints(component)
    hints.pop("return", None)
    return hints


def _fields(tp: Any) -> Optional[Schema]:
    """The nested settings of a dataclass-typed setting (also Optional[dataclass]), else None."""
    if isinstance(tp, dict):
        return tp
    for t in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(t):
            return schema_of(t)
    return None


def _unknown(name: str, key: str, prefix: str, known: Schema) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if close:
        return f"unknown {name} {prefix}{key} — did you mean {prefix}{close[0]}?"
    return f"unknown {name} {prefix}{key} — valid: {', '.join(prefix + k for k in sorted(known))}"


class _LineLoader(yaml.SafeLoader):
    """A YAML loader whose mappings remember the line of each key (`.lines`)."""

    def construct_mapping(self, node, deep=False):
        mapping = _Lines(super().construct_mapping(node, deep=True))
        mapping.lines = {}
        for key_node, _ in node.value:
            try:
                mapping.lines[self.construct_object(key_node, deep=True)] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: construct_mapping has already refused it
                pass
        return mapping


class _Lines(dict):
    lines: dict


_LineLoader.add_constructor("tag:yaml.org,2002:map", lambda loader, node: loader.construct_mapping(node))


def check_config_file(path: str, schema: Schema) -> None:
    """Check a `--config` YAML against the CLI's settings: names, types and signs, before anything else runs.
    Raises ValueError `FILE:LINE: key: what is wrong — the fix` (llm.cli prints it as one line)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path}: no such config file — check the path (--config takes a YAML file)")
    if p.is_dir():
        raise ValueError(f"{path}: is a folder — --config takes a YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file — --config takes a YAML file") from None
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ValueError(f"{where}: YAML syntax error: {what} — check the indentation, quotes and brackets "
                         "there") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise ValueError(f"{path}:1: expected a mapping of setting: value at the top level, got "
                         f"{type(data).__name__} — see --print_config for the layout")
    _check_mapping(data, schema, path, "")


def _check_mapping(data: dict, schema: Schema, path: str, prefix: str) -> None:
    for key, value in data.items():
        line = getattr(data, "lines", {}).get(key, "?")
        where = f"{path}:{line}"
        if key not in schema:
            raise ValueError(f"{where}: {_unknown('key', str(key), prefix, schema)}")
        tp, nested = schema[key], _fields(schema[key])
        if nested is not None and isinstance(value, dict):
            _check_mapping(value, nested, path, f"{prefix}{key}.")
        elif problem := check_value(prefix + str(key), value, tp):
            raise ValueError(f"{where}: {problem}")


def check_args(schema: Schema, args: list[str]) -> None:
    """Check a CLI's arguments (`--config FILE`, `--a.b value`, `--a.b=value`, a subcommand) against its settings,
    before jsonargparse parses them. Raises ValueError with a one-line message naming the option or file."""
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help"):
            return  # jsonargparse prints the help
        if not arg.startswith("--"):
            subcommands = {k: v for k, v in schema.items() if isinstance(v, dict)}
            if subcommands and arg not in schema:
                raise ValueError(_unknown("subcommand", arg, "", subcommands))
            if isinstance(schema.get(arg), dict):
                schema = schema[arg]
            continue
        key, eq, value = arg[2:].partition("=")
        if key.startswith("print_config"):
            continue
        if not eq:
            if i >= len(args) or args[i].startswith("--"):
                continue  # jsonargparse says a value is missing
            value, i = args[i], i + 1
        if key == "config":
            check_config_file(value, schema)
            continue
        _check_option(schema, key.rstrip("+"), value, appending=key.endswith("+"))


def _check_option(schema: Schema, key: str, value: str, appending: bool) -> None:
    parts, node, tp = key.split("."), schema, None
    for n, part in enumerate(parts):
        if node is None:  # beneath a free-form mapping (e.g. --model.dim of pretrain's overrides)
            return
        if part not in node:
            flat = _flatten(schema)
            close = difflib.get_close_matches(key, flat, n=1, cutoff=0.6)
            hint = f" — did you mean --{close[0]}?" if close else " — see --help for the options"
            raise ValueError(f"--{key}: unknown option{hint}")
        tp = node[part]
        node = _fields(tp)
        if node is None and n < len(parts) - 1 and not _is_mapping(tp):
            raise ValueError(f"--{key}: unknown option — {'.'.join(parts[:n + 1])} has no fields")
    if appending or _fields(tp) is not None:
        return  # `--list+ item`, or a group given whole (`--train file.yaml`): jsonargparse reads them
    parsed = _yaml(value)  # as jsonargparse reads a value; a plain string where the type takes one
    if problem := check_value(key, parsed if accepts(parsed, tp) or not accepts(value, tp) else value, tp):
        raise ValueError(f"--{problem}")


def _yaml(value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _is_mapping(tp: Any) -> bool:
    return any(typing.get_origin(t) is dict or t is dict for t in (tp, *typing.get_args(tp)))


def _flatten(schema: Schema, prefix: str = "") -> list[str]:
    out = []
    for k, tp in schema.items():
        nested = _fields(tp)
        out += _flatten(nested, f"{prefix}{k}.") if nested is not None else [prefix + k]
    return out

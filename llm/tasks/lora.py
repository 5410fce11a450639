"""LoRA (Hu et al. 2021, through peft) and LongLoRA (Chen et al. 2023, arXiv 2309.12307: LoRA + trainable
embeddings/norms + S²-Attn, with RoPE scaling to extend the context) on the language-modelling task: the adapters
train, the base stays frozen; final/ is the merged model (peft's `merge_and_unload`), adapter/ the adapter (for
LongLoRA also the trained embeddings/norms and the RoPE extension). `merge_lora` rebuilds final/ from both."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import load_file, save_file

from llm.errors import UserError
from llm.hf_format import load_model, load_tokenizer, materialize, save_model
from llm.longlora import disable_s2_attn, longlora_trainable
from llm.model import Transformer
from llm.tasks.lm import LanguageModelTask
from llm.train import DTYPES


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXTRA_PARAMS = "trainable_params.safetensors"  # LongLoRA's embeddings/norms, next to the adapter
EXTENSION = "context_extension.json"  # rope_scaling + max_position_embeddings the adapter was trained with


@dataclass
class LoraOptions:
    """LoRA adapters (peft `LoraConfig`)."""

    r: int = 8
    """Rank of the update B @ A."""
    alpha: float = 16
    """Scale: the update is multiplied by alpha / r."""
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layers that get adapters (attention q/k/v/o and the MLP projections by default)."""


@dataclass
class LongLoraOptions:
    """Context extension (mode longlora)."""

    context_factor: Optional[float] = None
    """Extend the context this many times (sets rope_scaling and max positions); None = keep the model's
    existing rope_scaling (which must then be set)."""
    rope_type: Literal["yarn", "linear"] = "yarn"
    group_size_ratio: float = 0.25
    """S²-Attn group size as a share of the sequence (LongLoRA: 1/4)."""


def add_lora(model: Transformer, opts: LoraOptions, base_path: Optional[str] = None):
    """Wrap `model` in a peft model with LoRA on `opts.targets`; only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in opts.targets if t not in present]
    if missing or not opts.targets:
        raise UserError(f"--lora.targets: no linear layer named {', '.join(missing) or '(none given)'} in the model — "
                        f"choose from {', '.join(sorted(present))}")
    cfg = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=list(opts.targets))
    peft_model = get_peft_model(model, cfg)
    peft_model.peft_config["default"].base_model_name_or_path = base_path  # recorded in adapter_config.json
    return peft_model


def export_lora(peft_model, adapter_dir: Path, final_dir: Optional[Path], tokenizer=None, dtype=None,
                extras: Optional[set[str]] = None, extra_files: Optional[dict[str, str]] = None):
    """Write the adapter directory (peft's, plus LongLoRA's trained embeddings/norms and the RoPE extension) and,
    if `final_dir` is given, the merged Hugging Face directory. Consumes `peft_model` (merges in place)."""
    from llm import writer  # the same atomic, own-outputs-only write as save_model

    base = peft_model.get_base_model()
    with writer.write_dir(adapter_dir, "adapter", flag="--train.run_dir") as tmp:
        peft_model.save_pretrained(tmp)
        if extras:
            # names without peft's wrapper prefix: base_model.model.model.norm.weight -> model.norm.weight
            sd = {n.removeprefix("base_model.model."): p.detach().contiguous().cpu() for n, p in peft_model.named_parameters()
                  if n in extras}
            save_file(sd, str(tmp / EXTRA_PARAMS), metadata={"format": "pt"})
        if base.args.rope_scaling is not None:
            (tmp / EXTENSION).write_text(json.dumps({"rope_scaling": base.args.rope_scaling.to_dict(),
                                                     "max_position_embeddings": base.args.max_seq_len}, indent=2))
    if final_dir is not None:
        merged = peft_model.merge_and_unload()
        disable_s2_attn(merged)  # S²-Attn is a training-time hook only
        save_model(merged, final_dir, tokenizer=tokenizer, dtype=dtype, extra_files=extra_files)


def merge_lora(base: str, adapter: str, dst: str, dtype: Optional[Literal["fp32", "bf16", "fp16"]] = None) -> Path:
    """Merge a LoRA adapter (from llm/sft.py --mode lora|longlora, or any peft LoRA adapter for a Llama model)
    into the base model and write a Hugging Face directory.

    Args:
        base: the Hugging Face directory the adapter was trained on.
        adapter: the adapter directory (adapter_config.json + adapter_model.safetensors).
        dst: output directory.
        dtype: weight dtype of the output (default: the base model's).
    """
    from peft import PeftModel

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json — not a peft adapter directory "
                        "(llm/sft.py writes one to runs/<run>/adapter)")
    model = load_model(base)
    ext = adapter_dir / EXTENSION
    if ext.is_file():  # LongLoRA extended the context: the merged config must say so
        from llm.config import RopeScaling

        info = json.loads(ext.read_text())
        model.args.rope_scaling = RopeScaling.from_dict(info["rope_scaling"], str(ext))
        model.args.max_seq_len = info["max_position_embeddings"]
        model.reset_rope()
    if (adapter_dir / EXTRA_PARAMS).is_file():  # LongLoRA's trained embeddings and norms
        extra = load_file(str(adapter_dir / EXTRA_PARAMS))
        unknown = sorted(set(extra) - set(model.state_dict()))
        if unknown:
            raise UserError(f"{adapter_dir / EXTRA_PARAMS}: tensors {unknown[:3]} are not in {base} — wrong base model")
        model.load_state_dict(extra, strict=False)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{adapter_dir}: cannot apply the adapter to {base} ({str(e).splitlines()[0][:200]}) — was "
                        "it trained on this base model?") from None
    merged = peft_model.merge_and_unload()
    return save_model(merged, dst, tokenizer=load_tokenizer(base), dtype=DTYPES[dtype] if dtype else None,
                      inputs=(base, adapter))


class LoraTask(LanguageModelTask):
    """Language modelling with LoRA adapters (`longlora`: also embeddings and norms) on a frozen base. `model` is
    the peft wrapper; `export` writes adapter/ and the merged final/."""

    def __init__(self, base: Transformer, opts: LoraOptions, base_path: str, longlora: bool, run_dir: Path, **kw):
        torch.manual_seed(kw.pop("seed", 0))  # LoRA's A matrices start random: the same on every rank and every run
        super().__init__(add_lora(base, opts, base_path), **kw)
        self.opts, self.base_path, self.longlora, self.run_dir = opts, base_path, longlora, run_dir
        self.args = base.args

    def trainable(self, name, param):
        return longlora_trainable(name) if self.longlora else "lora_" in name

    def transformer(self, module):
        return module.get_base_model()

    def export(self, state_dict, final: Path, dtype):
        """Rebuild the peft model from the consolidated fp32 state dict (every ZeRO stage), then write the adapter
        and the merged model."""
        with torch.device("meta"):
            shell = add_lora(Transformer(self.args), self.opts, self.base_path)
        shell.load_state_dict(state_dict, strict=True, assign=True)
        materialize(shell.get_base_model())
        extras = {n for n, _ in shell.named_parameters() if longlora_trainable(n) and "lora_" not in n} \
            if self.longlora else None
        export_lora(shell, self.run_dir / "adapter", final, self.tokenizer, dtype, extras, self.training_data_record())

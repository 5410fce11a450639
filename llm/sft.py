"""Supervised fine-tuning of any Hugging Face Llama directory: full, LoRA (Hu et al. 2021, through peft) or
LongLoRA (Chen et al. 2023, arXiv 2309.12307: LoRA + trainable embeddings/norms + S²-Attn, with RoPE scaling to
extend the context), on the one training loop of llm/trainer.py (DeepSpeed ZeRO 0-3, same configs and launchers).

    deepspeed --num_gpus 2 llm/sft.py --model runs/demo/final --data builtin:idioms --mode lora \\
        --train.run_dir runs/sft-idioms --train.ds_config zero2
    python llm/sft.py --config configs/sft/longlora.yaml     # context 256 -> 1024 with YaRN + LongLoRA

Data: chats (jsonl `{"messages": [...]}` or `{"instruction", "input", "output"}`, or builtin:chatterbot /
idioms / chitchat), loss on assistant tokens only, packed by default; or a prepared pretraining data dir
(tools/prepare_data.py) for plain language modelling, which is what context extension trains on.

Output in run_dir: final/ (a Hugging Face directory, LoRA merged by peft's `merge_and_unload`), adapter/ (the peft
adapter; for LongLoRA also the trained embeddings/norms and the RoPE extension), checkpoints/ to resume.
`merge_lora(base, adapter, dst)` (tools/convert.py merge_lora) rebuilds final/ from base + adapter.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import load_file, save_file

from llm.chat import render
from llm.cli import UserError, run_cli
from llm.hf_format import load_model, save_model
from llm.longlora import enable_s2_attn, extend_context, longlora_trainable
from llm.model import Transformer
from llm.trainer import DTYPES, TrainConfig, default_collate, lm_loss, on_cpu, preflight, train

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


# ----------------------------------------------------------------------------------------------- LoRA
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
                extras: Optional[set[str]] = None):
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
        for layer in merged.model.layers:  # S²-Attn is a training-time hook only
            layer.self_attn.train_attn_fn = None
        save_model(merged, final_dir, tokenizer=tokenizer, dtype=dtype)


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
    return save_model(merged, dst, tokenizer=_tokenizer_or_none(base), dtype=DTYPES[dtype] if dtype else None,
                      inputs=(base, adapter))


def _tokenizer_or_none(model_dir: str):
    from llm.tokenizer import Tokenizer

    d = Path(model_dir)
    return Tokenizer.from_dir(d) if (d / "tokenizer.model").is_file() or (d / "tokenizer.json").is_file() else None


# ----------------------------------------------------------------------------------------------- data
def load_partitioned(path: str, ds_config: dict) -> Transformer:
    """The Hugging Face directory `path` as a Transformer created partitioned over the ranks (deepspeed.zero.Init,
    ZeRO-3) and filled one parameter at a time: rank 0 reads it from the safetensors file (safe_open: nothing else
    is read) into the gathered parameter, which is broadcast and re-partitioned on leaving GatheredParameters. No
    rank holds the whole model. Names and shapes are checked against config.json first, on every rank (from the
    files' headers), so an error stops all ranks before any collective. A GPTQ directory is loaded whole
    (load_model dequantizes it)."""
    import deepspeed
    from safetensors import safe_open

    from llm.hf_format import IGNORED_SUFFIXES, _weight_files, read_config
    from llm.trainer import init_distributed

    args, cfg = read_config(path)
    if cfg.get("quantization_config"):
        return load_model(path)
    rank, _, _ = init_distributed()
    shapes, files = {}, {}
    for f in _weight_files(Path(path)):
        if not f.is_file():
            raise UserError(f"{f}: listed in model.safetensors.index.json but missing")
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if not k.endswith(IGNORED_SUFFIXES):
                    shapes[k], files[k] = tuple(fh.get_slice(k).get_shape()), f
    zero = {**ds_config.get("zero_optimization", {}), "override_module_apply": False}  # weights come from the file
    with deepspeed.zero.Init(config_dict_or_path={**ds_config, "zero_optimization": zero}):
        model = Transformer(args)
    params = dict(model.named_parameters())  # a tied lm_head appears once, as model.embed_tokens.weight
    if args.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    wrong = [f"{k} has shape {shapes[k]} but config.json implies {tuple(p.ds_shape)}" for k, p in params.items()
             if k in shapes and shapes[k] != tuple(p.ds_shape)]
    if missing := sorted(set(params) - set(shapes)):
        wrong.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if unexpected := sorted(set(shapes) - set(params)):
        wrong.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
    if wrong:
        raise UserError(f"{path}: weights do not match config.json ({'; '.join(wrong)}); is config.json from a "
                        "different model?")
    with torch.no_grad():
        for name, p in params.items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    with safe_open(str(files[name]), framework="pt") as fh:
                        p.data.copy_(fh.get_tensor(name))
    return model.eval()


def build_data(data: str, val_data: Optional[str], tokenizer, model: Transformer, seq_len: int, pack: bool,
               truncate: bool, val_fraction: float, max_examples: Optional[int], seed: int, log=print):
    """(train_ds, val_ds, collate, sample prompts) for chats or a pretraining data dir."""
    if (Path(data) / "meta.json").is_file() or (Path(data).is_dir() and not data.startswith("builtin:")):
        from llm.data import PretrainDataset

        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        train_ds = PretrainDataset(data, "train", seq_len, seed, rank, world, model.args.vocab_size, tokenizer)
        val_dir = val_data or data
        has_val = "val" in train_ds.meta["splits"] if val_data is None else True
        val_ds = PretrainDataset(val_dir, "val", seq_len, seed, rank, world, model.args.vocab_size,
                                 tokenizer) if has_val else None
        return train_ds, val_ds, default_collate, None

    from llm.sft_data import SFTCollator, SFTDataset, tokenized_chats

    if tokenizer is None:
        raise UserError(f"{data}: chat data needs the model's tokenizer, and the model directory has none")
    # tokenized once per data file and tokenizer, then memory-mapped (llm/sft_data.py "Token cache")
    src = tokenized_chats(tokenizer, data)
    val_src = tokenized_chats(tokenizer, val_data) if val_data else src
    train_idx = src.select("train" if val_data is None else None, val_fraction)
    val_idx = val_src.select(None) if val_data else src.select("val", val_fraction)
    if max_examples is not None and max_examples < len(train_idx):  # a random subset, the same on every rank
        train_idx = train_idx[random.Random(seed).sample(range(len(train_idx)), max_examples)]
    train_ds = SFTDataset.from_tokenized(src, train_idx, seq_len, pack, truncate)
    val_ds = SFTDataset.from_tokenized(val_src, val_idx, seq_len, pack, truncate) if len(val_idx) else None
    log(f"{data}: {train_ds.n_examples} training examples in {len(train_ds)} sequences of <= {seq_len} tokens"
        f"{' (packed)' if pack else ''}; {train_ds.skipped} skipped, {train_ds.truncated} truncated (longer than "
        f"seq_len{'' if truncate else '; --truncate keeps their beginning'}); "
        f"{val_ds.n_examples if val_ds else 0} held out")
    if int(os.environ.get("RANK", 0)) == 0 and (warning := tokenizer.coverage_warning(
            *train_ds.byte_fragments(tokenizer), data)):
        log(warning)  # counted on rank 0 only: every rank holds the same examples
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    first = val_src.chats(val_idx[:2]) if len(val_idx) else src.chats(train_idx[:2])
    prompts = [render([m for m in c if m["role"] != "assistant"][:1], add_generation_prompt=True) for c in first]
    return train_ds, val_ds, SFTCollator(pad, seq_len, packed=pack), prompts


# ----------------------------------------------------------------------------------------------- CLI
def sft(model: str, data: str, train_cfg: TrainConfig, mode: Literal["full", "lora", "longlora"] = "full",
        val_data: Optional[str] = None, seq_len: Optional[int] = None, pack: bool = True, truncate: bool = False,
        val_fraction: float = 0.05, max_examples: Optional[int] = None, lora: Optional[LoraOptions] = None,
        longlora: Optional[LongLoraOptions] = None) -> dict:
    """The function behind the CLI (see `main` for the arguments); returns the trainer's summary."""
    lora, longlora = lora or LoraOptions(), longlora or LongLoraOptions()
    plan = preflight(train_cfg)  # a config error comes now, not after loading the model and tokenizing the data
    rank0 = int(os.environ.get("RANK", 0)) == 0
    log = print if rank0 else (lambda *a, **k: None)
    # Full fine-tuning under ZeRO-3 never holds the whole model on a rank; LoRA keeps the replicated base (peft's
    # adapters are built from whole Linear layers).
    base = load_partitioned(model, plan.ds_config) if plan.zero_stage == 3 and mode == "full" else load_model(model)
    tokenizer = _tokenizer_or_none(model)
    if mode == "longlora":
        if longlora.context_factor is not None:
            old = base.args.max_seq_len
            extend_context(base, longlora.context_factor, longlora.rope_type)
            log(f"context {old} -> {base.args.max_seq_len} ({base.args.rope_scaling.to_dict()})")
        elif base.args.rope_scaling is None:
            raise UserError(f"{model}: --mode longlora needs RoPE scaling — pass --longlora.context_factor 4 "
                            "(with --longlora.rope_type yarn|linear), or start from a model whose config.json "
                            "has rope_scaling")
        enable_s2_attn(base, longlora.group_size_ratio)
    seq_len = seq_len or base.args.max_seq_len
    if seq_len > base.args.max_seq_len:
        raise UserError(f"--seq_len {seq_len} exceeds the model's {base.args.max_seq_len} positions — lower it, or "
                        "extend the context with --mode longlora --longlora.context_factor")
    train_ds, val_ds, collate, prompts = build_data(data, val_data, tokenizer, base, seq_len, pack, truncate,
                                                    val_fraction, max_examples, train_cfg.seed, log)
    if mode == "longlora" and pack and not hasattr(train_ds, "set_epoch"):
        log("note: packed batches carry a block-diagonal mask and use full attention; S²-Attn applies to "
            "unpacked sequences (--pack false)")
    if prompts and train_cfg.sample_prompts == TrainConfig().sample_prompts:
        train_cfg.sample_prompts = prompts  # greedy answers to held-out questions at each evaluation
        train_cfg.sample_temperature = 0.0
    base.gradient_checkpointing = train_cfg.activation_checkpointing  # on the Transformer, not a peft wrapper

    precision = train_cfg.save_dtype or train_cfg.precision or ("fp32" if on_cpu() else "bf16")
    dtype = DTYPES[precision]
    run_dir = Path(train_cfg.run_dir)
    if mode == "full":
        return train(base, train_ds, val_ds, train_cfg, collate=collate, loss_fn=lm_loss, tokenizer=tokenizer)

    torch.manual_seed(train_cfg.seed)  # LoRA's A matrices start random: the same on every rank and every run
    net = add_lora(base, lora, str(Path(model).resolve()))
    keep = longlora_trainable if mode == "longlora" else (lambda n: "lora_" in n)

    def trainable(name, _p):
        return keep(name)

    def on_save(sd: dict, final: Path):
        """Rebuild the peft model from the consolidated fp32 state dict (every ZeRO stage), then write the
        adapter and the merged model."""
        with torch.device("meta"):
            shell = Transformer(base.args)
        shell = add_lora(shell, lora, str(Path(model).resolve()))
        shell.load_state_dict(sd, strict=True, assign=True)
        inner = shell.get_base_model()
        if base.args.tie_word_embeddings:
            inner.lm_head.weight = inner.model.embed_tokens.weight
        inner.reset_rope(torch.device("cpu"))
        extras = {n for n, _ in shell.named_parameters() if longlora_trainable(n) and "lora_" not in n} \
            if mode == "longlora" else None
        export_lora(shell, run_dir / "adapter", final, tokenizer, dtype, extras)

    return train(net, train_ds, val_ds, train_cfg, collate=collate, loss_fn=lm_loss, trainable_filter=trainable,
                 tokenizer=tokenizer, on_save=on_save)


def main(model: str, data: str, train: TrainConfig = TrainConfig(run_dir="runs/sft", lr=2e-4, min_lr=2e-5,
                                                                   warmup_steps=20, max_steps=500, weight_decay=0.0,
                                                                   eval_every=100, save_every=250),
         mode: Literal["full", "lora", "longlora"] = "full", val_data: Optional[str] = None,
         seq_len: Optional[int] = None, pack: bool = True, truncate: bool = False, val_fraction: float = 0.05,
         max_examples: Optional[int] = None, lora: LoraOptions = LoraOptions(),
         longlora: LongLoraOptions = LongLoraOptions()) -> None:
    """Fine-tune a Hugging Face Llama directory on chats (or plain text) with the shared DeepSpeed trainer.

    Args:
        model: Hugging Face Llama directory (ours, converted from GGUF, or any LlamaForCausalLM save).
        data: chat jsonl ({"messages": [...]} or {"instruction", "input", "output"} per line), builtin:chatterbot,
            builtin:idioms, builtin:chitchat, or a data dir from tools/prepare_data.py (plain language modelling).
        train: training settings (DeepSpeed config, batch, lr schedule, steps, run_dir, resume ...).
        mode: full (every weight), lora (adapters only) or longlora (adapters + embeddings + norms, S²-Attn).
        val_data: held-out chats (jsonl); default: a `val_fraction` of `data` split off by hash.
        seq_len: tokens per training sequence (default: the model's max positions, after any extension).
        pack: pack several chats into each sequence (examples never attend to each other).
        truncate: cut chats longer than seq_len instead of skipping them.
        val_fraction: share of the chats held out for validation when val_data is not given.
        max_examples: use only N training chats (drawn at random with train.seed).
        lora: LoRA rank/alpha/dropout/targets (modes lora and longlora).
        longlora: context extension factor, RoPE scaling type and S²-Attn group size (mode longlora).
    """
    summary = sft(model, data, train, mode, val_data, seq_len, pack, truncate, val_fraction, max_examples, lora,
                  longlora)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, ensure_ascii=False))


if __name__ == "__main__":
    run_cli(main)

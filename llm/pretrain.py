"""Pretrain a LLaMA-2-style model from scratch on prepared token shards, under DeepSpeed.

    deepspeed --num_gpus 4 llm/pretrain.py                                   # cpu-demo model on data/demo
    deepspeed --num_gpus 8 llm/pretrain.py --config configs/pretrain/350M-2k.yaml --data data/web
    torchrun --nproc_per_node 2 llm/pretrain.py --config configs/pretrain/debug.yaml --train.max_steps 50
    python llm/pretrain.py --config configs/pretrain/cpu-demo.yaml --train.resume auto   # one process

Multi-node: a hostfile (`node0 slots=8` / `node1 slots=8`) and `deepspeed --hostfile hostfile llm/pretrain.py ...`
from node0 (passwordless ssh), or without ssh one launcher per node:

    deepspeed --hostfile hostfile --no_ssh --node_rank 0 --master_addr node0 --master_port 29500 llm/pretrain.py ...
    deepspeed --hostfile hostfile --no_ssh --node_rank 1 --master_addr node0 --master_port 29500 llm/pretrain.py ...

(two "nodes" on one machine: `slots=1` each and `--master_addr 127.0.0.1`; tests/test_pretrain.py does that).

The model is a preset of llm/config.py with optional field overrides (`--model.dim 768`); its vocabulary and
special ids come from the data's tokenizer (meta.json). The loop, checkpoints and logging are llm/trainer.py.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from llm.cli import UserError, run_cli
from llm.config import ModelArgs
from llm.trainer import TrainConfig, preflight
from llm.trainer import train as run_training  # `train` is the name of pretrain()'s config argument

DEFAULT_DATA = "data/demo"


def model_args(preset: str, overrides: Optional[dict], meta: dict, tokenizer) -> ModelArgs:
    """The preset with `overrides`; vocab size and bos/eos/pad ids from the data's tokenizer unless overridden."""
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    overrides = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in (overrides or {}).items()}
    if unknown := sorted(set(overrides) - known):
        raise UserError(f"--model: unknown field(s) {', '.join(unknown)} — valid: {', '.join(sorted(known))}")
    derived = {"vocab_size": meta["vocab_size"], "eos_token_id": meta["eos_id"]}
    if tokenizer is not None:
        derived.update(bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id)
    try:
        return ModelArgs.from_preset(preset, **{**derived, **overrides})
    except (ValueError, TypeError) as e:
        raise UserError(f"--preset {preset} / --model: {e}") from None


def pretrain(preset: str = "cpu-demo", model: Optional[dict[str, Any]] = None, data: str = DEFAULT_DATA,
             tokenizer: Optional[str] = None, seq_len: Optional[int] = None,
             train: TrainConfig = TrainConfig(run_dir="runs/cpu-demo", ds_config="zero1", micro_batch_size=8,
                                              global_batch_size=16, lr=4e-3, min_lr=4e-4, warmup_steps=30,
                                              max_steps=300, log_every=10, eval_every=100, eval_batches=8,
                                              save_every=100)) -> dict:
    """Pretrain a model on DATA/{train,val}_*.bin (tools/prepare_data.py).

    Args:
        preset: model size from llm/config.py (debug, cpu-demo, 25M, 125M, 350M, 1B).
        model: ModelArgs fields overriding the preset, e.g. --model.dim 768 or --model '{n_layers: 12}'.
        data: directory with meta.json and the token shards.
        tokenizer: tokenizer.model / tokenizer.json; default the one recorded in DATA/meta.json (must match it).
        seq_len: training context in tokens; default the model's max_seq_len.
        train: the training loop's settings (llm.trainer.TrainConfig). The defaults are
            configs/pretrain/cpu-demo.yaml's, with the precision picked by the device (bf16 on GPU, fp32 on CPU).
    """
    from llm.data import PretrainDataset, check_tokenizer, read_meta
    from llm.tokenizer import Tokenizer

    data_dir = Path(data)
    if not (data_dir / "meta.json").is_file():
        how = ("`python tools/train_tokenizer.py` then `python tools/prepare_data.py`" if data == DEFAULT_DATA
               else f"`python tools/prepare_data.py --inputs YOUR_TEXT --out {data}`")
        raise UserError(f"{data_dir / 'meta.json'}: not found — the pretraining data is not prepared; create it "
                        f"with {how}")
    meta = read_meta(data_dir)
    tok_path = tokenizer or meta.get("tokenizer")
    tok = None
    if tok_path and Path(tok_path).is_file():
        tok = Tokenizer.from_file(tok_path)
    elif tokenizer:
        raise UserError(f"--tokenizer {tokenizer}: no such file")
    else:
        print(f"warning: {data_dir / 'meta.json'} names tokenizer {tok_path}, which does not exist here — no "
              "samples during training and no tokenizer in final/ (pass --tokenizer)")
    args = model_args(preset, model, meta, tok)
    check_tokenizer(meta, args.vocab_size, tok, data_dir)
    seq_len = seq_len or args.max_seq_len
    if not 1 <= seq_len <= args.max_seq_len:
        raise UserError(f"--seq_len {seq_len}: must be in [1, model max_seq_len={args.max_seq_len}] — raise "
                        "--model.max_seq_len or lower --seq_len")
    plan = preflight(train)
    rank = int(os.environ.get("RANK", "0"))
    datasets = {}
    for split in ("train", "val"):
        if split == "val" and not meta["splits"].get("val", {}).get("shards"):
            print(f"warning: {data_dir} has no val split — no evaluation")
            datasets[split] = None
            continue
        datasets[split] = PretrainDataset(data_dir, split, seq_len, seed=train.seed, rank=rank,
                                          world_size=plan.world_size, vocab_size=args.vocab_size, tokenizer=tok)

    if rank == 0:
        h = datasets["train"].unigram_entropy()
        print(f"baseline: the unigram entropy of {data_dir} train is {h:.3f} nats/token (a model that ignores "
              "context); the val loss should end well below it")

    import torch

    from llm.model import Transformer

    if plan.zero_stage == 3:
        net = partitioned_transformer(args, plan.ds_config, train.seed)
    else:
        torch.manual_seed(train.seed)  # identical initial weights on every rank
        net = Transformer(args)
    return run_training(net, datasets["train"], datasets["val"], train, tokenizer=tok)


def partitioned_transformer(args: ModelArgs, ds_config: dict, seed: int):
    """ZeRO-3: `Transformer(args)` created already partitioned over the ranks (deepspeed.zero.Init), so no rank
    ever holds the whole model (each parameter exists in full only inside its own module's __init__). In fp32 the
    weights are bit-identical to the unpartitioned `torch.manual_seed(seed); Transformer(args)` (tests/test_zero3.py):
    the modules' own inits run on full tensors before partitioning, consuming the RNG as they would; then
    `Transformer._init_weights` is replayed in `Module.apply`'s order (children first) with each module's parameters
    and its children's gathered (o_proj/down_proj are re-drawn by their parent). DeepSpeed's own `apply` wrapper
    gathers only a module's own parameters, so the parent's residual scaling would be lost; it is switched off
    (override_module_apply), which makes __init__'s apply a no-op on the empty partitions (no RNG drawn)."""
    import deepspeed
    import torch

    from llm.model import Transformer
    from llm.trainer import init_distributed

    init_distributed()
    config = {**ds_config, "zero_optimization": {**ds_config.get("zero_optimization", {}),
                                                 "override_module_apply": False}}
    torch.manual_seed(seed)
    with deepspeed.zero.Init(config_dict_or_path=config):
        net = Transformer(args)

    def replay(module):
        for child in module.children():
            replay(child)
        params = {id(p): p for m in (module, *module.children()) for p in m.parameters(recurse=False)}
        if params:  # every rank draws the same values; rank 0's are kept (broadcast on exit)
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                net._init_weights(module)

    with torch.no_grad():
        replay(net)
    return net


if __name__ == "__main__":
    run_cli(pretrain)

"""Pretrain a LLaMA-2-style model from scratch on prepared token shards, under DeepSpeed.

    deepspeed --num_gpus 4 llm/pretrain.py                                   # cpu-demo model on data/pretrain
    deepspeed --num_gpus 8 llm/pretrain.py --config configs/pretrain/350M-2k.yaml --data data/web
    torchrun --nproc_per_node 2 llm/pretrain.py --config configs/pretrain/debug.yaml --train.max_steps 50
    python llm/pretrain.py --config configs/pretrain/cpu-demo.yaml --train.resume auto   # one process

Multi-node: a hostfile (`node0 slots=8` / `node1 slots=8`) and `deepspeed --hostfile hostfile llm/pretrain.py ...`
from node0 (passwordless ssh), or without ssh one launcher per node:

    deepspeed --hostfile hostfile --no_ssh --node_rank 0 --master_addr node0 --master_port 29500 llm/pretrain.py ...
    deepspeed --hostfile hostfile --no_ssh --node_rank 1 --master_addr node0 --master_port 29500 llm/pretrain.py ...

(two "nodes" on one machine: `slots=1` each and `--master_addr 127.0.0.1`; tests/test_pretrain.py does that).

The model is a preset of llm/config.py with optional field overrides (`--model.dim 768`); its vocabulary and
special ids come from the data's tokenizer (meta.json). The loop, checkpoints and logging are llm/train/;
the task is llm/tasks/lm.py.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import yaml

from llm.cli import defaults_from, run_cli
from llm.errors import UserError
from llm.config import ModelArgs
from llm.corpora import DEMO_DATA
from llm.train import TrainConfig, dist, fit, preflight

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs/pretrain/cpu-demo.yaml"


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


@defaults_from(DEFAULT_CONFIG)
def main(preset: str = "cpu-demo", model: Optional[dict[str, Any]] = None, data: str = DEMO_DATA,
         tokenizer: Optional[str] = None, seq_len: Optional[int] = None, train: TrainConfig = TrainConfig()) -> dict:
    """Pretrain a model on DATA/{train,val}_*.bin (tools/prepare_data.py); returns the run's summary.

    Args:
        preset: model size from llm/config.py (debug, cpu-demo, 25M, 125M, 350M, 1B).
        model: ModelArgs fields overriding the preset, e.g. --model.dim 768 or --model '{n_layers: 12}'.
        data: directory with meta.json and the token shards.
        tokenizer: tokenizer.model / tokenizer.json; default the one recorded in DATA/meta.json (must match it).
        seq_len: training context in tokens; default the model's max_seq_len.
        train: the training loop's settings (llm.train.TrainConfig). On the command line the defaults are
            configs/pretrain/cpu-demo.yaml's, with the precision picked by the device (bf16 on GPU, fp32 on CPU).
    """
    import torch

    from llm.data import check_tokenizer, read_meta
    from llm.model import Transformer
    from llm.tasks.lm import LanguageModelTask, shard_splits
    from llm.tasks.zero3 import partitioned_transformer
    from llm.tokenizer import Tokenizer

    data_dir = Path(data)
    if not (data_dir / "meta.json").is_file():
        how = ("`python tools/train_tokenizer.py` then `python tools/prepare_data.py`" if data == DEMO_DATA
               else f"`python tools/prepare_data.py --inputs YOUR_TEXT --out {data}`")
        raise UserError(f"{data_dir / 'meta.json'}: not found — the pretraining data is not prepared; create it "
                        f"with {how}")
    meta = read_meta(data_dir)
    tok_path = tokenizer or meta.get("tokenizer")
    tok = None
    if tok_path and Path(tok_path).exists():
        tok = Tokenizer.from_file(tok_path)  # a tokenizer.model / tokenizer.json, or the folder holding it
    elif tokenizer:
        raise UserError(f"--tokenizer {tokenizer}: no such file or folder")
    else:
        dist.log(f"warning: {data_dir / 'meta.json'} names tokenizer {tok_path}, which does not exist here — no "
                 "samples during training and no tokenizer in final/ (pass --tokenizer)")
    args = model_args(preset, model, meta, tok)
    check_tokenizer(meta, args.vocab_size, tok, data_dir)
    seq_len = seq_len or args.max_seq_len
    if not 1 <= seq_len <= args.max_seq_len:
        raise UserError(f"--seq_len {seq_len}: must be in [1, model max_seq_len={args.max_seq_len}] — raise "
                        "--model.max_seq_len or lower --seq_len")
    plan = preflight(train)
    train_split, val_split = shard_splits(data, seq_len, train.seed, args.vocab_size, tok,
                                          world_size=plan.world_size)
    if dist.is_main():
        print(f"baseline: the unigram entropy of {data_dir} train is {train_split.dataset.unigram_entropy():.3f} "
              "nats/token (a model that ignores context); the val loss should end well below it")
    if plan.zero_stage == 3:
        net = partitioned_transformer(args, plan.ds_config, train.seed)
    else:
        torch.manual_seed(train.seed)  # identical initial weights on every rank
        net = Transformer(args)
    return fit(LanguageModelTask(net, train_split, val_split, tok, data=data), train)


if __name__ == "__main__":
    run_cli(main)

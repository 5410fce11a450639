"""Training throughput: our Transformer vs transformers' LlamaForCausalLM, one DeepSpeed step each, same config.

Both models get the same shape and initial weights, the same DeepSpeed engine config (ZeRO stage, precision,
micro batch, clipping, torch AdamW) and the same batches; the loss is the same float32 cross entropy on the
logits. Four engines: ours at our defaults (`train.compile` auto: every decoder block compiled, as a training run
of minutes does), transformers at its defaults (eager), and for reference ours eager and transformers compiled
(`torch.compile` of the whole model, what its Trainer's `torch_compile=True` does). Compilation happens in the
untimed warm-up steps and is reported apart. Timed blocks of `steps` optimizer steps alternate between the engines
(`repeats` times) and the medians are compared. On a GPU it also prints MFU (model FLOPs per token x tokens/s over
the GPU's dense bf16 peak) and peak memory.

    python bench/train.py                                    # cpu-demo shape on CPU
    deepspeed --num_gpus 1 bench/train.py --preset 125M --micro_batch_size 16 --precision bf16
    python bench/train.py --preset 350M --seq_len 2048 --micro_batch_size 4 --ds_config zero3

The last line is `ratio: X.XX` (ours at our defaults over transformers at its defaults, tokens/s; higher is better).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from llm.cli import run_cli
from llm.config import ModelArgs
from llm.model import Transformer
from llm.compile import compile_model
from llm.tasks.lm import lm_loss
from llm.train import TrainConfig, preflight
from llm.train.dist import init_distributed
from llm.train.metrics import memory_gb, peak_flops
from llm.train.plan import lr_scheduler, make_optimizer


def engine_for(model, cfg: TrainConfig, ds_config: dict):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg), config=ds_config,
                                      lr_scheduler=lambda o: lr_scheduler(o, cfg))
    return engine


def hf_loss(engine, batch) -> torch.Tensor:
    logits = engine(input_ids=batch["input_ids"]).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())


def bench(preset: str = "cpu-demo", seq_len: Optional[int] = None, micro_batch_size: int = 8,
          ds_config: str = "zero1", precision: Optional[Literal["bf16", "fp16", "fp32"]] = None,
          activation_checkpointing: bool = False, steps: int = 3, repeats: int = 5, warmup: int = 2,
          timer: Literal["wall", "cpu"] = "wall") -> float:
    """Time training steps of both implementations.

    Args:
        preset: model shape (llm/config.py presets).
        seq_len: tokens per sequence (default the preset's max_seq_len).
        micro_batch_size: sequences per step.
        ds_config: ZeRO config in ds_configs/.
        precision: bf16 / fp16 / fp32 (default bf16 on GPU, fp32 on CPU).
        activation_checkpointing: recompute layers in backward (both models).
        steps: optimizer steps per timed block.
        repeats: timed blocks per model (alternating).
        warmup: untimed steps per model first.
        timer: wall clock, or this process's CPU time (steadier on a CPU shared with other jobs).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    args = ModelArgs.from_preset(preset)
    seq_len = seq_len or args.max_seq_len
    cfg = TrainConfig(run_dir="/tmp/bench-train", ds_config=ds_config, micro_batch_size=micro_batch_size,
                      precision=precision, lr=1e-4, min_lr=1e-5, warmup_steps=0, max_steps=10**6, resume="auto")
    plan = preflight(cfg)
    plan.ds_config.pop("tensorboard")
    _, world, device = init_distributed()
    torch.manual_seed(0)
    ours = Transformer(args)
    hf = LlamaForCausalLM(LlamaConfig(**args.to_hf_config(), attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if activation_checkpointing:
        ours.gradient_checkpointing = True
        hf.gradient_checkpointing_enable()
    ours_eager, hf_compiled = copy.deepcopy(ours), copy.deepcopy(hf)
    compile_model(ours)  # our default for a run this long (train.compile=auto)
    hf_compiled.compile()
    engines = {"ours": (engine_for(ours, cfg, plan.ds_config), lm_loss),
               "transformers": (engine_for(hf, cfg, plan.ds_config), hf_loss),
               "ours (eager)": (engine_for(ours_eager, cfg, plan.ds_config), lm_loss),
               "transformers (compiled)": (engine_for(hf_compiled, cfg, plan.ds_config), hf_loss)}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (micro_batch_size, seq_len + 1), generator=g)
    batch = {"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}

    clock = time.perf_counter if timer == "wall" else time.process_time

    def run(name: str, n: int) -> float:
        engine, loss_fn = engines[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = clock()
        for _ in range(n):
            engine.backward(loss_fn(engine, batch))
            engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return micro_batch_size * seq_len * world * n / (clock() - t)

    warmup_s = {}
    for name in engines:
        t = time.perf_counter()
        run(name, warmup)
        warmup_s[name] = time.perf_counter() - t
    rates = {name: [] for name in engines}
    for _ in range(repeats):
        for name in engines:
            rates[name].append(run(name, steps))
    med = {name: statistics.median(r) for name, r in rates.items()}
    peak = peak_flops(device)
    print(f"{preset}: {args.n_params / 1e6:.1f}M parameters, seq {seq_len}, micro batch {micro_batch_size}, "
          f"{plan.precision}, ZeRO-{plan.zero_stage}, {world} rank(s) on {device.type}, "
          f"{torch.get_num_threads()} threads")
    for name, r in med.items():
        mfu = f", MFU {args.flops_per_token(seq_len) * r / (peak * world):.1%}" if peak else ""
        print(f"{name:>24}: {r:,.0f} tokens/s (median of {repeats} x {steps} steps, {timer} time{mfu}; "
              f"{warmup} warm-up steps incl. compilation {warmup_s[name]:.1f} s)")
    print(f"peak memory (rank 0, all engines): {memory_gb(device):.2f} GB")
    print(f"both eager: {med['ours (eager)'] / med['transformers']:.2f}; both compiled: "
          f"{med['ours'] / med['transformers (compiled)']:.2f}")
    ratio = med["ours"] / med["transformers"]
    print(f"ratio: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    run_cli(bench)

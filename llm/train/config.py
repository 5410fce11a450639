"""The training settings (`TrainConfig`, the `train:` section of every config YAML) and where a run is
(`TrainState`, saved in each checkpoint)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Training settings shared by pretraining and SFT (YAML: the `train:` section of configs/*/*.yaml)."""

    run_dir: str = "runs/demo"
    """Output directory: checkpoints/, final/, metrics.csv, loss.png, tensorboard/, samples.txt."""
    ds_config: str = "zero1"
    """DeepSpeed ZeRO config: a name in ds_configs/ (zero0, zero1, zero2, zero3, zero2_offload, zero3_offload)
    or a path to a JSON file."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward."""
    grad_accum: int = 1
    """Micro batches accumulated per optimizer step (ignored when global_batch_size is set)."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all ranks, the same on any number of ranks: grad_accum is derived from it,
    and micro_batch_size lowered to the largest value where world size x micro batch divides it (one log line)."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    min_lr: float = 1e-4
    """Floor of the cosine decay, reached at max_steps."""
    warmup_steps: int = 100
    """Linear warmup from lr/warmup_steps to lr."""
    max_steps: int = 1000
    """Optimizer steps of the whole run (the cosine schedule spans them)."""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    decay_embeddings: bool = False
    """Apply weight decay to embedding tables too (norms and biases never decay)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    precision: Optional[Literal["bf16", "fp16", "fp32"]] = None
    """bf16, fp16 (dynamic loss scaling; GPU only) or fp32; None = bf16 on a GPU, fp32 on CPU."""
    save_dtype: Optional[Literal["fp32", "bf16", "fp16"]] = None
    """dtype of the weights in final/ (consolidated in fp32, then cast); None = the training precision."""
    activation_checkpointing: bool = False
    """Recompute each layer in the backward pass (less memory, ~30% more compute)."""
    compile: Union[bool, Literal["auto"]] = "auto"
    """torch.compile the model (`compile_model`; the same results within float tolerance). auto = on when the run
    is long enough to repay compilation (llm.compile.TRAIN_COMPILE_MIN_TOKENS) and the platform can compile (a C++ compiler on CPU,
    Triton on GPUs); true = always (a warning and eager where it cannot); false = never."""
    seed: int = 0
    """Seed of the data order (and of the RNGs, restored exactly on resume)."""
    log_every: int = 10
    """Steps between log lines / metrics.csv rows / TensorBoard points."""
    eval_every: int = 200
    """Steps between evaluations (val loss, bits per byte, samples); also at the end."""
    eval_batches: int = 20
    """Micro batches per rank in each evaluation."""
    eval_at_start: bool = False
    """Also evaluate before the first step of a new run: the baseline that fine-tuning should improve on."""
    sample_prompts: list[str] = field(default_factory=lambda: ["ROMEO:", "The king", "中国", "春风"])
    """Prompts greedily continued at each evaluation (needs a tokenizer), so a degenerate model shows early."""
    sample_tokens: int = 32
    sample_temperature: float = 0.8
    """> 0 samples with top-k 50 and a fixed seed (the same draw on every rank); 0 = greedy (loops early in
    training even when the model is fine)."""
    save_every: int = 500
    """Steps between checkpoints; also at the end and on SIGTERM/SIGINT."""
    keep_checkpoints: int = 2
    """Keep only the newest K checkpoints."""
    resume: Optional[str] = None
    """"auto" = continue from the newest valid checkpoint in run_dir (fresh start if there is none), or the path
    of a checkpoint (run_dir/checkpoints/step_N)."""
    max_bad_steps: int = 5
    """Stop the run after this many steps in a row with a non-finite loss or gradient (each one is skipped)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint's trainer_state.json."""

    step: int = 0
    tokens: int = 0
    epoch: int = 0
    index: int = 0  # examples of this rank's epoch already consumed (the same count on every rank)
    skipped_steps: int = 0
    elapsed_s: float = 0.0



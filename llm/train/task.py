"""The contract between the training loop and what it trains.

A `Task` holds the model, its training and validation data, and says how to batch, score, freeze, report and
export them; `llm.train.fit(task, cfg)` calls these and nothing else (it never imports the model, the
tokenizer or generation). Tasks: language modelling on shards or chats (`llm.tasks.lm`), LoRA / LongLoRA on top of
it (`llm.tasks.lora`), sequence classification (`llm.tasks.classify`). A new kind of training is one new module
with a subclass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from llm.train.config import TrainConfig
from llm.train.sampler import Split


class Task:
    """What a run trains and how. Subclasses set `model` and `train_split` (and `val_split`) and implement
    `loss` and `export`; the other methods have working defaults."""

    model: nn.Module
    """The module DeepSpeed wraps: identical initial weights on every rank (seed before building it)."""
    train_split: Split
    val_split: Optional[Split] = None

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        """Items of the datasets -> a batch dict (needs `input_ids`: its numel counts the tokens)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss of a batch; `model` is the DeepSpeed engine around `self.model`."""
        raise NotImplementedError

    def extra_val_splits(self) -> dict[str, Split]:
        """Further validation sets, evaluated beside `val_split` with the same `collate` and `loss`: each evaluation
        logs `val_<name>_loss` and `val_<name>_ppl` (e.g. "pretrain": the pretraining text during SFT)."""
        return {}

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        """Which parameters train (the rest are frozen before the optimizer is built)."""
        return True

    def count_correct(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """Items of the batch labelled right (classifiers): evaluations then log val_accuracy. None: no accuracy."""
        return None

    def flops_per_token(self, seq_len: int) -> Optional[float]:
        """Training FLOPs per token with every weight trained (6N + attention), for MFU; None: not reported."""
        return None

    def record(self) -> dict:
        """What each checkpoint records besides the loop's state (model config, tokenizer path): checked on
        resume (`model_config`) and used to convert a checkpoint without the task (llm.hf_format.from_deepspeed)."""
        return {}

    def samples(self, module: nn.Module, cfg: TrainConfig, same_length: bool) -> dict[str, str]:
        """Continuations of cfg.sample_prompts by `module` (the engine's module), shown at each evaluation;
        `same_length`: every rank must decode the same number of steps (ZeRO-3 gathers weights collectively)."""
        return {}

    def compile(self) -> str:
        """torch.compile the model for training (llm.compile.compile_model); returns what was compiled."""
        from llm.compile import compile_model

        return compile_model(self.model)

    def export(self, state_dict: dict[str, torch.Tensor], final: Path, dtype: torch.dtype):
        """Write the trained model to `final` from the consolidated fp32 `state_dict`, weights in `dtype`
        (train.save_dtype, else the training precision); rank 0 only."""
        raise NotImplementedError

"""When `torch.compile` can run here, and the one switch every CLI uses for it (`auto` / `true` / `false`).

Inductor writes C++ (CPU) or Triton (CUDA) kernels: without a C++ compiler, or without Triton on a GPU, compiling
fails deep inside the first forward. `compile_problem` finds that up front, so a requested compile turns into one
warning line and the eager path instead of a crash.
"""
from __future__ import annotations

import functools
import os
import shutil
from typing import Literal, Optional, Union


CompileSetting = Literal["auto", "true", "false"]


@functools.cache
def compile_problem(device_type: str = "cpu") -> Optional[str]:
    """Why torch.compile cannot run on `device_type` here (one line), or None when it can."""
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (pip install triton)"
        return None
    if device_type != "cpu":
        return f"no inductor backend for {device_type}"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None and shutil.which("c++") is None:
        return f"no C++ compiler ({cxx}) on PATH (apt-get install g++)"
    return None


def resolve(setting: Union[CompileSetting, bool, None], device_type: str, pays: bool, warn=print) -> bool:
    """The compile decision: `true` unless it cannot run (then one warning), `false`, or `auto` = on when it can
    run and `pays` (the caller's judgement that the work repays compilation)."""
    setting = {None: "auto", True: "true", False: "false"}.get(setting, setting)
    if setting == "false":
        return False
    problem = compile_problem(device_type)
    if problem is not None:
        if setting == "true":
            warn(f"warning: compile requested but {problem} — running eagerly")
        return False
    return setting == "true" or pays


# Tokens a run must still train on for compile=auto to switch compilation on: compiling the model's forward and
# backward takes ~30-60 s on a 2-core CPU (a minute or two on a GPU) and saves ~15-20% of every later step.
TRAIN_COMPILE_MIN_TOKENS = {"cpu": 1_000_000, "cuda": 50_000_000}


def compile_model(model) -> str:
    """torch.compile `model` in place for training; returns what was compiled. Our Transformer is compiled whole
    (one graph from the embedding to the logits: on 2 CPU threads ~10% faster than block by block, as fast as
    transformers' model compiled whole); inside wrappers that call its methods rather than the module (peft's
    LoRA calls `.forward`, the classifier `.hidden_states`) each decoder block is compiled instead (torchtitan's
    per-block compile: one graph reused by every block). The engine keeps calling the same modules, and the
    parameter names do not change (checkpoints and resume are unaffected)."""
    from llm.model import DecoderLayer, Transformer

    if isinstance(model, Transformer):
        model.compile()
        return "the model"
    blocks = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    for block in blocks:
        block.compile()
    return f"{len(blocks)} decoder blocks"

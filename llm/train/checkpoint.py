"""Checkpoints for resuming: DeepSpeed's sharded `save_checkpoint` plus every rank's RNG state and our
trainer_state.json, written last — its presence (with the sizes of every file it lists) marks a checkpoint
complete, so a crash while saving leaves the previous one the newest valid. Also the fp32 consolidation the final
model is written from (DeepSpeed's zero_to_fp32)."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from llm import writer
from llm.errors import UserError
from llm.train.config import TrainConfig, TrainState

STATE_FILE = "trainer_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete
TAG = re.compile(r"^step_(\d+)$")


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def checkpoint_problem(tag_dir: Path) -> Optional[str]:
    """Why tag_dir is not a usable checkpoint (None if it is): no trainer_state.json (interrupted save), or a
    file missing / of another size than recorded (truncated)."""
    state_file = tag_dir / STATE_FILE
    if not state_file.is_file():
        return f"no {STATE_FILE} (the save was interrupted)"
    try:
        files = json.loads(state_file.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"{STATE_FILE} unreadable ({e})"
    for name, size in files.items():
        f = tag_dir / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} expected (truncated)"
    return None


def find_checkpoint(path: str | os.PathLike, warn: Callable[[str], None] = print) -> Optional[Path]:
    """The newest valid checkpoint under `path` (a run dir, its checkpoints/ dir, or one step_N dir); invalid
    newer ones are skipped with a warning. None when there is no checkpoint at all; UserError when every one
    is broken."""
    path = Path(path)
    if TAG.match(path.name):
        if (why := checkpoint_problem(path)) is not None:
            raise UserError(f"{path}: not a usable checkpoint — {why}")
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    tags = sorted((p for p in path.glob("step_*") if p.is_dir() and TAG.match(p.name)),
                  key=lambda p: int(TAG.match(p.name).group(1)), reverse=True) if path.is_dir() else []
    for tag in tags:
        if (why := checkpoint_problem(tag)) is None:
            return tag
        warn(f"warning: skipping checkpoint {tag}: {why}")
    if tags:
        raise UserError(f"{path}: no valid checkpoint ({len(tags)} found, all incomplete or corrupt) — start a new run "
                        "without --train.resume, or restore a checkpoint")
    return None


def consolidated_state_dict(tag_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 full state dict of a checkpoint, by DeepSpeed's zero_to_fp32 (ZeRO 1-3) or its module file (ZeRO-0)."""
    if zero_stage == 0:
        sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if zero_stage == 1:  # ZeRO-1 keeps frozen parameters (LoRA's base weights) only in the module states
        module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False,
                            mmap=True)["module"]
        for k, v in module.items():
            if k not in sd:
                sd[k] = v.float() if v.is_floating_point() else v
    return sd


def check_resumable(meta: dict, tag: Path, plan, seq_len: int, record: dict, bucketed: bool):
    """The checkpoint `meta` can be continued by this run: same ranks, ZeRO stage, model, and data geometry (the
    saved data position counts examples of a given length in steps of a given global batch)."""
    if meta["world_size"] != plan.world_size:
        raise UserError(f"{tag}: written by {meta['world_size']} rank(s), resumed with {plan.world_size} — resume "
                        "with the same number of ranks, or convert it (tools/convert.py from_deepspeed) and start "
                        "a new run from the Hugging Face directory")
    if meta["zero_stage"] != plan.zero_stage:
        raise UserError(f"{tag}: written with ZeRO-{meta['zero_stage']}, resumed with ZeRO-{plan.zero_stage} — "
                        f"use the same ds_config (ds_configs/zero{meta['zero_stage']}.json)")
    now = {"global_batch_size": plan.global_batch_size, "seq_len": seq_len}
    if bucketed:  # length-bucketed batches are formed per micro batch: its size decides the order
        now["micro_batch_size"] = plan.micro_batch_size
    diff = [f"{k} {meta[k]} -> {v}" for k, v in now.items() if meta.get(k, v) != v]
    if diff:
        raise UserError(f"{tag}: the data position was saved for another batch geometry ({', '.join(diff)}) — "
                        "resume with the checkpoint's settings, or start a new run from its model "
                        "(tools/convert.py from_deepspeed)")
    old, new = meta.get("model_config"), record.get("model_config")
    if old is not None and new is not None:
        diff = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
        if diff:
            raise UserError(f"{tag}: the checkpoint's model differs in {', '.join(diff)} — resume with the same "
                            "model settings")


def save_checkpoint(engine, cfg: TrainConfig, plan, state: TrainState, seq_len: int, record: dict, is_main: bool):
    """DeepSpeed's sharded checkpoint + every rank's RNG state + trainer_state.json (written last: the marker of
    a complete checkpoint; `record` adds what the task needs to rebuild its model), then prune to the newest
    `keep_checkpoints`."""
    root = Path(cfg.run_dir) / "checkpoints"
    tag = tag_name(state.step)
    if is_main and (root / tag).exists():  # left by an interrupted run that got this far
        shutil.rmtree(root / tag)
    torch.distributed.barrier()
    engine.save_checkpoint(str(root), tag=tag)
    rank = torch.distributed.get_rank()
    tmp = root / tag / f".rng_rank{rank}.pt.tmp"
    torch.save(rng_state(), tmp)
    os.replace(tmp, root / tag / f"rng_rank{rank}.pt")
    torch.distributed.barrier()
    if is_main:
        files = {str(p.relative_to(root / tag)): p.stat().st_size for p in sorted((root / tag).rglob("*"))
                 if p.is_file()}
        meta = {"state": dataclasses.asdict(state), "world_size": plan.world_size, "zero_stage": plan.zero_stage,
                "precision": plan.precision, "save_dtype": cfg.save_dtype or plan.precision,
                "micro_batch_size": plan.micro_batch_size, "global_batch_size": plan.global_batch_size, "seq_len": seq_len,
                **record, "train_config": dataclasses.asdict(cfg),
                "files": files}
        writer.replace_text(root / tag / STATE_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        tags = sorted((p for p in root.glob("step_*") if TAG.match(p.name)), key=lambda p: int(TAG.match(p.name)[1]))
        complete = [p for p in tags if (p / STATE_FILE).is_file()]
        for p in tags:
            if p not in complete[-cfg.keep_checkpoints:] and int(TAG.match(p.name)[1]) < state.step:
                shutil.rmtree(p, ignore_errors=True)
    torch.distributed.barrier()

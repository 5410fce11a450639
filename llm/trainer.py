"""The one training loop of the toolkit (pretraining and SFT), on DeepSpeed ZeRO 0-3 (Rajbhandari et al. 2020).

`train(model, train_ds, val_ds, cfg)` wraps the model with `deepspeed.initialize`: the ZeRO settings come from a
JSON file in `ds_configs/` (no "auto" values), while micro batch, accumulation, global batch, clipping and
precision come from `TrainConfig` and are written into the DeepSpeed config here — one source of truth. The
optimizer is torch's AdamW (decoupled weight decay, Loshchilov & Hutter 2019) with no decay on norms, biases and
embeddings; the schedule is torch's LinearLR warmup followed by CosineAnnealingLR down to `min_lr` (SGDR's
cosine, Loshchilov & Hutter 2017). Gradient accumulation, all-reduce and clipping are DeepSpeed's.

Around the loop: evaluation (val loss, bits per byte, greedy samples), logging (rank-0 tqdm, a log line with
loss / lr / grad-norm / tokens/s / MFU / memory, TensorBoard through DeepSpeed's monitor, metrics.csv, loss.png),
checkpoints (DeepSpeed `save_checkpoint` plus our state; a checkpoint counts only once `trainer_state.json` is
written last, so a crash while saving leaves the previous one the newest valid), exact resume, SIGTERM/SIGINT ->
checkpoint and clean exit, non-finite steps skipped, and at the end `run_dir/final`: a Hugging Face Llama
directory from DeepSpeed's own fp32 consolidation (`zero_to_fp32`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.cli import UserError
from llm.compile import resolve as resolve_compile
from llm.rundir import holds_run_lock

DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete
TAG = re.compile(r"^step_(\d+)$")
# The trainer owns these DeepSpeed keys; a ds_configs file that sets them would be a second source of truth.
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "optimizer", "scheduler")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense bf16/fp16 tensor-core peak TFLOPS per GPU (NVIDIA datasheets, without sparsity), matched in this order
# against torch.cuda.get_device_name(): PCIe / NVL variants before the generic (SXM) name they contain.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H200 NVL", 835), ("H800 PCIe", 756), ("H100", 989),
                   ("H200", 989), ("H800", 989),
                   ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("A10G", 70),
                   ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71), ("RTX A6000", 155), ("V100", 125))


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
    is long enough to repay compilation (COMPILE_MIN_TOKENS) and the platform can compile (a C++ compiler on CPU,
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


# ----------------------------------------------------------------------------------------------- configuration
@dataclass
class Plan:
    """What preflight resolved: batch shape, precision and the DeepSpeed config dict."""

    world_size: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    precision: str
    zero_stage: int
    ds_config: dict
    ds_config_path: Path


def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def ds_config_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".json" or os.sep in name:
        if not p.is_file():
            raise UserError(f"ds_config {name}: no such file — pass a JSON file or one of "
                            f"{', '.join(sorted(f.stem for f in DS_CONFIGS.glob('*.json')))}")
        return p
    p = DS_CONFIGS / f"{name}.json"
    if not p.is_file():
        raise UserError(f"ds_config {name!r}: unknown — choose one of "
                        f"{', '.join(sorted(f.stem for f in DS_CONFIGS.glob('*.json')))} or give a JSON file path")
    return p


def _find_auto(obj, path="") -> Optional[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if (hit := _find_auto(v, f"{path}.{k}" if path else k)) is not None:
                return hit
    return path if obj == "auto" else None


def load_ds_config(name: str) -> tuple[dict, Path]:
    """The ZeRO config file, parsed and checked (no "auto", no keys the trainer owns, a valid ZeRO section)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    path = ds_config_path(name)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}) — fix the file") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: the top level must be a JSON object")
    if (where := _find_auto(cfg)) is not None:
        raise UserError(f"{path}: {where} is \"auto\" — give a number (batch sizes, accumulation, lr and precision "
                        "come from the training config)")
    for key in OWNED_KEYS:
        if key in cfg:
            raise UserError(f"{path}: sets {key!r} — remove it: the trainer writes batch sizes, clipping, the "
                            "optimizer (AdamW) and the lr schedule from the training config")
    for key in ("bf16", "fp16"):
        if isinstance(cfg.get(key), dict) and "enabled" in cfg[key]:
            raise UserError(f"{path}: {key}.enabled is set — remove it: precision comes from train.precision")
    zero = cfg.get("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise UserError(f"{path}: zero_optimization.stage is {zero.get('stage')!r} — use 0, 1, 2 or 3")
    try:
        DeepSpeedZeroConfig(**zero)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError lists the offending fields
        msg = " ".join(str(e).split())
        raise UserError(f"{path}: zero_optimization is not valid for DeepSpeed ({msg[:300]})") from None
    return cfg, path


def preflight(cfg: TrainConfig, world_size: Optional[int] = None) -> Plan:
    """Check everything that can be checked before any compute; one clear UserError per problem. Every rank
    checks the same settings: rank 0 raises the UserError (printed once by the CLI), the others exit 2 quietly."""
    try:
        return _plan(cfg, world_size or int(os.environ.get("WORLD_SIZE", "1")))
    except UserError:
        if _is_main_process():
            raise
        raise SystemExit(2) from None


def batch_shape(global_batch: int, micro: int, world_size: int) -> tuple[int, int]:
    """(micro batch, accumulation) giving `global_batch` sequences per step on `world_size` ranks: the configured
    micro batch when world x micro divides the global batch, else the largest micro batch below it that does."""
    if global_batch < 1:
        raise UserError(f"train.global_batch_size={global_batch}: must be >= 1 (or null: micro batch x ranks x "
                        "grad_accum)")
    if global_batch < world_size or global_batch % world_size:
        lower, higher = max(1, global_batch // world_size) * world_size, (global_batch // world_size + 1) * world_size
        raise UserError(f"train.global_batch_size={global_batch} cannot be split evenly over {world_size} ranks — "
                        f"set it to a multiple of the world size (e.g. {lower} or {higher})")
    per_rank = global_batch // world_size
    micro = max(m for m in range(1, min(micro, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


_SAID: set[str] = set()


def _say_once(msg: str):
    """Print on rank 0, once per process: preflight runs in the entry point and again in train()."""
    if _is_main_process() and msg not in _SAID:
        _SAID.add(msg)
        print(msg)


def _plan(cfg: TrainConfig, world_size: int) -> Plan:
    mb = cfg.micro_batch_size
    if mb < 1 or cfg.grad_accum < 1:
        raise UserError(f"train.micro_batch_size={mb}, train.grad_accum={cfg.grad_accum}: both must be >= 1")
    if cfg.global_batch_size is not None:  # the config fixes the global batch: micro batch and accumulation follow
        mb, accum = batch_shape(cfg.global_batch_size, mb, world_size)
        if mb != cfg.micro_batch_size:
            _say_once(f"train.global_batch_size={cfg.global_batch_size} on {world_size} rank(s): micro batch "
                      f"{cfg.micro_batch_size} -> {mb} (the largest that divides it), grad_accum {accum} "
                      f"({mb} x {accum} x {world_size} = {cfg.global_batch_size})")
    else:
        accum = cfg.grad_accum
    if cfg.max_steps < 1:
        raise UserError(f"train.max_steps={cfg.max_steps}: must be >= 1")
    if not 0 < cfg.lr < 1:
        raise UserError(f"train.lr={cfg.lr}: expected 0 < lr < 1 (typical: 1e-4 .. 3e-3)")
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise UserError(f"train.min_lr={cfg.min_lr}: must lie in [0, lr={cfg.lr}]")
    if not 0 <= cfg.warmup_steps < cfg.max_steps:
        raise UserError(f"train.warmup_steps={cfg.warmup_steps}: must be >= 0 and below max_steps={cfg.max_steps}")
    for name in ("log_every", "eval_every", "save_every", "keep_checkpoints", "max_bad_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"train.{name}={getattr(cfg, name)}: must be >= 1")
    precision = cfg.precision or ("fp32" if on_cpu() else "bf16")
    if precision == "bf16" and not on_cpu() and not torch.cuda.is_bf16_supported():
        _say_once(f"warning: this GPU ({torch.cuda.get_device_name()}) has no bf16 — training in fp16 with dynamic "
                  "loss scaling instead (set train.precision to fp16 or fp32 to choose)")
        precision = "fp16"
    if precision == "fp16" and on_cpu():
        raise UserError("train.precision=fp16 needs a GPU (DeepSpeed's loss scaler) — use bf16 or fp32 on CPU")
    ds, path = load_ds_config(cfg.ds_config)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    check_run_dir(cfg)
    ds.update({
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": accum,
        "train_batch_size": mb * accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_allow_untested_optimizer": True,  # torch AdamW: no JIT-built fused kernel needed
        "steps_per_print": 1 << 62,  # our own log line instead
        "bf16": {**ds.get("bf16", {}), "enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"loss_scale": 0, "initial_scale_power": 16, **ds.get("fp16", {}), "enabled": precision == "fp16"},
        "tensorboard": {"enabled": True, "output_path": str(Path(cfg.run_dir) / "tensorboard"), "job_name": "train"},
    })
    if precision == "bf16" and accum > 1 and stage == 2:
        # Sum the micro batches' gradients in fp32, not bf16 (8 mantissa bits lose small gradients): DeepSpeed 0.19's
        # ZeRO-2 optimizer keeps fp32 accumulation buffers. ZeRO-0 rejects the mix, ZeRO-3 ignores it, and ZeRO-1
        # swaps in its BF16_Optimizer, which hung at the end of a 2-rank CPU run here (left off: ZeRO-1 bf16
        # accumulates in bf16).
        ds["data_types"] = {**ds.get("data_types", {}), "grad_accum_dtype": "fp32"}
    return Plan(world_size, mb, accum, mb * accum * world_size, precision, stage, ds, path)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def check_run_dir(cfg: TrainConfig):
    """A run directory that holds another run's checkpoints or final model is not overwritten unless resuming."""
    run = Path(cfg.run_dir)
    ckpts = run / "checkpoints"
    taken = (ckpts.is_dir() and any(ckpts.iterdir())) or (run / "final").exists()
    if taken and cfg.resume is None:
        raise UserError(f"{run}: already holds a run (checkpoints/ or final/) — pass --train.resume auto to continue "
                        "it, or choose another --train.run_dir")
    if run.exists() and not run.is_dir():
        raise UserError(f"{run}: exists and is not a directory — choose another --train.run_dir")


# ----------------------------------------------------------------------------------------------- optimizer
def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """AdamW groups: weight decay on matrices; none on norms and biases (1-D) nor, unless asked, embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters appear once
        if not p.requires_grad:
            continue
        # ds_shape: the full shape of a parameter ZeRO-3 holds partitioned (created under zero.Init: p is empty)
        if len(getattr(p, "ds_shape", p.shape)) < 2 or (id(p) in embeddings and not decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """torch AdamW over `param_groups`, the fused kernel (CPU and CUDA): DeepSpeed takes it as a client
    optimizer, so nothing is JIT-compiled."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.decay_embeddings), lr=cfg.lr,
                             betas=tuple(cfg.betas), eps=cfg.adam_eps, fused=True)


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup (lr/W, 2lr/W, ..., lr over the first W steps), then cosine from lr to min_lr at max_steps."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    W = cfg.warmup_steps
    cosine = CosineAnnealingLR(optimizer, T_max=cfg.max_steps - W, eta_min=cfg.min_lr)
    if W == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=1.0 / W, end_factor=1.0, total_iters=max(W - 1, 1))
    return SequentialLR(optimizer, [warmup, cosine], milestones=[W])


# Tokens a run must still train on for compile=auto to switch compilation on: compiling the model's forward and
# backward takes ~30-60 s on a 2-core CPU (a minute or two on a GPU) and saves ~15-20% of every later step.
COMPILE_MIN_TOKENS = {"cpu": 1_000_000, "cuda": 50_000_000}


def compile_model(model: nn.Module) -> str:
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


# ----------------------------------------------------------------------------------------------- distributed
def visible_gpus() -> int:
    """NVIDIA GPUs this process is meant to use: those `nvidia-smi -L` lists, none when CUDA_VISIBLE_DEVICES hides
    them all ("" or "-1"). (DeepSpeed's launcher sets CUDA_VISIBLE_DEVICES on CPU ranks too: alone it proves
    nothing.)"""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip()
    if hidden == "" or hidden.startswith("-"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return torch.cuda.device_count()
    return max(sum(line.startswith("GPU ") for line in out.splitlines()), torch.cuda.device_count())


def check_accelerator():
    """Refuse to train on the CPU by accident: GPUs are visible but DeepSpeed chose the CPU (a CPU-only torch, or
    a CUDA build the driver cannot run). LLM_ALLOW_CPU=1 trains on the CPU deliberately. One line per node."""
    if not on_cpu() or os.environ.get("LLM_ALLOW_CPU") == "1" or (n := visible_gpus()) == 0:
        return
    build = ("is a CPU-only build" if torch.version.cuda is None else
             f"is built for CUDA {torch.version.cuda}, which this driver cannot run (torch.cuda.is_available() is "
             "False)")
    if os.environ.get("LOCAL_RANK", "0") != "0":
        raise SystemExit(2)  # every rank of a node finds the same: its local rank 0 says it
    raise UserError(f"{n} NVIDIA GPU(s) visible (nvidia-smi -L) but torch {torch.__version__} {build}, so DeepSpeed "
                    "would train on the CPU — install the CUDA torch for this driver (bash tools/setup_env.sh), or "
                    "set LLM_ALLOW_CPU=1 to train on the CPU deliberately")


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); gloo on CPU, the accelerator's backend (nccl) otherwise. A plain `python`
    start (no launcher) becomes a world of one. Stops first when GPUs are visible but unusable (check_accelerator)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    check_accelerator()
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        # The shared-memory allreduce op is JIT-compiled (~30 s, needs g++) and can abort ZeRO-3 at exit.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        if "OMP_NUM_THREADS" not in os.environ:  # ranks on one host share its cores
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    if not torch.distributed.is_initialized():
        backend = "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()
        deepspeed.init_distributed(dist_backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def _all_reduce(x: float | torch.Tensor, device, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    t = (x if isinstance(x, torch.Tensor) else torch.tensor(float(x))).detach().to(device, torch.float64).clone()
    torch.distributed.all_reduce(t, op=op)
    return t


def _broadcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------- data
def default_collate(items: list) -> dict[str, torch.Tensor]:
    """(x, y) windows of PretrainDataset -> {"input_ids": (B, T), "labels": (B, T)}."""
    xs, ys = zip(*items)
    return {"input_ids": torch.stack(xs), "labels": torch.stack(ys)}


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross entropy over labels != -100; optional `position_ids` (B, T) and `mask` (a bool
    (B, 1, T, T) mask, or packed documents' (B, T) indices) in the batch are passed to the model (SFT batches)."""
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"), mask=batch.get("mask"))  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)


def _epoch_indices(ds, epoch: int, n: int, seed: int, rank: int, world: int, mb: int = 1) -> list[int]:
    """This rank's example order in `epoch`. A dataset with set_epoch (PretrainDataset) is already sharded and
    ordered per (seed, epoch); any other is shuffled here and dealt out rank by rank. A dataset with `lengths`
    (classification, unpacked SFT: batches padded to their longest item) gets length-bucketed batches of `mb`."""
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(ds), generator=g)
    lengths = getattr(ds, "lengths", None)
    if lengths is None or mb == 1:
        return perm[rank::world][:n].tolist()
    step = mb * world  # one optimizer micro step over all ranks
    pool = 64 * step  # sorted by length within pools of 64 steps, so the order stays random across pools
    perm = perm[: len(perm) // step * step].tolist()
    steps = []
    for s in range(0, len(perm), pool):
        chunk = sorted(perm[s:s + pool], key=lambda i: lengths[i])
        steps += [chunk[b:b + step] for b in range(0, len(chunk), step)]
    order = torch.randperm(len(steps), generator=g).tolist()
    return [i for k in order for i in steps[k][rank * mb:(rank + 1) * mb]][:n]


def _local_len(ds, world: int) -> int:
    return len(ds) if hasattr(ds, "set_epoch") else len(ds) // world


def micro_batches(ds, state: TrainState, n: int, mb: int, collate, seed: int, rank: int, world: int,
                  num_workers: int, device) -> Iterator[dict]:
    """Micro batches forever, epoch after epoch, starting at (state.epoch, state.index); advances them."""
    per_epoch = n // mb * mb
    while True:
        order = _epoch_indices(ds, state.epoch, n, seed, rank, world, mb)[state.index:per_epoch]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order), batch_size=mb, shuffle=False,
                                             drop_last=True, collate_fn=collate, num_workers=num_workers,
                                             pin_memory=device.type == "cuda")
        for batch in loader:
            state.index += mb
            yield {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        state.epoch, state.index = state.epoch + 1, 0


# ----------------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict):
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


def ds_to_hf(checkpoint_dir: str | os.PathLike, dst: str | os.PathLike, dtype: Optional[str] = None,
             tokenizer=None) -> Path:
    """A DeepSpeed checkpoint of this trainer (step_N dir, checkpoints/ or run dir) -> a Hugging Face Llama
    directory. fp32 weights come from DeepSpeed's own consolidation (zero_to_fp32; ZeRO-0 checkpoints hold the
    whole module), are cast to `dtype` (fp32/bf16/fp16; default the training precision) and saved with the
    tokenizer the run used."""
    from llm.config import ModelArgs
    from llm.hf_format import save_model
    from llm.model import Transformer
    from llm.tokenizer import Tokenizer

    tag_dir = find_checkpoint(checkpoint_dir)
    if tag_dir is None:
        raise UserError(f"{checkpoint_dir}: no DeepSpeed checkpoint (step_N directory) found")
    meta = json.loads((tag_dir / STATE_FILE).read_text())
    if meta.get("model_config") is None:
        raise UserError(f"{tag_dir}: the checkpoint records no model config (not a Transformer run)")
    args = ModelArgs.from_hf_config(meta["model_config"])
    sd = consolidated_state_dict(tag_dir, meta["zero_stage"])
    if tokenizer is None and meta.get("tokenizer") and Path(meta["tokenizer"]).is_file():
        tokenizer = Tokenizer.from_file(meta["tokenizer"])
    with torch.device("meta"):
        shell = Transformer(args)  # only its args are used: the tensors come from `sd`
    return save_model(shell, dst, tokenizer=tokenizer, dtype=DTYPES[dtype or meta["save_dtype"]], state_dict=sd)


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


# ----------------------------------------------------------------------------------------------- logging
def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of the GPU, or None (CPU, unknown GPU: MFU is reported as n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in GPU_PEAK_TFLOPS if key in name), None)


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 holds only a partition of it (created under zero.Init)."""
    return getattr(p, "ds_numel", p.numel())


def train_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token for MFU: the model's 6N + attention (ModelArgs.flops_per_token), less the weight
    gradients frozen weights never get: a frozen matrix costs 2 FLOPs/param forward + 2 for the activation
    gradient, a trained one 2 more for its weight gradient (LoRA: most of the model is frozen)."""
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}  # a tied lm_head included
    frozen = sum(numel(p) for p in model.parameters() if not p.requires_grad and id(p) in matrices)
    return model.args.flops_per_token(seq_len) - 2 * frozen


def device_label(device: torch.device) -> str:
    """cpu, or cuda with the GPU's name (what MFU's peak and the kernels depend on)."""
    return f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def attention_kernel(device: torch.device, precision: str) -> str:
    """The attention the model's training forward takes here: flash-attn's when it is importable on CUDA in 16-bit
    (llm.model.flash_ok), else torch's scaled_dot_product_attention."""
    import llm.model

    half = precision in ("bf16", "fp16")
    return "flash-attn" if llm.model.flash_attn_func is not None and device.type == "cuda" and half else "sdpa"


def memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: allocated on the GPU, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


CSV_FIELDS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb", "skipped_steps",
              "val_loss", "val_bpb", "val_accuracy", "elapsed_s")


class Metrics:
    """metrics.csv (one row per log step and per evaluation), TensorBoard through DeepSpeed's monitor, loss.png.
    Rank 0 only."""

    def __init__(self, run_dir: Path, monitor, resume_step: Optional[int]):
        self.path, self.png, self.monitor = run_dir / "metrics.csv", run_dir / "loss.png", monitor
        rows = []
        if resume_step is not None and self.path.is_file():  # drop what a stopped run logged after its checkpoint
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict):
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})
        if self.monitor is not None and self.monitor.enabled:
            prefix = "Eval" if "val_loss" in row else "Train"
            events = [(f"{prefix}/{k}", float(v), row["step"]) for k, v in row.items()
                      if k not in ("step", "elapsed_s") and isinstance(v, (int, float)) and math.isfinite(v)]
            self.monitor.write_events(events)

    def plot(self):
        """loss.png: train loss per logged step and val loss per evaluation (written atomically)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with self.path.open() as f:
            rows = list(csv.DictReader(f))
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("loss", "train"), ("val_loss", "val")):
            pts = [(int(r["step"]), float(r[key])) for r in rows if r[key] not in ("", "nan")]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        tmp = self.png.with_name(".loss.tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, self.png)


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the step and returns. A second
    SIGINT interrupts at once."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}

    def __call__(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------- the loop
@holds_run_lock(is_main=_is_main_process)  # one training per run directory (llm/rundir.py)
def train(model: nn.Module, train_ds, val_ds, cfg: TrainConfig, collate: Optional[Callable] = None,
          loss_fn: Optional[Callable] = None, trainable_filter: Optional[Callable[[str, nn.Parameter], bool]] = None,
          tokenizer=None, on_save: Optional[Callable[[dict, Path], Any]] = None,
          count_correct: Optional[Callable] = None) -> dict:
    """Train `model` on `train_ds` under DeepSpeed with `cfg`; returns the summary also written to summary.json.

    train_ds / val_ds: map-style datasets. One with `set_epoch(e)` (PretrainDataset) is already this rank's shard
    in (seed, epoch) order; any other is shuffled here and split across ranks. collate(list of items) -> dict of
    tensors (default: PretrainDataset's (x, y) -> input_ids / labels); loss_fn(model, batch) -> mean loss (default
    `lm_loss`). trainable_filter(name, param) -> bool freezes the rest. on_save(fp32 state_dict, dst) writes the
    final model on rank 0 (default: `save_model` of `model`'s args with `tokenizer`). count_correct(model, batch) ->
    items labelled right (classifiers): evaluations then also log val_accuracy. The model's initial weights
    must be the same on every rank (seed before building it).
    """
    plan = preflight(cfg)
    if on_save is None and not hasattr(model, "args"):
        raise TypeError("train(): a model without .args (not llm.model.Transformer) needs an on_save function")
    import deepspeed

    # ZeRO 1/2 call torch's deprecated all_gather_into_tensor every step; one warning per rank per step is noise.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    rank, world, device = init_distributed()
    if world != plan.world_size:
        plan = preflight(cfg, world)
    if device.type == "cuda" and plan.precision == "fp32":  # fp32 runs take TF32 tensor cores (Ampere and newer)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / "checkpoints"
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    collate, loss_fn = collate or default_collate, loss_fn or lm_loss

    # Resume point, chosen by rank 0 (the others may not share its view of the file system).
    resume_meta, resume_tag = None, None
    if cfg.resume is not None and is_main:
        target = run_dir if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume != "auto" and not target.exists():
            raise UserError(f"train.resume={cfg.resume}: no such checkpoint — pass \"auto\" or a "
                            f"{ckpt_root}/step_N directory")
        resume_tag = find_checkpoint(target, warn=log)
        if resume_tag is None:
            log(f"train.resume=auto: no checkpoint in {run_dir} yet — starting a new run")
        else:
            resume_meta = json.loads((resume_tag / STATE_FILE).read_text())
    resume_tag, resume_meta = _broadcast((resume_tag, resume_meta))
    if resume_meta is not None:
        _check_resumable(resume_meta, resume_tag, model, plan)

    for name, p in model.named_parameters():
        if trainable_filter is not None:
            p.requires_grad_(bool(trainable_filter(name, p)))
    if cfg.activation_checkpointing:
        model.gradient_checkpointing = True
    n_trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(model, cfg)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=plan.ds_config,
                                           lr_scheduler=lambda opt: lr_scheduler(opt, cfg))

    state = TrainState()
    if resume_meta is not None:
        engine.load_checkpoint(str(resume_tag.parent), tag=resume_tag.name)
        state = TrainState(**resume_meta["state"])
        rng_file = resume_tag / f"rng_rank{rank}.pt"
        _set_rng_state(torch.load(rng_file, weights_only=False))
        log(f"resumed from {resume_tag} (step {state.step}, {state.tokens:,} tokens)")
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

    n_train = int(_all_reduce(_local_len(train_ds, world), device, torch.distributed.ReduceOp.MIN))
    if n_train < plan.micro_batch_size:
        raise UserError(f"training set: {n_train} example(s) per rank, fewer than micro_batch_size "
                        f"{plan.micro_batch_size} — lower it or add data")
    batches = micro_batches(train_ds, state, n_train, plan.micro_batch_size, collate, cfg.seed, rank, world,
                            cfg.num_workers, device)
    # ZeRO-0 fp32 hands the gradients straight to torch AdamW, the one mode where DeepSpeed does not skip a step
    # with inf/NaN gradients itself; we check them there.
    guard_nonfinite = plan.zero_stage == 0 and plan.precision == "fp32"
    seq_len = getattr(train_ds, "seq_len", None) or getattr(getattr(model, "args", None), "max_seq_len", 0)
    remaining_tokens = (cfg.max_steps - state.step) * plan.global_batch_size * seq_len
    if resolve_compile(cfg.compile, device.type, remaining_tokens >= COMPILE_MIN_TOKENS.get(device.type, 1 << 62),
                       warn=log):
        log(f"compiling {compile_model(model)} (torch.compile: the first steps are slow)")
    flops_per_token = train_flops_per_token(model, seq_len) if hasattr(model, "args") else None
    peak = peak_flops(device)

    metrics = Metrics(run_dir, engine.monitor, state.step if resume_meta else None) if is_main else None
    log(f"training {n_trainable / 1e6:.2f}M parameters on {world} rank(s) ({device_label(device)}), ZeRO-"
        f"{plan.zero_stage} ({plan.ds_config_path.name}), {plan.precision}, attention "
        f"{attention_kernel(device, plan.precision)}, micro batch {plan.micro_batch_size} x accum "
        f"{plan.grad_accum} x {world} ranks = {plan.global_batch_size} sequences/step, "
        f"{plan.global_batch_size * seq_len:,} tokens/step")
    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not is_main, dynamic_ncols=True, desc="train")
    stop = StopSignal()
    summary: dict[str, Any] = {"stopped": False}
    last_save = state.step if resume_meta else -1
    last_eval = -1
    bad_streak = 0
    window_loss, window_steps, window_tokens, t_window = torch.zeros((), device=device), 0, 0, time.perf_counter()
    t_start = time.perf_counter() - state.elapsed_s
    try:
        if cfg.eval_at_start and val_ds is not None and state.step == 0:
            summary["val_loss_at_start"] = evaluate(engine, val_ds, cfg, plan, collate, loss_fn, count_correct,
                                                    tokenizer, state, device, metrics, bar).get("val_loss")
            t_window = time.perf_counter()
        while state.step < cfg.max_steps:
            step_loss = torch.zeros((), device=device)
            step_tokens = 0
            grad_norm = None
            lr = engine.get_lr()[0]  # the lr this step uses (the scheduler moves on inside engine.step)
            for _ in range(plan.grad_accum):
                batch = next(batches)
                loss = loss_fn(engine, batch)
                engine.backward(loss)
                if guard_nonfinite and engine.is_gradient_accumulation_boundary():
                    grad_norm = _skip_if_nonfinite(engine)
                engine.step()
                if guard_nonfinite:
                    engine.optimizer.__dict__.pop("step", None)
                    engine.optimizer.overflow = False
                step_loss += loss.detach().float()
                step_tokens += batch["input_ids"].numel()
            state.step += 1
            state.tokens += step_tokens * world
            if engine.was_step_applied():
                bad_streak = 0
                window_loss += step_loss / plan.grad_accum
                window_steps += 1
            else:
                state.skipped_steps += 1
                mean = step_loss.item() / plan.grad_accum
                if is_bad_step(plan.precision, mean):
                    bad_streak += 1
                    log(f"step {state.step}: non-finite loss or gradient (loss {mean:.4g}) — update skipped "
                        f"({bad_streak} in a row)")
                else:
                    log(f"step {state.step}: fp16 gradient overflow — update skipped, loss scale lowered")
            window_tokens += step_tokens * world
            bar.update(1)

            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                mean_loss = float(_all_reduce(window_loss, device)) / world / max(window_steps, 1)
                dt = time.perf_counter() - t_window
                tps = window_tokens / dt
                if grad_norm is None:
                    grad_norm = engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                mfu = flops_per_token * tps / (peak * world) if peak and flops_per_token else None
                row = dict(step=state.step, tokens=state.tokens, loss=mean_loss if window_steps else float("nan"),
                           lr=lr, grad_norm=grad_norm, tokens_per_s=tps, mfu=mfu if mfu is not None else "",
                           memory_gb=memory_gb(device), skipped_steps=state.skipped_steps,
                           elapsed_s=time.perf_counter() - t_start)
                if is_main:
                    metrics.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
                    bar.write(f"step {state.step}/{cfg.max_steps} | loss {row['loss']:.4f} | lr {lr:.3e} | grad-norm "
                              f"{grad_norm:.3f} | {tps:,.0f} tok/s | MFU {f'{mfu:.1%}' if mfu is not None else 'n/a'}"
                              f" | mem {row['memory_gb']:.2f} GB")
                window_loss.zero_()
                window_steps, window_tokens, t_window = 0, 0, time.perf_counter()

            if bad_streak >= cfg.max_bad_steps:
                last = find_checkpoint(ckpt_root, warn=lambda _: None) if is_main else None
                raise UserError(f"{run_dir}: {bad_streak} steps in a row had a non-finite loss or gradient — "
                                f"stopping; the last good checkpoint is {last or 'none'}. Lower train.lr, raise "
                                "train.warmup_steps, lower train.grad_clip, or train in bf16/fp32")
            stopping = stop.signum is not None  # every rank must agree: one all-reduce (none alone)
            if world > 1:
                stopping = bool(_all_reduce(stopping, device, torch.distributed.ReduceOp.MAX))
            done = state.step == cfg.max_steps
            if val_ds is not None and (state.step % cfg.eval_every == 0 or done):
                summary.update(evaluate(engine, val_ds, cfg, plan, collate, loss_fn, count_correct, tokenizer, state,
                                        device, metrics, bar))
                last_eval = state.step
            if state.step % cfg.save_every == 0 or done or stopping:
                state.elapsed_s = time.perf_counter() - t_start
                save_checkpoint(engine, cfg, plan, state, model, tokenizer, is_main)
                last_save = state.step
            if stopping:
                log(f"stopped by signal {stop.signum} at step {state.step}; checkpoint saved — continue with "
                    "--train.resume auto")
                summary["stopped"] = True
                break
            if last_eval == state.step or last_save == state.step:
                t_window = time.perf_counter()  # throughput excludes evaluation and saving
    finally:
        stop.restore()
        bar.close()

    summary.update(step=state.step, tokens=state.tokens, skipped_steps=state.skipped_steps,
                   elapsed_s=time.perf_counter() - t_start, ranks_in_sync=_ranks_in_sync(engine, plan))
    if not summary["stopped"]:
        final = run_dir / "final"
        if is_main:
            sd = consolidated_state_dict(ckpt_root / f"step_{state.step:08d}", plan.zero_stage)
            if on_save is not None:
                on_save(sd, final)
            else:
                from llm.hf_format import save_model

                save_model(model, final, tokenizer=tokenizer, dtype=DTYPES[cfg.save_dtype or plan.precision],
                           state_dict=sd)
            log(f"final model: {final}")
        summary["final"] = str(final)
        torch.distributed.barrier()
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def is_bad_step(precision: str, loss: float) -> bool:
    """Whether a skipped update counts toward train.max_bad_steps. fp16's dynamic loss scaler skips every step
    whose scaled gradients overflow, and halves the scale: many at the start while the scale settles, a few
    later. Those are normal and count only when the loss itself is non-finite; in bf16/fp32 a skip is always
    a non-finite loss or gradient."""
    return precision != "fp16" or not math.isfinite(loss)


def _skip_if_nonfinite(engine) -> torch.Tensor:
    """ZeRO-0 fp32: global gradient norm (grads are already all-reduced here); if it is inf/NaN, make this
    step's AdamW update a no-op (weights and moments untouched) and flag it as an overflow the way DeepSpeed's
    own optimizers do: the engine then counts it as skipped, zeroes the gradients and keeps the lr schedule."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if not torch.isfinite(norm):
        engine.optimizer.step = lambda closure=None: None  # for this step only: train() removes it again
        engine.optimizer.overflow = True
    return norm


def _check_resumable(meta: dict, tag: Path, model, plan: Plan):
    if meta["world_size"] != plan.world_size:
        raise UserError(f"{tag}: written by {meta['world_size']} rank(s), resumed with {plan.world_size} — resume "
                        "with the same number of ranks, or convert it (tools/convert.py from_deepspeed) and start "
                        "a new run from the Hugging Face directory")
    if meta["zero_stage"] != plan.zero_stage:
        raise UserError(f"{tag}: written with ZeRO-{meta['zero_stage']}, resumed with ZeRO-{plan.zero_stage} — "
                        f"use the same ds_config (ds_configs/zero{meta['zero_stage']}.json)")
    if hasattr(model, "args") and meta.get("model_config") is not None:
        now = model.args.to_hf_config()
        diff = sorted(k for k in set(now) | set(meta["model_config"]) if now.get(k) != meta["model_config"].get(k))
        if diff:
            raise UserError(f"{tag}: the checkpoint's model differs in {', '.join(diff)} — resume with the same "
                            "model settings")


def save_checkpoint(engine, cfg: TrainConfig, plan: Plan, state: TrainState, model, tokenizer, is_main: bool):
    """DeepSpeed's sharded checkpoint + every rank's RNG state + trainer_state.json (written last: the marker of
    a complete checkpoint), then prune to the newest `keep_checkpoints`."""
    root = Path(cfg.run_dir) / "checkpoints"
    tag = f"step_{state.step:08d}"
    if is_main and (root / tag).exists():  # left by an interrupted run that got this far
        shutil.rmtree(root / tag)
    torch.distributed.barrier()
    engine.save_checkpoint(str(root), tag=tag)
    rank = torch.distributed.get_rank()
    tmp = root / tag / f".rng_rank{rank}.pt.tmp"
    torch.save(_rng_state(), tmp)
    os.replace(tmp, root / tag / f"rng_rank{rank}.pt")
    torch.distributed.barrier()
    if is_main:
        files = {str(p.relative_to(root / tag)): p.stat().st_size for p in sorted((root / tag).rglob("*"))
                 if p.is_file()}
        meta = {"state": dataclasses.asdict(state), "world_size": plan.world_size, "zero_stage": plan.zero_stage,
                "precision": plan.precision, "save_dtype": cfg.save_dtype or plan.precision,
                "model_config": model.args.to_hf_config() if hasattr(model, "args") else None,
                "tokenizer": getattr(tokenizer, "path", None), "train_config": dataclasses.asdict(cfg),
                "files": files}
        tmp = root / tag / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, root / tag / STATE_FILE)
        tags = sorted((p for p in root.glob("step_*") if TAG.match(p.name)), key=lambda p: int(TAG.match(p.name)[1]))
        complete = [p for p in tags if (p / STATE_FILE).is_file()]
        for p in tags:
            if p not in complete[-cfg.keep_checkpoints:] and int(TAG.match(p.name)[1]) < state.step:
                shutil.rmtree(p, ignore_errors=True)
    torch.distributed.barrier()


def _ranks_in_sync(engine, plan: Plan) -> Optional[bool]:
    """ZeRO 0-2 keep a full copy of the weights on every rank: check that all copies are bit-identical."""
    if plan.zero_stage == 3:
        return None
    import hashlib

    h = hashlib.sha256()
    for p in engine.module.parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks hold different weights after training ({digests}) — gradients were not synced")
    return True


def cut_at_stop(tokens: list[int], stop_ids) -> list[int]:
    """`tokens` up to (without) the first stop id: what generate() returns when it stops there itself."""
    stops = set(stop_ids)
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


@torch.no_grad()
def evaluate(engine, val_ds, cfg: TrainConfig, plan: Plan, collate, loss_fn, count_correct, tokenizer,
             state: TrainState, device, metrics: Optional[Metrics], bar) -> dict:
    """Mean loss over the first `eval_batches` micro batches of every rank's val shard, bits per byte (with the
    data's bytes/token), accuracy on the same items (with `count_correct`), and greedy continuations of
    `sample_prompts` (all ranks decode: ZeRO-3 needs them)."""
    world = torch.distributed.get_world_size()
    n = int(_all_reduce(_local_len(val_ds, world), device, torch.distributed.ReduceOp.MIN))
    n = min(n // plan.micro_batch_size, cfg.eval_batches) * plan.micro_batch_size
    out: dict[str, Any] = {}
    engine.eval()
    try:
        if n > 0:
            order = _epoch_indices(val_ds, 0, n, cfg.seed, torch.distributed.get_rank(), world)
            total, correct = torch.zeros((), device=device), torch.zeros((), device=device)
            for i in range(0, n, plan.micro_batch_size):
                batch = collate([val_ds[j] for j in order[i:i + plan.micro_batch_size]])
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                total += loss_fn(engine, batch).float()
                if count_correct is not None:
                    correct += count_correct(engine, batch)
            val_loss = float(_all_reduce(total, device)) / world / (n // plan.micro_batch_size)
            out["val_loss"] = val_loss
            if count_correct is not None:
                out["val_accuracy"] = float(_all_reduce(correct, device)) / world / n
            bpt = getattr(val_ds, "bytes_per_token", None)
            out["val_bpb"] = val_loss / math.log(2) / bpt if bpt else float("nan")
        if tokenizer is not None and cfg.sample_prompts and hasattr(engine.module, "setup_cache"):
            from llm.generate import generate

            prompts = [tokenizer.encode(p, bos=tokenizer.bos_id is not None) for p in cfg.sample_prompts]
            module = engine.module  # a peft (LoRA) wrapper holds the Transformer that generate() expects
            module = module.get_base_model() if hasattr(module, "get_base_model") else module
            # ZeRO-3 gathers each layer's parameters with a collective on every forward: all ranks must decode the
            # same number of steps, so none may stop early at a stop id (cut there afterwards instead).
            zero3 = plan.zero_stage == 3
            with torch.compiler.set_stance("force_eager"):  # a compiled model: a few tokens do not repay compiling
                outs = generate(module, prompts, cfg.sample_tokens, temperature=cfg.sample_temperature,
                                top_k=50 if cfg.sample_temperature > 0 else None, seed=cfg.seed,
                                stop_ids=() if zero3 else tokenizer.stop_ids, truncate=True, compile=False)
            if zero3:
                outs = [cut_at_stop(o, tokenizer.stop_ids) for o in outs]
            out["samples"] = {p: tokenizer.decode(o) for p, o in zip(cfg.sample_prompts, outs)}
    finally:
        engine.train()
    if metrics is not None:
        if "val_loss" in out:
            metrics.write(dict(step=state.step, tokens=state.tokens, val_loss=out["val_loss"], val_bpb=out["val_bpb"],
                               val_accuracy=out.get("val_accuracy", "")))
            bpb = f" | bits/byte {out['val_bpb']:.4f}" if math.isfinite(out["val_bpb"]) else ""  # chats: no byte count
            acc = f" | accuracy {out['val_accuracy']:.4f}" if "val_accuracy" in out else ""
            bar.write(f"eval step {state.step} | val loss {out['val_loss']:.4f}{bpb}{acc}")
        for p, text in out.get("samples", {}).items():
            bar.write(f"  sample {p!r} -> {text!r}")
        if out.get("samples"):
            with (Path(cfg.run_dir) / "samples.txt").open("a", encoding="utf-8") as f:
                f.write(f"## step {state.step}\n" + "".join(f"{p}{t}\n---\n" for p, t in out["samples"].items()))
        metrics.plot()
    return out

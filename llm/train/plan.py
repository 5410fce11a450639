"""What a run will do, decided before any compute (`preflight`): batch shape for the world size, precision, the
DeepSpeed config (a JSON file in ds_configs/ with no "auto" values; batch sizes, clipping and precision are written
into it here from TrainConfig, one source of truth), and the optimizer and schedule: torch's AdamW (decoupled
weight decay, Loshchilov & Hutter 2019) with no decay on norms, biases and embeddings, LinearLR warmup then
CosineAnnealingLR down to `min_lr` (SGDR's cosine, Loshchilov & Hutter 2017)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from llm.errors import UserError
from llm.train import dist
from llm.train.config import TrainConfig
from llm.train.dist import on_cpu

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
# The trainer owns these DeepSpeed keys; a ds_configs file that sets them would be a second source of truth.
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "optimizer", "scheduler")


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
        return _plan(cfg, world_size or dist.world_size())
    except UserError:
        if dist.is_main():
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
    if dist.is_main() and msg not in _SAID:
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
    if not cfg.sample_temperature >= 0:
        raise UserError(f"train.sample_temperature={cfg.sample_temperature}: must be >= 0 (0 = greedy)")
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

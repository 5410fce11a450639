"""The one training loop of the toolkit, on DeepSpeed ZeRO 0-3 (Rajbhandari et al. 2020): `fit(task, cfg)`.

Per step: `grad_accum` micro batches (DeepSpeed accumulates, all-reduces and clips), steps with a non-finite loss
or gradient skipped (and the run stopped after `max_bad_steps` in a row), a rank-0 log line (loss, lr, grad-norm,
tokens/s, MFU, memory) into the console, metrics.csv and TensorBoard; evaluation (val loss, bits per byte,
accuracy, samples) every `eval_every` steps; checkpoints every `save_every` steps, at the end and on
SIGTERM/SIGINT (then a clean exit), exact resume; at the end `run_dir/final` written by the task from DeepSpeed's
own fp32 consolidation.
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from llm import writer
from llm.errors import UserError
from llm.compile import TRAIN_COMPILE_MIN_TOKENS, resolve as resolve_compile
from llm.rundir import holds_run_lock
from llm.train import dist
from llm.train.checkpoint import (STATE_FILE, check_resumable, consolidated_state_dict, find_checkpoint,
                                  save_checkpoint, set_rng_state, tag_name)
from llm.train.config import DTYPES, TrainConfig, TrainState
from llm.train.metrics import (Metrics, StopSignal, device_label, memory_gb, numel, peak_flops,
                               train_flops_per_token)
from llm.train.plan import Plan, lr_scheduler, make_optimizer, preflight
from llm.train.sampler import Split, micro_batches, to_device
from llm.train.task import Task


def _resume_point(cfg: TrainConfig, log) -> tuple[Optional[Path], Optional[dict]]:
    """(checkpoint dir, its trainer_state.json) to continue from, chosen by rank 0 (the others may not share its
    view of the file system) and broadcast."""
    tag, meta, error = None, None, None
    if cfg.resume is not None and dist.is_main():
        run_dir = Path(cfg.run_dir)
        target = run_dir if cfg.resume == "auto" else Path(cfg.resume)
        try:
            if cfg.resume != "auto" and not target.exists():
                raise UserError(f"train.resume={cfg.resume}: no such checkpoint — pass \"auto\" or a "
                                f"{run_dir / 'checkpoints'}/step_N directory")
            tag = find_checkpoint(target, warn=log)
        except UserError as e:
            error = e
        if tag is None and error is None:
            log(f"train.resume=auto: no checkpoint in {run_dir} yet — starting a new run")
        elif tag is not None:
            meta = json.loads((tag / STATE_FILE).read_text())
    dist.raise_together(error)  # a bad resume stops every rank, not rank 0 alone
    return dist.broadcast((tag, meta))


@holds_run_lock(is_main=dist.is_main)  # one training per run directory (llm/rundir.py)
def fit(task: Task, cfg: TrainConfig) -> dict:
    """Train `task.model` on `task.train_split` under DeepSpeed with `cfg`; returns the summary also written to
    run_dir/summary.json."""
    plan = preflight(cfg)
    import deepspeed

    # ZeRO 1/2 call torch's deprecated all_gather_into_tensor every step; one warning per rank per step is noise.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    rank, world, device = dist.init_distributed()
    if world != plan.world_size:
        plan = preflight(cfg, world)
    if device.type == "cuda" and plan.precision == "fp32":  # fp32 runs take TF32 tensor cores (Ampere and newer)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run_dir = Path(cfg.run_dir)
    is_main = rank == 0
    log = dist.log
    model, split = task.model, task.train_split
    seq_len = split.seq_len or 0

    resume_tag, resume_meta = _resume_point(cfg, log)
    record = task.record()
    if resume_meta is not None:
        check_resumable(resume_meta, resume_tag, plan, seq_len, record, bucketed=split.lengths is not None)

    for name, p in model.named_parameters():
        p.requires_grad_(bool(task.trainable(name, p)))
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
        set_rng_state(torch.load(resume_tag / f"rng_rank{rank}.pt", weights_only=False))
        log(f"resumed from {resume_tag} (step {state.step}, {state.tokens:,} tokens)")
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

    n_train = int(dist.all_reduce(split.local_len(world), device, torch.distributed.ReduceOp.MIN))
    if n_train < plan.micro_batch_size:
        raise UserError(f"training set: {n_train} example(s) per rank, fewer than micro_batch_size "
                        f"{plan.micro_batch_size} — lower it or add data")
    batches = micro_batches(split, state, n_train, plan.micro_batch_size, task.collate, cfg.seed, rank, world,
                            cfg.num_workers, device)
    # ZeRO-0 fp32 hands the gradients straight to torch AdamW, the one mode where DeepSpeed does not skip a step
    # with inf/NaN gradients itself; we check them there.
    guard_nonfinite = plan.zero_stage == 0 and plan.precision == "fp32"
    remaining_tokens = (cfg.max_steps - state.step) * plan.global_batch_size * seq_len
    if resolve_compile(cfg.compile, device.type,
                       remaining_tokens >= TRAIN_COMPILE_MIN_TOKENS.get(device.type, 1 << 62), warn=log):
        log(f"compiling {task.compile()} (torch.compile: the first steps are slow)")
    all_trained = task.flops_per_token(seq_len)
    flops_per_token = train_flops_per_token(model, all_trained) if all_trained else None
    peak = peak_flops(device)

    extra_val = list(task.extra_val_splits())
    metrics = Metrics(run_dir, engine.monitor, state.step if resume_meta else None,
                      [f"val_{name}_{k}" for name in extra_val for k in ("loss", "ppl")]) if is_main else None
    from llm.model import attention_kernel

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

    evaluating = task.val_split is not None or bool(extra_val)

    def run_eval() -> dict:
        return evaluate(engine, task, cfg, plan, state, device, metrics, bar)

    try:
        if cfg.eval_at_start and evaluating and state.step == 0:
            first = run_eval()
            summary.update({f"{k}_at_start": first.get(k) for k in ["val_loss"] + [f"val_{n}_loss" for n in extra_val]})
            t_window = time.perf_counter()
        while state.step < cfg.max_steps:
            step_loss = torch.zeros((), device=device)
            step_tokens = 0
            grad_norm = None
            lr = engine.get_lr()[0]  # the lr this step uses (the scheduler moves on inside engine.step)
            for _ in range(plan.grad_accum):
                batch = next(batches)
                loss = task.loss(engine, batch)
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
                mean_loss = float(dist.all_reduce(window_loss, device)) / world / max(window_steps, 1)
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
                last = find_checkpoint(run_dir / "checkpoints", warn=lambda _: None) if is_main else None
                raise UserError(f"{run_dir}: {bad_streak} steps in a row had a non-finite loss or gradient — "
                                f"stopping; the last good checkpoint is {last or 'none'}. Lower train.lr, raise "
                                "train.warmup_steps, lower train.grad_clip, or train in bf16/fp32")
            stopping = stop.signum is not None  # every rank must agree: one all-reduce (none alone)
            if world > 1:
                stopping = bool(dist.all_reduce(stopping, device, torch.distributed.ReduceOp.MAX))
            done = state.step == cfg.max_steps
            if evaluating and (state.step % cfg.eval_every == 0 or done):
                summary.update(run_eval())
                last_eval = state.step
            if state.step % cfg.save_every == 0 or done or stopping:
                state.elapsed_s = time.perf_counter() - t_start
                save_checkpoint(engine, cfg, plan, state, seq_len, record, is_main)
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
            task.export(consolidated_state_dict(run_dir / "checkpoints" / tag_name(state.step), plan.zero_stage),
                        final, DTYPES[cfg.save_dtype or plan.precision])
            log(f"final model: {final}")
        summary["final"] = str(final)
        torch.distributed.barrier()
    if is_main:
        _write_summary(run_dir / "summary.json", summary)
    return summary


def _write_summary(path: Path, summary: dict):
    """summary.json, keeping what an earlier run of the same directory recorded that this one did not measure
    (re-running a finished run trains no step and evaluates nothing)."""
    old = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
    writer.replace_text(path, json.dumps({**old, **summary}, indent=2, ensure_ascii=False) + "\n")


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
        engine.optimizer.step = lambda closure=None: None  # for this step only: fit() removes it again
        engine.optimizer.overflow = True
    return norm


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


def _mean_loss(engine, task: Task, split: Split, cfg: TrainConfig, plan: Plan, device) -> Optional[tuple]:
    """(mean loss, items labelled right or None) over the first `eval_batches` micro batches of every rank's
    items of `split`; None when a rank has no full micro batch."""
    world = torch.distributed.get_world_size()
    n = int(dist.all_reduce(split.local_len(world), device, torch.distributed.ReduceOp.MIN))
    n = min(n // plan.micro_batch_size, cfg.eval_batches) * plan.micro_batch_size
    if n == 0:
        return None
    order = split.epoch_indices(0, n, cfg.seed, torch.distributed.get_rank(), world)
    total, correct, counted = torch.zeros((), device=device), torch.zeros((), device=device), False
    for i in range(0, n, plan.micro_batch_size):
        batch = to_device(task.collate([split.items[j] for j in order[i:i + plan.micro_batch_size]]), device)
        total += task.loss(engine, batch).float()
        if (c := task.count_correct(engine, batch)) is not None:
            correct, counted = correct + c, True
    loss = float(dist.all_reduce(total, device)) / world / (n // plan.micro_batch_size)
    return loss, float(dist.all_reduce(correct, device)) / world / n if counted else None


@torch.no_grad()
def evaluate(engine, task: Task, cfg: TrainConfig, plan: Plan, state: TrainState, device,
             metrics: Optional[Metrics], bar) -> dict:
    """Mean loss over the first `eval_batches` micro batches of every rank's validation items, bits per byte (with
    the data's bytes/token), accuracy on the same items (tasks that count correct labels), the loss and perplexity
    on each of the task's extra validation splits (`val_<name>_loss`, `val_<name>_ppl`), and the task's samples
    (every rank decodes: ZeRO-3 needs them)."""
    out: dict[str, Any] = {}
    engine.eval()
    try:
        if task.val_split is not None and (r := _mean_loss(engine, task, task.val_split, cfg, plan, device)):
            out["val_loss"] = r[0]
            if r[1] is not None:
                out["val_accuracy"] = r[1]
            bpt = task.val_split.bytes_per_token
            out["val_bpb"] = r[0] / math.log(2) / bpt if bpt else float("nan")
        for name, split in task.extra_val_splits().items():
            if r := _mean_loss(engine, task, split, cfg, plan, device):
                out[f"val_{name}_loss"], out[f"val_{name}_ppl"] = r[0], math.exp(min(r[0], 700))
        if cfg.sample_prompts:
            with torch.compiler.set_stance("force_eager"):  # a compiled model: a few tokens do not repay compiling
                samples = task.samples(engine.module, cfg, same_length=plan.zero_stage == 3)
            if samples:
                out["samples"] = samples
    finally:
        engine.train()
    if metrics is not None:
        losses = {k: v for k, v in out.items() if k != "samples"}
        if losses:
            metrics.write(dict(step=state.step, tokens=state.tokens, **losses))
            line = f" | val loss {out['val_loss']:.4f}" if "val_loss" in out else ""
            if math.isfinite(out.get("val_bpb", math.nan)):  # chats: no byte count
                line += f" | bits/byte {out['val_bpb']:.4f}"
            if "val_accuracy" in out:
                line += f" | accuracy {out['val_accuracy']:.4f}"
            for name in task.extra_val_splits():
                if f"val_{name}_loss" in out:
                    line += f" | val {name} loss {out[f'val_{name}_loss']:.4f} (ppl {out[f'val_{name}_ppl']:.2f})"
            bar.write(f"eval step {state.step}{line}")
        for p, text in out.get("samples", {}).items():
            bar.write(f"  sample {p!r} -> {text!r}")
        if out.get("samples"):
            with (Path(cfg.run_dir) / "samples.txt").open("a", encoding="utf-8") as f:
                f.write(f"## step {state.step}\n" + "".join(f"{p}{t}\n---\n" for p, t in out["samples"].items()))
        metrics.plot()
    return out

"""bench/gpu.py sections on the DeepSpeed training step: throughput per ZeRO stage (ours eager and compiled vs
transformers' LlamaForCausalLM, engines built by bench/train.py's `engine_for`) and bf16 vs fp32 loss parity."""
from __future__ import annotations

import gc
import statistics
import time

import torch

from train import engine_for, hf_loss  # bench/train.py: the same engine set-up as its side-by-side benchmark


def _plan(stage: int, micro_batch: int, precision: str, lr: float = 1e-4):
    from llm.train import TrainConfig, preflight

    cfg = TrainConfig(run_dir="/tmp/bench-gpu-train", ds_config=f"zero{stage}", micro_batch_size=micro_batch,
                      precision=precision, lr=lr, min_lr=lr / 10, warmup_steps=0, max_steps=10**6, resume="auto")
    plan = preflight(cfg)
    plan.ds_config.pop("tensorboard")
    return cfg, plan


def _models(args, device, impl: str):
    """A fresh model on `device`, seeded: ours, or transformers' Llama holding the very same weights."""
    from llm.model import Transformer

    torch.manual_seed(0)
    with torch.device(device):
        ours = Transformer(args)
        if impl != "transformers":
            return ours
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaForCausalLM(LlamaConfig(**args.to_hf_config(), attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _timed_steps(engine, loss_fn, batch, device, warmup: int, steps: int,
                 repeats: int) -> tuple[float, float, float]:
    """(median seconds per optimizer step over `repeats` blocks of `steps`, last loss, seconds of the untimed
    warm-up steps, compilation included)."""
    t = time.perf_counter()
    for _ in range(warmup):
        engine.backward(loss_fn(engine, batch))
        engine.step()
    _sync(device)
    warm = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            loss = loss_fn(engine, batch)
            engine.backward(loss)
            engine.step()
        _sync(device)
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times), loss.item(), warm


def _ratios(sec) -> None:
    """Our tokens/s over transformers' at the same preset and ZeRO stage, for every row measured so far."""
    rates = {(r["preset"], r["zero"], r["impl"]): r["tokens_per_s"] for r in sec.data.get("runs", [])}
    sec.put("ratio_vs_transformers", {f"{p} zero{z} {impl}": round(tps / rates[p, z, "transformers"], 3)
                                      for (p, z, impl), tps in rates.items()
                                      if impl != "transformers" and (p, z, "transformers") in rates})


def throughput(sec) -> None:
    from llm.config import ModelArgs
    from llm.model import DecoderLayer
    from llm.compile import compile_model
    from llm.tasks.lm import lm_loss
    from llm.train.dist import init_distributed
    from llm.train.metrics import memory_gb, peak_flops

    _, world, device = init_distributed()
    if sec.dry:  # (preset, seq, micro batch); warmup, steps, repeats. bf16 steps are slow on these CPUs: fp32
        shapes, (warmup, steps, repeats), precision = [("debug", 64, 2)], (1, 1, 1), "fp32"
    else:
        shapes, (warmup, steps, repeats), precision = [("125M", 1024, 16), ("350M", 2048, 8)], (3, 5, 3), "bf16"
    peak = peak_flops(device)
    sec.put("setup", {"precision": precision, "world": world, "device": str(device),
                      "peak_tflops": peak / 1e12 if peak else None, "timing": f"median of {repeats} x {steps} steps"})
    eager_s: dict[str, float] = {}
    compiled_once: set[str] = set()

    def item(preset: str, seq: int, mb: int, stage: int, impl: str):
        key = f"{preset} zero{stage} {impl}"
        compiled = impl == "ours+compile"
        need = 2 * eager_s.get(preset, 10.0) + (60 if compiled and not sec.dry and preset not in compiled_once else 0)
        if sec.skip(key, need):
            return
        t0 = time.perf_counter()
        with sec.guard(key):
            args = ModelArgs.from_preset(preset)
            _free(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            cfg, plan = _plan(stage, mb, precision)
            model = _models(args, device, impl)
            engine = engine_for(model, cfg, plan.ds_config)
            if compiled:  # as the trainer does with train.compile on: each decoder block, after deepspeed.initialize
                if sec.dry:  # the same blocks through dynamo, without inductor's minute of C++ compiling on 2 cores
                    for block in model.modules():
                        if isinstance(block, DecoderLayer):
                            block.compile(backend="eager")
                else:
                    compile_model(model)
                compiled_once.add(preset)
            g = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, args.vocab_size, (mb, seq + 1), generator=g)
            batch = {"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}
            loss_fn = hf_loss if impl == "transformers" else lm_loss
            setup_s = time.perf_counter() - t0
            step_s, loss, warm_s = _timed_steps(engine, loss_fn, batch, device, warmup, steps, repeats)
            tps = mb * seq * world / step_s
            peak_gb = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" \
                else memory_gb(device)
            sec.row("runs", {"preset": preset, "params_M": round(args.n_params / 1e6, 1), "seq": seq, "micro_batch": mb,
                             "zero": stage, "impl": impl, "tokens_per_s": round(tps, 1),
                             "mfu": round(args.flops_per_token(seq) * tps / (peak * world), 4) if peak else None,
                             "step_ms": round(step_s * 1e3, 2), "peak_gb": round(peak_gb, 3), "loss": round(loss, 4),
                             "setup_s": round(setup_s, 1), "warmup_s": round(warm_s, 1)})
            del engine, model
            _ratios(sec)
        if not compiled:
            eager_s[preset] = max(eager_s.get(preset, 0.0), time.perf_counter() - t0)
        _free(device)

    for preset, seq, mb in shapes:
        for stage in (0, 2, 3):
            for impl in ("ours", "transformers"):
                item(preset, seq, mb, stage, impl)
    for stage in (0,) if sec.dry else (0, 2, 3):  # compiling costs tens of seconds: after the eager figures
        for preset, seq, mb in shapes:
            item(preset, seq, mb, stage, "ours+compile")


def markov_tokens(vocab: int, batch: int, length: int, seed: int = 0, fanout: int = 4) -> torch.Tensor:
    """(batch, length) tokens of a fixed random Markov chain with `fanout` successors per token: text with
    structure to learn (loss falls from ln(vocab) towards ln(fanout)), unlike uniform noise."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (vocab, fanout), generator=g)
    out = torch.empty(batch, length, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    pick = torch.randint(0, fanout, (batch, length), generator=g)
    for t in range(1, length):
        out[:, t] = table[out[:, t - 1], pick[:, t]]
    return out


def bf16_parity(sec) -> None:
    """The same model, batches and optimizer, trained in fp32 and in bf16 (DeepSpeed ZeRO-0): the loss curves."""
    from llm.config import ModelArgs
    from llm.tasks.lm import lm_loss
    from llm.train.dist import init_distributed

    _, _, device = init_distributed()
    preset, seq, mb, n_steps = ("debug", 64, 4, 8) if sec.dry else ("125M", 512, 8, 30)
    args = ModelArgs.from_preset(preset)
    data = markov_tokens(args.vocab_size, mb * n_steps, seq + 1, seed=1).view(n_steps, mb, seq + 1)
    sec.put("setup", {"preset": preset, "seq": seq, "micro_batch": mb, "steps": n_steps, "lr": 1e-3,
                      "data": "Markov chain, 4 successors per token", "tf32": torch.backends.cuda.matmul.allow_tf32})
    losses = {}
    for precision in ("fp32", "bf16"):
        with sec.guard(precision):
            cfg, plan = _plan(0, mb, precision, lr=1e-3)
            engine = engine_for(_models(args, device, "ours"), cfg, plan.ds_config)
            curve = []
            for tokens in data:
                batch = {"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}
                loss = lm_loss(engine, batch)
                engine.backward(loss)
                engine.step()
                curve.append(loss.item())
            losses[precision] = curve
            del engine
            _free(device)
    if len(losses) == 2:
        diff = [abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"])]
        sec.put("losses", [{"step": i + 1, "fp32": round(a, 5), "bf16": round(b, 5), "abs_diff": round(d, 5)}
                           for i, (a, b, d) in enumerate(zip(losses["fp32"], losses["bf16"], diff))])
        sec.put("summary", {"first_fp32": losses["fp32"][0], "last_fp32": losses["fp32"][-1],
                            "last_bf16": losses["bf16"][-1], "max_abs_diff": max(diff),
                            "mean_abs_diff": sum(diff) / len(diff),
                            "max_rel_diff": max(d / abs(a) for d, a in zip(diff, losses["fp32"]))})

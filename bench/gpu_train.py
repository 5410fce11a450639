"""bench/gpu.py sections on the DeepSpeed training step: throughput per ZeRO stage (ours eager and compiled vs
transformers' LlamaForCausalLM, engines built by bench/train.py's `engine_for`), bf16 vs fp32 loss parity, fp16
start-up through fit() (loss-scale overflows are not aborts), evaluation samples under ZeRO-3, and peak memory per
ZeRO config on one GPU."""
from __future__ import annotations

import contextlib
import gc
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from train import engine_for, hf_loss  # bench/train.py: the same engine set-up as its side-by-side benchmark


def _plan(stage: int | str, micro_batch: int, precision: str, lr: float = 1e-4):
    """(TrainConfig, Plan) for ZeRO `stage` (a number, or a config name in ds_configs/), no TensorBoard."""
    from llm.train import TrainConfig, preflight

    ds_config = stage if isinstance(stage, str) else f"zero{stage}"
    cfg = TrainConfig(run_dir="/tmp/bench-gpu-train", ds_config=ds_config, micro_batch_size=micro_batch,
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


# ----------------------------------------------------------------------------------------------- shared helpers
class Windows(torch.utils.data.Dataset):
    """(x, y) next-token windows of a (N, T+1) token tensor, as llm.data.PretrainDataset yields them."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return self.tokens[i, :-1], self.tokens[i, 1:]


def windows(ids, seq: int) -> torch.Tensor:
    """A 1-D token array cut into (N, seq+1) rows."""
    ids = torch.as_tensor(ids)
    n = (len(ids) - 1) // seq
    return torch.stack([ids[i * seq:i * seq + seq + 1] for i in range(n)])


def text_data(sec, max_tokens: int = 400_000):
    """(tokenizer, train ids, val ids): built-in Shakespeare and a 1,024-token BPE trained on it in a second; the
    tokenizer is made once per benchmark run, in the folder every section's results go to."""
    import sentencepiece as spm

    from llm.corpora import iter_documents
    from llm.evaluate import corpus_tokens
    from llm.tokenizer import Tokenizer

    prefix = sec.part.parent / "shakespeare-bpe"
    if not Path(f"{prefix}.model").is_file():
        docs = list(iter_documents("builtin:shakespeare", "train", max_bytes=300_000))
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(line for d in docs for line in d.splitlines() if line.strip()),
            model_prefix=str(prefix), vocab_size=1024, model_type="bpe", byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    tok = Tokenizer.from_file(f"{prefix}.model")
    train, _ = corpus_tokens("builtin:shakespeare", tok, "train", max_tokens)
    val, _ = corpus_tokens("builtin:shakespeare", tok, "val", max_tokens // 10)
    return tok, train, val


@contextlib.contextmanager
def captured_log():
    """The training loop's log lines (llm.train.dist.log), collected while they still print."""
    from llm.train import dist

    lines: list[str] = []
    original = dist.log

    def log(*a, **k):
        lines.append(" ".join(map(str, a)))
        original(*a, **k)

    dist.log = log
    try:
        yield lines
    finally:
        dist.log = original


@contextlib.contextmanager
def fp16_on_cpu(dry: bool):
    """The dry run only: let our preflight and DeepSpeed's engine accept fp16 on the CPU (both refuse it there, as
    they should: DeepSpeed's loss scaler is for GPUs), so that the CPU rehearsal runs the fp16 code path. Its
    numbers mean nothing; on a GPU this does nothing."""
    if not dry:
        yield
        return
    import llm.train.plan as plan
    from deepspeed.accelerator import get_accelerator

    acc, on_cpu = get_accelerator(), plan.on_cpu
    fp16_supported = acc.is_fp16_supported
    acc.is_fp16_supported, plan.on_cpu = (lambda: True), (lambda: False)
    try:
        yield
    finally:
        acc.is_fp16_supported, plan.on_cpu = fp16_supported, on_cpu


def _loss_scale(optimizer):
    """The current dynamic loss scale of DeepSpeed's fp16 optimizer (FP16_Optimizer or ZeRO's), None in bf16/fp32."""
    scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
    return float(scale) if scale is not None else None


def _longest_run(steps: list[int]) -> int:
    """Length of the longest run of consecutive integers in a sorted list."""
    best = run = 0
    for i, s in enumerate(steps):
        run = run + 1 if i and s == steps[i - 1] + 1 else 1
        best = max(best, run)
    return best


# ----------------------------------------------------------------------------------------------- fp16 start-up
def fp16_startup(sec) -> None:
    """A few hundred fp16 steps through fit() from a fresh model: DeepSpeed's dynamic loss scale starts at 2^16 and
    halves on every overflow (each such step skipped). Those skips must not count as the non-finite steps that stop
    a run after train.max_bad_steps in a row (llm.train.loop.is_bad_step): the run has to finish."""
    from llm.errors import UserError
    from llm.config import ModelArgs
    from llm.model import Transformer
    from llm.tasks.lm import LanguageModelTask, lm_loss
    from llm.train import Split, TrainConfig, fit

    if sec.dry:  # a higher initial scale, so that a few overflows happen on a tiny model too
        preset, seq, mb, steps, warmup, max_bad, scale_power = "debug", 32, 2, 6, 2, 2, 22
    else:
        preset, seq, mb, steps, warmup, max_bad, scale_power = "25M", 512, 16, 300, 30, 5, None
    args = ModelArgs.from_preset(preset)
    data = markov_tokens(args.vocab_size, mb * steps, seq + 1, seed=3)
    work = Path(tempfile.mkdtemp(prefix="gpu-fp16-"))
    ds_config = "zero1"
    if scale_power is not None:
        from llm.train.plan import load_ds_config

        ds, _ = load_ds_config("zero1")
        ds_config = str(work / "zero1_fp16.json")
        Path(ds_config).write_text(json.dumps({**ds, "fp16": {"initial_scale_power": scale_power}}))
    cfg = TrainConfig(run_dir=str(work / "run"), ds_config=ds_config, precision="fp16", micro_batch_size=mb,
                      lr=1e-3, min_lr=1e-4, warmup_steps=warmup, max_steps=steps, log_every=max(steps // 6, 1),
                      eval_every=10**9, save_every=10**9, sample_prompts=[], compile=False, max_bad_steps=max_bad)
    sec.put("setup", {"preset": preset, "params_M": round(args.n_params / 1e6, 1), "seq": seq, "micro_batch": mb,
                      "steps": steps, "ds_config": "zero1", "initial_scale": 2.0 ** (scale_power or 16),
                      "max_bad_steps": max_bad, "data": "Markov chain, 4 successors per token"})

    class Recorded(LanguageModelTask):
        def loss(self, engine, batch):
            self.engine = engine
            scales.append(_loss_scale(engine.optimizer))
            loss = lm_loss(engine, batch)
            losses.append(loss.detach())
            return loss

    scales, losses = [], []
    torch.manual_seed(0)
    task = Recorded(Transformer(args), Split(Windows(data), seq_len=seq), None)
    try:
        with sec.guard("run"), fp16_on_cpu(sec.dry), captured_log() as lines:
            aborted = None
            t = time.perf_counter()
            try:
                summary = fit(task, cfg)
            except UserError as e:
                aborted, summary = str(e)[:300], {}
            overflow = sorted(int(ln.split(":")[0].split()[1]) for ln in lines if "fp16 gradient overflow" in ln)
            curve = torch.stack(losses).float().tolist() if losses else []
            sec.put("run", {
                "finished": summary.get("step") == steps, "aborted": aborted, "steps": summary.get("step"),
                "seconds": round(time.perf_counter() - t, 1), "skipped_steps": summary.get("skipped_steps"),
                "overflow_skips": len(overflow), "longest_overflow_streak": _longest_run(overflow),
                "non_finite_logged": sum("non-finite loss or gradient" in ln for ln in lines),
                "final_scale": _loss_scale(task.engine.optimizer) if hasattr(task, "engine") else None,
                "first_loss": round(curve[0], 4) if curve else None,
                "last_loss": round(sum(curve[-10:]) / len(curve[-10:]), 4) if curve else None})
            changes = [(i + 1, s) for i, s in enumerate(scales) if i == 0 or s != scales[i - 1]]
            for step, s in changes[:24]:
                sec.row("loss_scale", {"step": step, "scale": s, "loss": round(curve[step - 1], 4)})
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- ZeRO-3 eval samples
PROMPTS = ["ROMEO:", "First Citizen:", "The king", "O, "]


def zero3_samples(sec) -> None:
    """fit() under ZeRO-3 on one rank with a validation split and greedy sample prompts, so every evaluation also
    decodes (every rank decodes all sample_tokens: ZeRO-3 gathers weights collectively). It must not hang (the
    section's cap kills a hang), and the last evaluation's samples must equal what the ZeRO-0 path decodes (the
    plain module, no gathering) from the same weights: final/, which the run exports right after that evaluation."""
    from llm.config import ModelArgs
    from llm.hf_format import load_model
    from llm.tasks.lm import LanguageModelTask
    from llm.tasks.zero3 import partitioned_transformer
    from llm.train import DTYPES, Split, TrainConfig, fit, preflight

    tok, train_ids, val_ids = text_data(sec)
    if sec.dry:
        preset, seq, mb, steps, every, new, precision = "debug", 64, 4, 6, 3, 8, "fp32"
    else:
        preset, seq, mb, steps, every, new, precision = "125M", 256, 8, 60, 30, 32, "bf16"
    args = ModelArgs.from_preset(preset, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id)
    work = Path(tempfile.mkdtemp(prefix="gpu-zero3-"))
    cfg = TrainConfig(run_dir=str(work / "run"), ds_config="zero3", precision=precision, micro_batch_size=mb,
                      lr=1e-3, min_lr=1e-4, warmup_steps=min(10, steps // 2), max_steps=steps, log_every=every,
                      eval_every=every, eval_batches=2, save_every=10**9, sample_prompts=PROMPTS, sample_tokens=new,
                      sample_temperature=0.0, compile=False)
    sec.put("setup", {"preset": preset, "params_M": round(args.n_params / 1e6, 1), "seq": seq, "micro_batch": mb,
                      "steps": steps, "eval_every": every, "sample_tokens": new, "precision": precision,
                      "world": 1, "data": "builtin:shakespeare, 1,024-token BPE", "prompts": len(PROMPTS)})

    class Timed(LanguageModelTask):
        def samples(self, module, cfg, same_length):
            t = time.perf_counter()
            out = super().samples(module, cfg, same_length)
            sec.row("evaluations", {"evaluation": len(sec.data.get("evaluations", [])) + 1,
                                    "same_length": same_length, "decode_s": round(time.perf_counter() - t, 2),
                                    "first_sample": next(iter(out.values()), "")})
            return out

    try:
        with sec.guard("zero3"):
            plan = preflight(cfg)
            model = partitioned_transformer(args, plan.ds_config, cfg.seed)  # as llm/pretrain.py under ZeRO-3
            task = Timed(model, Split(Windows(windows(train_ids, seq)), seq_len=seq),
                         Split(Windows(windows(val_ids, seq)), seq_len=seq),
                         tokenizer=tok)
            t = time.perf_counter()
            summary = fit(task, cfg)
            sec.put("zero3", {"finished": summary["step"] == steps, "seconds": round(time.perf_counter() - t, 1),
                              "val_loss": round(summary["val_loss"], 4), "evaluations": len(sec.data["evaluations"])})
            plain = load_model(summary["final"], dtype=DTYPES[precision], device=sec.device).eval()
            reference = LanguageModelTask(plain, None, None, tokenizer=tok).samples(plain, cfg, same_length=False)
            got = summary["samples"]
            for p in PROMPTS:
                sec.row("samples", {"prompt": p, "equal": got[p] == reference[p], "zero3": got[p],
                                    "zero0_path": reference[p]})
            sec.put("samples_equal_zero0_greedy", all(got[p] == reference[p] for p in PROMPTS))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- ZeRO memory
def zero_memory(sec) -> None:
    """bench/zero_memory.py's table on one GPU: peak torch.cuda.max_memory_allocated of a few training steps per
    DeepSpeed config (125M, seq 256, micro batch 1; ZeRO-3 models created partitioned, as llm/pretrain.py does). On
    one rank there is nothing to partition over: every stage holds the whole model, gradients and optimizer
    states, so this shows each stage's overhead; ZeRO's savings need more than one GPU (the 2-rank CPU table in
    docs/PERFORMANCE.md)."""
    from llm.config import ModelArgs
    from llm.model import Transformer
    from llm.tasks.lm import lm_loss
    from llm.tasks.zero3 import partitioned_transformer
    from gpu_checks import _peak_gb
    from llm.train.dist import init_distributed

    _, world, device = init_distributed()
    stages = ("zero0", "zero1", "zero2", "zero3", "zero3_lowmem")
    if sec.dry:
        preset, seq, mb, steps, precisions = "debug", 32, 1, 2, ("fp32",)
    else:
        preset, seq, mb, steps, precisions = "125M", 256, 1, 3, ("bf16", "fp32")
    args = ModelArgs.from_preset(preset)
    sec.put("setup", {"preset": preset, "params_M": round(args.n_params / 1e6, 1), "seq": seq, "micro_batch": mb,
                      "steps": steps, "world": world,
                      "measure": "torch.cuda.max_memory_allocated" if device.type == "cuda"
                      else "process peak RSS (CPU: never falls, so later configs show the earlier peaks too)",
                      "note": "1 rank: nothing to partition, so this is each stage's overhead; savings need >1 GPU"})
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (mb, seq + 1), generator=g)
    batch = {"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}
    base: dict[str, float] = {}
    for precision in precisions:
        for name in stages:
            key = f"{name} {precision}"
            if sec.skip(key, 2 if sec.dry else 8):
                continue
            with sec.guard(key):
                _free(device)
                start = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                cfg, plan = _plan(name, mb, precision)
                if plan.zero_stage == 3:
                    model = partitioned_transformer(args, plan.ds_config, 0)
                else:
                    torch.manual_seed(0)
                    with torch.device(device):
                        model = Transformer(args)
                engine = engine_for(model, cfg, plan.ds_config)
                init_gb = _peak_gb(device, start)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                step_s, loss, _ = _timed_steps(engine, lm_loss, batch, device, warmup=0, steps=steps, repeats=1)
                peak = _peak_gb(device, start)
                held = (torch.cuda.memory_allocated(device) - start) / 2**30 if device.type == "cuda" else None
                base.setdefault(precision, peak)
                sec.row("peak_memory", {"ds_config": name, "precision": precision, "peak_gb": peak,
                                        "x_zero0": round(peak / base[precision], 3), "held_after_gb":
                                        round(held, 3) if held is not None else None, "init_peak_gb": init_gb,
                                        "step_ms": round(step_s * 1e3, 1), "loss": round(loss, 4)})
                del engine, model
                _free(device)

"""bench/gpu.py sections on the model itself: attention-path parity and the SDPA kernel that runs, decoding speed
against transformers' `generate`, perplexity and greedy decoding on the GPU against the CPU and transformers, and
LongLoRA's peak memory at 8k context."""
from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import llm.model
from llm.config import PRESETS, ModelArgs
from llm.model import Transformer


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def _peak_gb(device, base: int = 0):
    if device.type == "cuda":
        return round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 3)
    from llm.train.metrics import memory_gb

    return round(memory_gb(device), 3)  # the process's peak RSS on CPU


# ----------------------------------------------------------------------------------------------- attention
SDPA_OPS = ("flash_attention", "efficient_attention", "cudnn_attention", "attention_math", "flash_attention_for_cpu")


def _sdpa_ops_used(fn) -> list[str]:
    """The aten SDPA implementations (flash / efficient / cudnn / math) that run during fn()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    return sorted(n.removeprefix("aten::_scaled_dot_product_") for n in names
                  if n.startswith("aten::_scaled_dot_product_") and n.removeprefix("aten::_scaled_dot_product_")
                  in SDPA_OPS)


def _loss_grads(model, x, y, ctx=contextlib.nullcontext):
    """Cross entropy and the flattened float32 gradient of every parameter."""
    model.zero_grad(set_to_none=True)
    with ctx():
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
    return float(loss), torch.cat([p.grad.float().flatten() for p in model.parameters()])


def _compare(loss, grads, ref_loss, ref_grads) -> dict:
    return {"loss": round(loss, 6), "loss_abs_diff": abs(loss - ref_loss),
            "grad_rel_err": float((grads - ref_grads).norm() / ref_grads.norm()),
            "grad_cos": float(F.cosine_similarity(grads, ref_grads, dim=0))}


def attention(sec) -> None:
    """bf16 loss and gradients of every attention path against an fp32 model on the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = sec.device
    preset, B, T = ("debug", 2, 64) if sec.dry else ("125M", 4, 1024)
    args = ModelArgs.from_preset(preset)
    torch.manual_seed(0)
    ref = Transformer(args).to(dev)
    tokens = torch.randint(0, args.vocab_size, (B, T + 1), device=dev)
    x, y = tokens[:, :-1], tokens[:, 1:]
    low = copy.deepcopy(ref).to(torch.bfloat16)  # as DeepSpeed's bf16 engine casts the module
    flash = llm.model.flash_attn_func
    sec.put("setup", {"preset": preset, "batch": B, "seq": T, "dtype": "bf16", "device": str(dev),
                      "reference": "fp32 weights, SDPA math kernel", "flash_attn_importable": flash is not None})
    ref_loss, ref_grads = _loss_grads(ref, x, y, lambda: sdpa_kernel([SDPBackend.MATH]))
    sec.put("fp32_math_loss", ref_loss)
    del ref
    results = {}
    try:
        if flash is not None and dev.type == "cuda":
            with sec.guard("flash_attn"):
                results["flash_attn"] = _loss_grads(low, x, y)
                sec.put("flash_attn", _compare(*results["flash_attn"], ref_loss, ref_grads))
        else:
            sec.put("flash_attn", "not importable here (pip install flash-attn on the GPU machine to compare)")
        llm.model.flash_attn_func = None  # the model's SDPA path from here on
        with sec.guard("sdpa_default"):
            results["sdpa"] = _loss_grads(low, x, y)
            sec.put("sdpa_default", {**_compare(*results["sdpa"], ref_loss, ref_grads),
                                     "kernel": ",".join(_sdpa_ops_used(lambda: low(x)))})
        with sec.guard("sdpa_flash_or_efficient"):  # errors if only the math kernel could serve these inputs
            only = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
            res = _loss_grads(low, x, y, lambda: sdpa_kernel(only))
            with sdpa_kernel(only):
                kernel = ",".join(_sdpa_ops_used(lambda: low(x)))
            sec.put("sdpa_flash_or_efficient", {**_compare(*res, ref_loss, ref_grads), "kernel": kernel})
        kernels = {}
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with torch.no_grad(), sdpa_kernel([getattr(SDPBackend, name)]):
                    low(x)
                kernels[name.lower()] = "runs"
            except Exception as e:  # noqa: BLE001 - "no kernel for these inputs" is the answer here
                kernels[name.lower()] = f"unavailable: {str(e).splitlines()[0][:60]}"
        sec.put("sdpa_kernels_alone", kernels)
        if "flash_attn" in results and "sdpa" in results:
            sec.put("flash_attn_vs_sdpa", _compare(*results["flash_attn"], *results["sdpa"]))
    finally:
        llm.model.flash_attn_func = flash


# ----------------------------------------------------------------------------------------------- decode
SMOLLM2_135M = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                    rope_theta=100000.0, tie_word_embeddings=True, max_seq_len=2048)


def decode(sec) -> None:
    """Batch-1 greedy decoding of a random SmolLM2-135M-shaped model: llm.generate vs transformers' generate."""
    from transformers import AutoModelForCausalLM

    from llm.generate import generate
    from llm.hf_format import load_model, save_model

    dev = sec.device
    if sec.dry:
        args, new, prompt_len, repeats, dtype = ModelArgs.from_preset("debug"), 16, 8, 2, torch.float32
    else:
        args, new, prompt_len, repeats, dtype = ModelArgs(**SMOLLM2_135M), 200, 32, 3, torch.bfloat16
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(Transformer(args), f"{tmp}/model")
        ours = load_model(path, dtype=dtype, device=dev).eval()
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
    ref.generation_config.eos_token_id = None  # all new tokens, as ours without stop ids
    ref.generation_config.pad_token_id = 0
    prompt = torch.randint(3, args.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    sec.put("setup", {"model": "debug" if sec.dry else "SmolLM2-135M shape (random weights)",
                      "params_M": round(args.n_params / 1e6, 1), "dtype": str(dtype).removeprefix("torch."),
                      "batch": 1, "prompt": prompt_len, "new_tokens": new, "timing": f"median of {repeats}"})

    def hf_run():
        with torch.no_grad():
            ids = prompt.to(dev)
            return ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                do_sample=False)[0, prompt_len:].tolist()

    runners = {"ours": lambda: generate(ours, prompt.tolist(), new, compile=False)[0], "transformers": hf_run}
    if not sec.dry:  # compiling the decode step costs tens of seconds on a CPU: GPU only
        runners["ours+compile"] = lambda: generate(ours, prompt.tolist(), new, compile=True)[0]
    outputs = {}
    for name, fn in runners.items():
        if sec.skip(name, 15):
            continue
        with sec.guard(name):
            t0 = time.perf_counter()
            outputs[name] = fn()  # warm-up (and compilation)
            warm = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                _sync(dev)
                t = time.perf_counter()
                fn()
                _sync(dev)
                times.append(time.perf_counter() - t)
            sec.put(name, {"tokens_per_s": round(new / statistics.median(times), 1), "first_call_s": round(warm, 2)})
    if "ours" in outputs and "transformers" in outputs:
        a, b = outputs["ours"], outputs["transformers"]
        same = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
        sec.put("greedy_tokens_equal_before_first_difference", same)
        sec.put("ratio_ours_vs_transformers", round(sec.data["ours"]["tokens_per_s"]
                                                    / sec.data["transformers"]["tokens_per_s"], 3))


# ----------------------------------------------------------------------------------------------- LongLoRA memory
def longlora_memory(sec) -> None:
    """One forward+backward of a LongLoRA model (LoRA + trainable embeddings/norms, YaRN) at 8k tokens: peak memory
    with S²-Attn (training attention), full causal attention, and S²-Attn with activation checkpointing."""
    from llm.longlora import disable_s2_attn, enable_s2_attn, extend_context, longlora_trainable
    from llm.tasks.lora import LoraOptions, add_lora

    dev = sec.device
    preset, T, dtype = ("debug", 128, torch.float32) if sec.dry else ("125M", 8192, torch.bfloat16)
    args = ModelArgs.from_preset(preset, max_seq_len=T // 2) if sec.dry else ModelArgs.from_preset(preset)
    torch.manual_seed(0)
    base = Transformer(args).to(dev, dtype)
    extend_context(base, T / args.max_seq_len)
    net = add_lora(base, LoraOptions(r=8, alpha=16, dropout=0.0))
    for name, p in net.named_parameters():
        p.requires_grad_(longlora_trainable(name))
    net.train()
    tokens = torch.randint(0, args.vocab_size, (1, T + 1), device=dev)
    x, y = tokens[:, :-1], tokens[:, 1:]
    sec.put("setup", {"preset": preset, "context": T, "batch": 1, "dtype": str(dtype).removeprefix("torch."),
                      "rope_scaling": base.args.rope_scaling.to_dict(), "lora_r": 8,
                      "trainable_M": round(sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6, 2)})
    variants = (("s2_attn", True, False), ("full_attention", False, False), ("s2_attn_checkpointing", True, True))
    for name, s2, ckpt in variants:
        if sec.skip(name, 4):
            continue
        with sec.guard(name):
            (enable_s2_attn(base) if s2 else disable_s2_attn(base))
            base.gradient_checkpointing = ckpt
            for _ in range(2):  # the second pass is timed: the first pays for kernel selection and set-up
                net.zero_grad(set_to_none=True)
                start = _peak_reset(dev)
                _sync(dev)
                t = time.perf_counter()
                loss = F.cross_entropy(net(x).flatten(0, 1).float(), y.flatten())
                loss.backward()
                _sync(dev)
            sec.put(name, {"peak_gb": _peak_gb(dev, start), "step_s": round(time.perf_counter() - t, 3),
                           "loss": round(loss.item(), 4)})
    s2, full = sec.data.get("s2_attn", {}), sec.data.get("full_attention", {})
    if s2.get("peak_gb") and full.get("peak_gb"):
        sec.put("s2_attn_over_full_attention", {"peak": round(s2["peak_gb"] / full["peak_gb"], 3),
                                                "step_time": round(s2["step_s"] / full["step_s"], 3)})


# ----------------------------------------------------------------------------------------------- eval / generate
def eval_generate(sec) -> None:
    """A small model trained for a few seconds on built-in Shakespeare (so that greedy choices are not near-ties),
    saved as a Hugging Face directory, then: `tools/eval.py ppl --device cuda` (llm.evaluate.corpus_perplexity) on
    the GPU against the same on the CPU, in fp32 and bf16; and llm.generate's greedy tokens against transformers'
    `generate` on the same weights on the GPU, prompt by prompt and batched (left-padded)."""
    from transformers import AutoModelForCausalLM

    from gpu_train import text_data, windows
    from llm.evaluate import corpus_perplexity
    from llm.generate import generate
    from llm.hf_format import save_model

    dev = sec.device
    tok, train_ids, val_ids = text_data(sec)
    if sec.dry:
        shape, seq, batch, steps, ppl_tokens, new = PRESETS["debug"], 64, 8, 15, 2000, 12
    else:
        shape, seq, batch, steps, ppl_tokens, new = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4,
                                                          multiple_of=128), 256, 32, 300, 16_000, 64
    args = ModelArgs(**{**shape, "vocab_size": tok.vocab_size, "max_seq_len": seq, "pad_token_id": tok.pad_id})
    data = windows(train_ids, seq)
    torch.manual_seed(0)
    model = Transformer(args).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    t = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        if time.perf_counter() - t > 0.25 * sec.budget:
            break
        rows = data[torch.randint(0, len(data), (batch,), generator=g)].to(dev)
        with autocast:
            loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1).float(), rows[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sec.put("setup", {"model": f"d{args.dim} L{args.n_layers} vocab {args.vocab_size}",
                      "params_M": round(args.n_params / 1e6, 1), "trained_steps": step + 1,
                      "train_s": round(time.perf_counter() - t, 1), "train_loss": round(loss.item(), 3),
                      "ppl_source": f"builtin:shakespeare val, {ppl_tokens:,} tokens, ctx {seq}, stride {seq // 2}",
                      "device": str(dev)})
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(model.cpu(), f"{tmp}/model", tokenizer=tok)
        del model, opt
        ppl = {}
        for where, dtype in (("cpu", torch.float32), (dev.type, torch.float32), (dev.type, torch.bfloat16)):
            key = f"{where} {str(dtype).removeprefix('torch.')}"
            if key in ppl or sec.skip(f"ppl {key}", 5):
                continue
            with sec.guard(f"ppl {key}"):
                r = corpus_perplexity(path, "builtin:shakespeare", "val", ctx_len=seq, stride=seq // 2,
                                      max_tokens=ppl_tokens, batch_size=8, device=where, dtype=dtype)
                ppl[key] = r["ppl"]
                sec.row("perplexity", {"device": where, "dtype": str(dtype).removeprefix("torch."),
                                       "ppl": round(r["ppl"], 4), "bpb": round(r["bpb"], 4), "tokens": r["tokens"],
                                       "seconds": r["seconds"], "rel_diff_vs_cpu_fp32":
                                       round(abs(r["ppl"] / ppl["cpu float32"] - 1), 6) if "cpu float32" in ppl
                                       else None})
        if sec.skip("greedy", 10):
            return
        with sec.guard("greedy"):
            from llm.hf_format import load_model

            ours = load_model(path, dtype=torch.float32, device=dev).eval()
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
            ref.generation_config.eos_token_id = None  # all new tokens, as ours without stop ids
            docs = [val_ids[i * 97:i * 97 + n].tolist() for i, n in enumerate((3, 9, 17, 30))]
            mine = [generate(ours, [p], new, compile=False)[0] for p in docs]
            batched = generate(ours, docs, new, compile=False)
            T = max(map(len, docs))
            ids = torch.tensor([[tok.pad_id] * (T - len(p)) + p for p in docs], device=dev)
            mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in docs], device=dev)
            with torch.no_grad():
                theirs = [ref.generate(torch.tensor([p], device=dev), attention_mask=torch.ones(1, len(p), device=dev,
                                       dtype=torch.long), max_new_tokens=new, do_sample=False,
                                       pad_token_id=tok.pad_id)[0, len(p):].tolist() for p in docs]
                theirs_batched = ref.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                              pad_token_id=tok.pad_id)[:, T:].tolist()
            for p, a, b, c, d in zip(docs, mine, theirs, batched, theirs_batched):
                sec.row("greedy", {"prompt_tokens": len(p), "new_tokens": new, "equal": a == b,
                                   "first_difference": _first_difference(a, b), "batched_equal": c == d,
                                   "batched_equal_single": c == a, "text": tok.decode(a)[:60]})
            rows = sec.data["greedy"]
            sec.put("greedy_equal_transformers", all(r["equal"] and r["batched_equal"] for r in rows))


def _first_difference(a: list, b: list):
    """Index of the first differing token, None when the lists are equal."""
    return next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), None if len(a) == len(b) else min(len(a), len(b)))

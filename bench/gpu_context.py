"""bench/gpu.py section `context`: context extension where it can be seen to work, on a model that can retrieve.

A tiny model is trained (plain PyTorch loop, bf16 autocast) on documents that repeat a random token string until
they end; copying needs induction heads (Olsson et al. 2022), which form after ~1e8 tokens. Training stops early
once the loss on the repeated part is low. The model is then extended 4x with YaRN + LongLoRA (llm.longlora:
`extend_context`, S²-Attn, LoRA + trainable embeddings and norms, as `llm/sft.py --mode longlora` does) on the
same kind of documents at 4x the length, and passkey-tested at the trained length and at 4x: a 16-token needle
sits at a random depth of random tokens, the prompt ends with the needle's first 8 tokens, and the model must
continue with the other 8 (teacher-forced: all 8 greedy predictions right = retrieved). Compared: the unextended
model, the same with YaRN but no fine-tuning, and YaRN + LongLoRA.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from llm.config import ModelArgs
from llm.model import Transformer

NEEDLE, ANSWER = 16, 8


def copy_batch(vocab: int, batch: int, length: int, device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, length+1), period (B,)): row b repeats a random string of period m_b in [length/16, length/2]."""
    period = torch.randint(max(2, length // 16), length // 2 + 1, (batch,), generator=gen, device=device)
    strings = torch.randint(0, vocab, (batch, length + 1), generator=gen, device=device)
    idx = torch.arange(length + 1, device=device)[None, :] % period[:, None]
    return strings.gather(1, idx), period


def copy_losses(logits: torch.Tensor, tokens: torch.Tensor, period: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(mean loss over all targets, mean loss over the targets that repeat an earlier token: index >= period)."""
    per = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    per = per.view(tokens.shape[0], -1)
    repeat = torch.arange(1, tokens.shape[1], device=tokens.device)[None, :] >= period[:, None]
    return per.mean(), per[repeat].mean().item()


def train_copying(model, params, vocab: int, length: int, batch: int, lr: float, max_s: float, max_steps: int,
                  target: float, device, seed: int, log) -> dict:
    """AdamW on copy documents until the repeat loss (mean of the last 20 steps) is below `target`, or time/steps
    run out. Returns steps, tokens, seconds and the losses."""
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = min(100, max_steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    model.train()
    t0, recent, step, loss = time.perf_counter(), [], 0, float("nan")
    while step < max_steps and time.perf_counter() - t0 < max_s:
        tokens, period = copy_batch(vocab, batch, length, device, gen)
        with autocast:
            logits = model(tokens[:, :-1])
        loss, rep = copy_losses(logits, tokens, period)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        recent = (recent + [rep])[-20:]
        if step % 50 == 0:
            log(f"  step {step}: loss {float(loss):.3f}, repeat loss {sum(recent) / len(recent):.3f}, "
                f"{time.perf_counter() - t0:.0f} s")
        if len(recent) == 20 and sum(recent) / 20 < target:
            break
    return {"steps": step, "tokens": step * batch * length, "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(float(loss), 4), "final_repeat_loss": round(sum(recent) / max(1, len(recent)), 4),
            "reached_target": bool(recent) and sum(recent) / len(recent) < target}


@torch.no_grad()
def passkey(model, vocab: int, length: int, trials: int, trained: int, device, seed: int = 0) -> dict:
    """Token passkey at total length `length`: accuracy (all ANSWER tokens right), token accuracy, and accuracy on
    needles farther back than the trained context `trained`."""
    gen = torch.Generator().manual_seed(seed)
    rows, far = [], []
    for _ in range(trials):
        hay = torch.randint(0, vocab, (length - 2 * NEEDLE,), generator=gen)
        needle = torch.randint(0, vocab, (NEEDLE,), generator=gen)
        at = int(torch.randint(0, len(hay) + 1, (1,), generator=gen))
        rows.append(torch.cat([hay[:at], needle, hay[at:], needle]))
        far.append(length - NEEDLE - at > trained)  # distance from the query to the needle
    seqs = torch.stack(rows).to(device)  # (trials, length)
    model.eval()
    hits = []
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for chunk in seqs.split(8):
        with autocast:
            logits = model(chunk[:, :-1])[:, -ANSWER:]  # predictions of the last ANSWER tokens
        hits.append(logits.argmax(-1) == chunk[:, -ANSWER:])
    hits = torch.cat(hits).cpu()  # (trials, ANSWER)
    ok = hits.all(1)
    far = torch.tensor(far)
    return {"length": length, "trials": trials, "accuracy": round(float(ok.float().mean()), 3),
            "token_accuracy": round(float(hits.float().mean()), 3),
            "far_accuracy": round(float(ok[far].float().mean()), 3) if far.any() else None, "far_trials": int(far.sum())}


def context_extension(sec) -> None:
    from llm.longlora import enable_s2_attn, extend_context, longlora_trainable
    from llm.sft import LoraOptions, add_lora

    dev = sec.device
    if sec.dry:
        shape = dict(dim=32, n_layers=2, n_heads=2, vocab_size=64, max_seq_len=64, multiple_of=16)
        batch, pre_s, pre_steps, ft_s, ft_steps, ft_batch, trials = 4, 10, 20, 5, 3, 2, 8
    else:
        shape = dict(dim=256, n_layers=4, n_heads=8, vocab_size=2048, max_seq_len=512, multiple_of=64)
        batch, pre_s, pre_steps, ft_s, ft_steps, ft_batch, trials = 128, min(70, sec.left() * 0.55), 10**6, 25, 400, 32, 64
    args = ModelArgs(**shape)
    L, V = args.max_seq_len, args.vocab_size
    sec.put("setup", {"model": f"d{args.dim} L{args.n_layers} H{args.n_heads} vocab {V}",
                      "params_M": round(args.n_params / 1e6, 2), "trained_context": L, "extended_context": 4 * L,
                      "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
                      "passkey": f"{NEEDLE}-token needle, last {ANSWER} recalled, {trials} trials per length"})
    torch.manual_seed(0)
    model = Transformer(args).to(dev)
    sec.put("pretrain", train_copying(model, list(model.parameters()), V, L, batch, 1e-3, pre_s, pre_steps, 0.05,
                                      dev, 1, print))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def fresh():
        m = Transformer(ModelArgs(**shape)).to(dev)
        m.load_state_dict(state)
        return m

    for n in (L, 4 * L):
        with sec.guard(f"base@{n}"):
            sec.row("passkey", {"model": "base", **passkey(model, V, n, trials, L, dev)})
    with sec.guard("yarn_no_finetune"):
        yarn = fresh()
        extend_context(yarn, 4.0, "yarn")
        for n in (L, 4 * L):
            sec.row("passkey", {"model": "yarn, no fine-tuning", **passkey(yarn, V, n, trials, L, dev)})
        del yarn
    if sec.skip("longlora", 10 + ft_s):
        return
    with sec.guard("longlora"):
        base = fresh()
        extend_context(base, 4.0, "yarn")
        enable_s2_attn(base, 0.25)
        net = add_lora(base, LoraOptions(r=16, alpha=32, dropout=0.0))
        params = []
        for name, p in net.named_parameters():
            p.requires_grad_(longlora_trainable(name))
            if p.requires_grad:
                params.append(p)
        sec.put("longlora", {"rope_scaling": base.args.rope_scaling.to_dict(), "s2_group_ratio": 0.25, "lora_r": 16,
                             **train_copying(net, params, V, 4 * L, ft_batch, 2e-3, ft_s, ft_steps, 0.05, dev, 2,
                                             print)})
        for n in (L, 4 * L):
            sec.row("passkey", {"model": "yarn + LongLoRA", **passkey(net, V, n, trials, L, dev)})
    sec.put("random_guess_token_accuracy", round(1 / V, 4))
    sec.put("nats_per_token_unpredictable", round(math.log(V), 3))

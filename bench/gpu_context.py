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

import time

import torch
import torch.nn.functional as F

from llm.config import ModelArgs
from llm.model import Transformer

NEEDLE, ANSWER = 16, 8
REPEAT_TARGET = 0.1  # nats: training stops early once the predictable repeats cost less than this


def copy_batch(vocab: int, batch: int, length: int, max_period: int, device,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, length+1), period (B,)): row b repeats a random string of period m_b in
    [max_period/8, max_period] until it ends."""
    period = torch.randint(max(2, max_period // 8), max_period + 1, (batch,), generator=gen, device=device)
    strings = torch.randint(0, vocab, (batch, length + 1), generator=gen, device=device)
    idx = torch.arange(length + 1, device=device)[None, :] % period[:, None]
    return strings.gather(1, idx), period


def copy_losses(logits: torch.Tensor, tokens: torch.Tensor, period: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over all targets, mean loss over the predictable repeats: target index > period, so its
    previous token has occurred before; the first repeated token cannot be foreseen)."""
    per = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    per = per.view(tokens.shape[0], -1)
    repeat = torch.arange(1, tokens.shape[1], device=tokens.device)[None, :] > period[:, None]
    return per.mean(), per.detach()[repeat].mean()


def train_copying(model, params, vocab: int, length: int, max_period: int, batch: int, lr: float, max_s: float,
                  max_steps: int, device, seed: int, log=print) -> dict:
    """AdamW on copy documents until the repeat loss (mean of the last 20 steps) is below REPEAT_TARGET, or
    time/steps run out. Returns steps, tokens, seconds and the losses."""
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = min(100, max_steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    model.train()
    t0, step, losses, reps = time.perf_counter(), 0, [], []
    done = False
    while not done and step < max_steps and time.perf_counter() - t0 < max_s:
        tokens, period = copy_batch(vocab, batch, length, max_period, device, gen)
        with autocast:
            logits = model(tokens[:, :-1])
        loss, rep = copy_losses(logits, tokens, period)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        losses, reps = (losses + [loss.detach()])[-20:], (reps + [rep])[-20:]
        if step % 10 == 0:  # read the losses back (a device sync) every 10 steps only
            done = len(reps) == 20 and float(torch.stack(reps).mean()) < REPEAT_TARGET
            if step % 100 == 0:
                log(f"  step {step}: loss {float(losses[-1]):.3f}, repeat loss {float(torch.stack(reps).mean()):.3f}, "
                    f"{time.perf_counter() - t0:.0f} s")
    rep = float(torch.stack(reps).mean()) if reps else float("nan")
    return {"steps": step, "tokens": step * batch * length, "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(float(losses[-1]), 4) if losses else None, "final_repeat_loss": round(rep, 4),
            "reached_target": rep < REPEAT_TARGET}


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
            "far_accuracy": round(float(ok[far].float().mean()), 3) if far.any() else None,
            "far_trials": int(far.sum())}


def context_extension(sec) -> None:
    from llm.longlora import enable_s2_attn, extend_context, longlora_trainable
    from llm.tasks.lora import LoraOptions, add_lora

    dev = sec.device
    if sec.dry:
        shape = dict(dim=32, n_layers=2, n_heads=2, vocab_size=64, max_seq_len=64, multiple_of=16)
        batch, ft_batch, trials, pre_steps, ft_steps = 4, 2, 4, 10, 2
        pre_s, ft_s = 10, 5
    else:
        shape = dict(dim=256, n_layers=4, n_heads=8, vocab_size=2048, max_seq_len=512, multiple_of=64)
        batch, ft_batch, trials, pre_steps, ft_steps = 128, 32, 64, 10**6, 10**6  # time-boxed, not step-counted
        pre_s, ft_s = min(70, sec.left() * 0.55), 25
    args = ModelArgs(**shape)
    L, V = args.max_seq_len, args.vocab_size
    sec.put("setup", {"model": f"d{args.dim} L{args.n_layers} H{args.n_heads} vocab {V}",
                      "params_M": round(args.n_params / 1e6, 2), "trained_context": L, "extended_context": 4 * L,
                      "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
                      "passkey": f"{NEEDLE}-token needle, last {ANSWER} recalled, {trials} trials per length",
                      "random_guess_token_accuracy": round(1 / V, 4)})
    torch.manual_seed(0)
    model = Transformer(args).to(dev)
    sec.put("pretrain", train_copying(model, list(model.parameters()), V, L, L // 2, batch, 1e-3, pre_s, pre_steps,
                                      dev, seed=1))
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
        # Copies within the trained distance (period <= L/2), so that S²-Attn's groups of L tokens see them:
        # what the fine-tuning teaches is the YaRN-scaled positions, not retrieval at a longer range.
        fit = train_copying(net, params, V, 4 * L, L // 2, ft_batch, 2e-3, ft_s, ft_steps, dev, seed=2)
        sec.put("longlora", {"rope_scaling": base.args.rope_scaling.to_dict(), "s2_group_ratio": 0.25, "lora_r": 16,
                             "max_period": L // 2, **fit})
        for n in (L, 4 * L):
            sec.row("passkey", {"model": "yarn + LongLoRA", **passkey(net, V, n, trials, L, dev)})

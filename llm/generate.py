"""Batched text generation with a KV cache (after gpt-fast's generate.py): one prefill, then one token per step.

Prompts of different lengths are left-padded: every row gets its own rotary positions (0 at its first real token)
and a key mask that hides its pad slots, so a row decodes exactly as it would alone. Sampling follows
transformers' logits processors: repetition penalty (Keskar et al. 2019, CTRL), temperature, top-k, nucleus
top-p (Holtzman et al. 2019); temperature 0 is greedy. Generation stops per row at a stop id, a stop string,
`max_new_tokens`, or the end of the context. The KV cache has static shapes and the one-token decode step is
`torch.compile`d as one graph when the decoding is long enough to repay it (gpt-fast's design; the prefill stays
eager: its shape changes with every prompt). A shorter prompt in a batch gets as many new tokens as it would alone.
`TextStream` writes a row's text as it grows, never part of a character (llm.tokenizer.StreamDecoder) nor a stop
string; `check_settings` turns an out-of-range sampling setting into a `UserError` naming the flag.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch

from llm.errors import UserError
from llm.compile import CompileSetting, resolve

StreamFn = Callable[[int, int], None]  # (row, token id), called for every token kept in the output


def check_settings(temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                   repetition_penalty: float = 1.0, max_new_tokens: Optional[int] = None,
                   context: Optional[int] = None) -> None:
    """A `UserError` naming the flag for a generation setting out of range (NaN included). With `max_new_tokens`
    and `context` (the model's max_seq_len): max_new_tokens must be in [1, context] (a prompt of n tokens leaves
    room for context - n + 1 new ones: the last is sampled from the last position and never fed)."""
    checks = [  # flag, value, in range, the range
        ("max_new_tokens", max_new_tokens, lambda x: x >= 1, "must be at least 1"),
        ("temperature", temperature, lambda x: x >= 0, "must be >= 0 (0 = greedy)"),
        ("top_k", top_k, lambda x: x >= 0, "must be >= 0 (0 = no top-k filtering)"),
        ("top_p", top_p, lambda x: 0 < x <= 1, "must be in (0, 1] (1 = no nucleus filtering)"),
        ("repetition_penalty", repetition_penalty, lambda x: x > 0, "must be > 0 (1 = no penalty)"),
    ]
    for flag, value, ok, rule in checks:
        if value is None:
            continue
        try:
            number = float(value)  # a command line may hand over "nan" as a string
        except (TypeError, ValueError):
            raise UserError(f"--{flag} {value!r}: not a number") from None
        if not ok(number):
            raise UserError(f"--{flag} {value}: {rule}")
    if max_new_tokens is not None and context is not None and max_new_tokens > context:
        raise UserError(f"--max_new_tokens {max_new_tokens}: more than the model's context of {context} tokens "
                        f"(prompt included) — use at most {context}")


def load_for_decoding(model: str, dtype: torch.dtype, device: str, **settings):
    """(model, tokenizer) of the directory `model`, after `check_settings(**settings)` against its context (and a
    clear error for a directory that is not a model) — before any weight is loaded."""
    from llm.hf_format import load_model, read_config
    from llm.tokenizer import Tokenizer

    check_settings(**settings, context=read_config(model)[0].max_seq_len)
    tokenizer = Tokenizer.from_dir(model)
    return load_model(model, dtype=dtype, device=device), tokenizer


def process_logits(logits: torch.Tensor, history: torch.Tensor, temperature: float = 1.0,
                   top_k: Optional[int] = None, top_p: Optional[float] = None,
                   repetition_penalty: float = 1.0) -> torch.Tensor:
    """Logits (B, V) after repetition penalty, temperature, top-k and top-p (filtered tokens get -inf), in
    transformers' order; history (B, L) are the ids seen so far (for the penalty)."""
    if repetition_penalty != 1.0:
        seen = logits.gather(1, history)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, history: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, repetition_penalty: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V) float32: greedy at temperature 0, else drawn from the processed logits."""
    if temperature <= 0:
        return process_logits(logits, history, 0, repetition_penalty=repetition_penalty).argmax(-1)
    logits = process_logits(logits, history, temperature, top_k, top_p, repetition_penalty)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def _stop_cut(tokenizer, out: list[int], stop_strings: Sequence[str]) -> Optional[int]:
    """If the text of `out` now contains a stop string, the number of tokens to keep (before it); else None."""
    # every token holds at least one byte, so a string of n UTF-8 bytes spans at most n tokens (one more: a
    # tokenizer may drop the leading space of the first token it decodes)
    longest = max(len(s.encode("utf-8")) for s in stop_strings)
    tail = tokenizer.decode(out[-(longest + 1):])
    if not any(s in tail for s in stop_strings):
        return None
    keep = len(out)
    while keep > 0 and any(s in tokenizer.decode(out[:keep]) for s in stop_strings):
        keep -= 1
    return keep


CACHE_BUCKET = 256
# Tokens decoded (batch x new tokens) from which compiling the decode step pays on CPU: compilation takes ~20-40 s
# on 2 cores the first time (seconds once inductor's on-disk cache holds it) and roughly doubles the steps/s of
# small models; on a GPU it pays sooner.
COMPILE_MIN_TOKENS = {"cpu": 4096, "cuda": 512}


def _compile_pays(model, batch: int, max_new_tokens: int) -> bool:
    device = model.model.embed_tokens.weight.device.type
    return batch * max_new_tokens >= COMPILE_MIN_TOKENS.get(device, 1 << 62)


def last_logits(model, tok: torch.Tensor, input_pos: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Logits (B, V) float32 of the last position of tok (B, t)."""
    h = model.hidden_states(tok, input_pos, position_ids, mask)
    return model.lm_head(h[:, -1]).float()


@functools.cache
def _compiled_last_logits():
    """`last_logits` compiled once per process (gpt-fast's decode_one_token): static shapes (B, 1) against the
    bucketed static cache, so each (model, batch, bucket) compiles once and is reused across calls and chat turns."""
    return torch.compile(last_logits, dynamic=False, fullgraph=True)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
             stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer=None,
             seed: Optional[int] = None, stream: Optional[StreamFn] = None, compile: CompileSetting | bool | None = "auto",
             max_context: Optional[int] = None, truncate: bool = False, use_cache: bool = True) -> list[list[int]]:
    """New token ids for each prompt (stop ids and stop strings are not included).

    max_context: the longest sequence allowed (default the model's max_seq_len); a longer prompt is an error, or
    with `truncate` loses its oldest tokens. stop_strings need `tokenizer`. use_cache=False recomputes the whole
    sequence every step (slow; the reference the cache is tested against). compile: torch.compile the one-token
    decode step ("auto": when the decoding is long enough to repay the compilation, see `_compile_pays`); the
    tokens are the same either way.
    """
    check_settings(temperature, top_k, top_p, repetition_penalty)
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        return []
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the output")
    context = max_context or model.args.max_seq_len
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {i}: empty — give some text (or at least a BOS token) to continue from")
        if len(p) >= context:
            if not truncate:
                raise UserError(f"prompt {i}: {len(p)} tokens, but the model's context is {context} — shorten it "
                                "or pass --truncate to keep only its last tokens")
            prompts[i] = p[-max(1, context - max_new_tokens):]
    B, T = len(prompts), max(len(p) for p in prompts)
    # Row b's positions are its cache slots - pad[b], so a shorter (more padded) prompt gets as many new tokens as
    # it would alone: up to the slot context + pad[b], where its last token is sampled (and never fed).
    pads = [T - len(p) for p in prompts]
    last_slot = [context + n for n in pads]
    total = min(T + max_new_tokens, max(last_slot))
    # The cache is sized in buckets of CACHE_BUCKET slots: the decode step sees a few static shapes (each compiled
    # once) and attends over at most CACHE_BUCKET - 1 empty slots.
    cache_len = min(-(-total // CACHE_BUCKET) * CACHE_BUCKET, max(last_slot))
    device = model.model.embed_tokens.weight.device
    pad = torch.tensor(pads, device=device)  # (B,) left pad per row
    tokens = torch.tensor([[p[0]] * (T - len(p)) + p for p in prompts], device=device)  # (B, T); pads repeat p[0]
    padded = bool(pad.any())
    slots = torch.arange(cache_len, device=device)
    # Key s is visible to row b when s is a real token; pad queries also see themselves, so no row is all-masked
    # (an all-masked softmax gives NaN, which would reach the cache).
    real = slots[None, :] >= pad[:, None]  # (B, S)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()  # a fresh random seed, without touching torch's global generator
        else:
            generator.manual_seed(seed)

    def inputs_at(pos, full_mask: bool):
        """position_ids and mask for tokens written at cache slots pos (t,)."""
        position_ids = mask = None
        if padded:
            # (B, t); a finished row past its context keeps being fed (ignored) at its last position
            position_ids = (pos[None, :] - pad[:, None]).clamp(0, context - 1)
            if use_cache:  # the model adds causality over the cache slots
                mask = real[:, None, None, :]  # (B, 1, 1, S)
                if full_mask:
                    mask = mask | (slots[None, :] == pos[:, None])[None, None]  # (B, 1, t, S)
            else:  # the mask covers keys 0..pos[-1] and must be causal itself
                keys = slots[:len(pos)]
                causal = keys[None, :] <= pos[:, None]  # (t, t)
                mask = (real[:, None, None, :len(pos)] & causal) | (keys[None, :] == pos[:, None])  # (B, 1, t, t)
        return position_ids, mask

    def logits_at(tok, pos, full_mask: bool):
        """Logits (B, V) float32 of the last position of tok (B, t) written at cache slots pos (t,)."""
        return last_logits(model, tok, pos if use_cache else None, *inputs_at(pos, full_mask))

    decode = _compiled_last_logits() if use_cache and resolve(compile, device.type, pays=_compile_pays(
        model, B, max_new_tokens)) else last_logits
    seq = tokens  # (B, T + generated so far)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stop_ids = set(int(s) for s in stop_ids)
    if use_cache:
        model.setup_cache(B, cache_len)
    try:
        logits = logits_at(tokens, slots[:T], True)
        for pos in range(T, total + 1):
            nxt = sample(logits, seq, temperature, top_k, top_p, repetition_penalty, generator)  # (B,)
            for b, t in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if t in stop_ids:
                    done[b] = True
                    continue
                out[b].append(t)
                if stream is not None:
                    stream(b, t)
                if stop_strings and (keep := _stop_cut(tokenizer, out[b], stop_strings)) is not None:
                    del out[b][keep:]
                    done[b] = True
                elif len(out[b]) >= max_new_tokens or pos >= last_slot[b]:
                    done[b] = True
            if all(done) or pos == total:
                break
            seq = torch.cat([seq, nxt[:, None]], 1)
            if use_cache:
                pos_t = torch.full((1,), pos, device=device)  # a fresh tensor: a view would guard on its offset
                # After the first compiled step of this call the guards are known to hold (the same model, shapes
                # and flags every step): evaluating them again costs ~10% of a small model's step.
                with torch.compiler.set_stance(skip_guard_eval_unsafe=decode is not last_logits and pos > T):
                    logits = decode(model, nxt[:, None], pos_t, *inputs_at(pos_t, False))
            else:
                logits = logits_at(seq, slots[:pos + 1], True)
    finally:
        if use_cache:
            model.clear_cache()
    return out


class TextStream:
    """A `stream` callback that writes one row's text as it grows: never part of a character (`StreamDecoder`
    holds back an incomplete UTF-8 byte sequence), and never the start of a stop string (text that may begin one
    is held until it cannot, and nothing from a stop string on is written). Call `finish()` after `generate`:
    it writes what is still held, without a trailing incomplete character."""

    def __init__(self, tokenizer, write: Callable[[str], object], row: int = 0, stop_strings: Sequence[str] = ()):
        from llm.tokenizer import StreamDecoder

        self.decoder, self.write, self.row = StreamDecoder(tokenizer), write, row
        self.stop_strings = [s for s in stop_strings if s]
        self.pending = ""  # decoded text not yet written (it may start a stop string)
        self.stopped = False

    def __call__(self, row: int, token: int):
        if row == self.row and not self.stopped:
            self._show(self.decoder.push(token), final=False)

    def finish(self):
        rest = self.decoder.finish()
        if not self.stopped:
            self._show(rest, final=True)
        self.pending, self.stopped = "", False

    def _show(self, text: str, final: bool):
        text = self.pending + text
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            text, self.stopped = text[:min(hits)], True
        keep = 0 if final or self.stopped else max(
            (n for s in self.stop_strings for n in range(min(len(s) - 1, len(text)), 0, -1)
             if text.endswith(s[:n])), default=0)
        self.pending = text[len(text) - keep:]
        if len(text) > keep:
            self.write(text[:len(text) - keep])

"""The one chat template (ChatML, as SmolLM2 and Qwen use it), shared by SFT data building and inference.

    <|im_start|>{role}\n{content}<|im_end|>\n      per message (system, user, assistant; multi-turn)
    <|im_start|>assistant\n                        generation prompt

Training (`tokenize_chat` → ids + labels) and inference (`tokenize_chat(..., add_generation_prompt=True)`) both
tokenize the *whole rendered string* in one call, so the ids a model is trained on are exactly the ids it is
prompted with at inference time; assistant spans are found by tokenizing prefixes that end at a special token
(where every tokenizer splits), never by guessing. No BOS is written, as in SmolLM2's own template.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from llm.errors import UserError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label value that cross-entropy ignores


def _check(messages: Iterable[Mapping[str, str]]) -> list[Mapping[str, str]]:
    messages = list(messages)
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"message {i}: role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise UserError(f"message {i}: content must be a string, got {type(content).__name__}")
        if IM_START in content or IM_END in content:
            raise UserError(f"message {i}: content contains a chat special token ({IM_START} or {IM_END}); remove it")
    return messages


def render_message(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def render(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The ChatML text of `messages` ([{"role", "content"}, ...]); with the assistant header appended if asked."""
    text = "".join(render_message(m["role"], m["content"]) for m in _check(messages))
    return text + f"{IM_START}assistant\n" if add_generation_prompt else text


def tokenize_chat(tokenizer, messages: Iterable[Mapping[str, str]],
                  add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """ids of `render(messages)` and labels of the same length (not shifted, as in transformers):
    `IGNORE_INDEX` everywhere except each assistant content and its `<|im_end|>`, which are what SFT trains on.
    """
    messages = _check(messages)
    for special in (IM_START, IM_END):
        if tokenizer.token_to_id(special) is None:
            raise UserError(f"{getattr(tokenizer, 'path', 'tokenizer')}: no single token for {special}; train the "
                            "tokenizer with the chat special tokens (tools/train_tokenizer.py adds them)")
    ids = tokenizer.encode(render(messages, add_generation_prompt))
    labels = [IGNORE_INDEX] * len(ids)
    prefix = ""
    for m in messages:
        if m["role"] == "assistant":
            # The span ends at a special token, where every tokenizer splits, so `end` is exact. The header ends
            # in "\n", which a BPE could merge with the content's first characters: then the span starts at the
            # first id where the two tokenizations part (that merged token holds content, so it is trained on).
            head = tokenizer.encode(prefix + f"{IM_START}assistant\n")
            start = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), len(head))
            end = len(tokenizer.encode(prefix + f"{IM_START}assistant\n{m['content']}{IM_END}"))
            labels[start:end] = ids[start:end]
        prefix += render_message(m["role"], m["content"])
    return ids, labels

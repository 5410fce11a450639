"""Chat with any Hugging Face Llama directory in the terminal: streaming replies, multi-turn history.

    python tools/chat.py --model runs/sft/final --system "You are a helpful assistant."
    printf 'What is the capital of France?\nAnd of Italy?\n' | python tools/chat.py --model DIR --temperature 0

Commands: /reset forgets the conversation (keeps --system), /exit quits (so does end of input). When stdin is not
a terminal every line is one user message and each reply is printed on its own line, so the chat can be
scripted; the exit status is 1 if a message got no reply (one too long for the model's context), 2 for a bad
setting. Prompts use the one chat template of llm/chat.py, the same ids SFT trained on. Replies stream without
ever showing part of a character (llm.tokenizer.StreamDecoder).
"""
from __future__ import annotations

import sys
from typing import Literal, Optional, Union

import torch

from llm.chat import tokenize_chat
from llm.cli import run_cli
from llm.generate import TextStream, generate, load_for_decoding


def chat(model: str, system: Optional[str] = None, max_new_tokens: int = 256, temperature: float = 0.7,
         top_k: Optional[int] = None, top_p: Optional[float] = 0.9, repetition_penalty: float = 1.1,
         seed: Optional[int] = None, compile: Union[bool, Literal["auto"]] = "auto", device: str = "auto",
         dtype: Literal["float32", "bfloat16", "float16"] = "float32"):
    """Interactive chat.

    Args:
        model: Hugging Face Llama directory with its tokenizer (an SFT'd or instruct model answers best).
        system: system message that starts every conversation.
        max_new_tokens: the longest reply, in tokens (less than the model's context).
        temperature: >= 0; 0 = greedy (deterministic); higher = more varied.
        top_k: sample only among the k most likely tokens (0 = all).
        top_p: nucleus sampling mass, in (0, 1].
        repetition_penalty: > 0; > 1 discourages repeating tokens already in the conversation.
        seed: random seed (a fixed seed replays the same conversation).
        compile: torch.compile the decode step: true, false, or auto (see tools/generate.py --help).
        device: auto (the GPU when torch can use one, else the CPU), cpu, or cuda[:N].
        dtype: weight dtype.
    """
    net, tokenizer = load_for_decoding(model, getattr(torch, dtype), device, temperature=temperature, top_k=top_k,
                                       top_p=top_p, repetition_penalty=repetition_penalty,
                                       max_new_tokens=max_new_tokens)
    context = net.args.max_seq_len
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    failed = 0  # turns that ended in an error: the exit status is 1 if any did
    if interactive:
        print(f"chatting with {model} — /reset to start over, /exit to quit", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and not line:
            break  # end of input
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = list(start)
            print("(conversation reset)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        ids, _ = tokenize_chat(tokenizer, history, add_generation_prompt=True)
        while len(ids) + max_new_tokens > context and len(history) > len(start) + 1:
            del history[len(start):len(start) + 2]  # forget the oldest exchange to fit the context
            ids, _ = tokenize_chat(tokenizer, history, add_generation_prompt=True)
        if len(ids) >= context:
            print(f"error: that message is {len(ids)} tokens; the model's context is {context} — shorten it",
                  file=sys.stderr)
            history.pop()
            failed += 1
            continue
        stream = TextStream(tokenizer, lambda s: print(s, end="", flush=True))
        out = generate(net, [ids], min(max_new_tokens, context - len(ids)), temperature=temperature, top_k=top_k,
                       top_p=top_p, repetition_penalty=repetition_penalty, stop_ids=tokenizer.stop_ids,
                       seed=None if seed is None else seed + turn, stream=stream, compile=compile)[0]
        stream.finish()
        print(flush=True)
        history.append({"role": "assistant", "content": tokenizer.decode_complete(out).strip()})
        turn += 1
    if failed:
        print(f"error: {failed} message(s) got no reply (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(chat))

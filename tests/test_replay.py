"""Replay of pretraining text during SFT: the exact share per rank, an order that is a pure function of (seed, epoch,
rank, world) so resuming is exact, and the pretraining text's validation loss in metrics.csv."""

import csv
import json
import math

import pytest
import torch

from llm.train.config import TrainState
from llm.train.sampler import Replay, Split, micro_batches


class Windows(torch.utils.data.Dataset):
    """A sharded dataset like PretrainDataset: this rank's items, in an order drawn per epoch."""

    def __init__(self, n, rank, world, seed=0):
        self.n, self.rank, self.world, self.seed, self.epoch = n, rank, world, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n // self.world

    def __getitem__(self, i):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7 + self.epoch))
        return ("window", int(perm[i * self.world + self.rank]))


class Chats(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return ("chat", i)


def split_for(rank, world, share, n_chats=203, n_windows=400, lengths=False):
    chats = Chats(n_chats)
    return Split(chats, lengths=[(i * 37) % 50 + 1 for i in range(n_chats)] if lengths else None,
                 replay=Replay(Windows(n_windows, rank, world), share))


@pytest.mark.parametrize("share,world,mb,lengths", [(0.25, 2, 8, False), (0.25, 3, 4, True), (0.1, 1, 8, False),
                                                    (0.5, 2, 2, True)])
def test_replay_share_is_exact_on_every_rank(share, world, mb, lengths):
    seen_chats = []
    for rank in range(world):
        split = split_for(rank, world, share, lengths=lengths)
        n = split.local_len(world) // mb * mb
        order = split.epoch_indices(0, n, seed=3, rank=rank, world=world, mb=mb)
        assert len(order) == n or lengths  # length buckets drop the epoch's last partial step of chats
        n = len(order)
        items = [split.items[i] for i in order]
        windows = [w for kind, w in items if kind == "window"]
        assert len(windows) == math.floor(n * share)  # exactly the share of this rank's epoch
        for b in range(0, n - mb + 1, mb):  # and spread evenly: every micro batch within one item of the share
            k = sum(kind == "window" for kind, _ in items[b:b + mb])
            assert math.floor(mb * share) <= k <= math.ceil(mb * share)
        seen_chats += [c for kind, c in items if kind == "chat"]
        assert len(set(windows)) == len(windows)
        # a pure function of (seed, epoch, rank, world): asked again, the same; another epoch, another order
        assert split_for(rank, world, share, lengths=lengths).epoch_indices(0, n, 3, rank, world, mb) == order
        assert split.epoch_indices(1, n, 3, rank, world, mb) != order
    assert len(seen_chats) == len(set(seen_chats))  # ranks never share a chat (windows: sharded by their dataset)


def test_replay_resumes_at_any_index():
    """micro_batches from a saved (epoch, index) yields exactly the rest of the uninterrupted stream, across the
    epoch boundary."""
    def stream(state, k):
        split = split_for(0, 1, 0.25, n_chats=30, n_windows=40)
        n = split.local_len(1)
        it = micro_batches(split, state, n, 4, lambda items: {"items": items}, seed=5, rank=0, world=1, num_workers=0,
                           device=torch.device("cpu"))
        return [next(it) for _ in range(k)]

    full = stream(TrainState(), 20)  # 40 items per epoch, 10 micro batches: two epochs
    for cut in (3, 10, 13):
        state = TrainState()
        head = stream(state, cut)
        assert head == full[:cut]
        assert stream(TrainState(epoch=state.epoch, index=state.index), 20 - cut) == full[cut:]


def test_sft_with_replay_logs_pretraining_val_loss(tmp_path, base_dir, chat_tokenizer):
    """LoRA SFT (one in-process rank) with --replay 0.25: windows of the pretraining data train beside the chats
    (every token labelled), and each evaluation logs val_pretrain_loss/ppl in metrics.csv and summary.json."""
    from llm.corpora import iter_documents
    from llm.prepare import prepare
    from llm.sft import main as sft
    from llm.sft_data import SFTCollator, WindowItems
    from llm.tasks.lm import replay_splits
    from llm.train import TrainConfig

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(doc.strip() for doc in iter_documents("builtin:shakespeare", "train",
                                                                      max_bytes=60_000)), encoding="utf-8")
    data = tmp_path / "data"
    prepare([str(text)], out=str(data), tokenizer=str(chat_tokenizer.path), val_fraction=0.1, workers=1)
    # the base model records its pretraining data: the default --replay_data
    (base_dir / "training_data.json").write_text(json.dumps({"data": str(data)}))
    replay, val = replay_splits(str(base_dir), 0.25, None, 64, 0, chat_tokenizer.vocab_size, chat_tokenizer)
    assert isinstance(replay.dataset, WindowItems) and set(val) == {"pretrain"}
    (x, y), = replay.dataset[0]
    batch = SFTCollator(chat_tokenizer.pad_id, 64)([replay.dataset[0]])
    assert len(x) == 64 and x[1:] == y[:-1] and (batch["labels"] != -100).all()  # one document, every token a label

    run = tmp_path / "run"
    cfg = TrainConfig(run_dir=str(run), ds_config="zero0", max_steps=4, micro_batch_size=4, lr=1e-2, warmup_steps=1,
                      eval_every=2, eval_batches=2, eval_at_start=True, sample_prompts=[], log_every=1,
                      compile=False)
    summary = sft(str(base_dir), "builtin:chatterbot", cfg, mode="lora", seq_len=64, max_examples=60, replay=0.25)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    evals = {int(r["step"]): r for r in rows if r["val_loss"]}
    assert set(evals) == {0, 2, 4}
    for r in evals.values():
        assert math.isclose(float(r["val_pretrain_ppl"]), math.exp(float(r["val_pretrain_loss"])), rel_tol=1e-6)
    saved = json.loads((run / "summary.json").read_text())
    assert saved["val_pretrain_loss"] == summary["val_pretrain_loss"] == float(evals[4]["val_pretrain_loss"])
    assert saved["val_pretrain_loss_at_start"] == float(evals[0]["val_pretrain_loss"])

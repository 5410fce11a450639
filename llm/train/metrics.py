"""What a run reports: the rank-0 log line's figures (tokens/s, MFU against the GPU's peak, memory), metrics.csv,
TensorBoard through DeepSpeed's monitor, loss.png; and the signals that stop a run cleanly."""
from __future__ import annotations

import csv
import math
import os
import resource
import signal
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

# Dense bf16/fp16 tensor-core peak TFLOPS per GPU (NVIDIA datasheets, without sparsity), matched in this order
# against torch.cuda.get_device_name(): PCIe / NVL variants before the generic (SXM) name they contain.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H200 NVL", 835), ("H800 PCIe", 756), ("H100", 989),
                   ("H200", 989), ("H800", 989),
                   ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("A10G", 70),
                   ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71), ("RTX A6000", 155), ("V100", 125))


def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of the GPU, or None (CPU, unknown GPU: MFU is reported as n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in GPU_PEAK_TFLOPS if key in name), None)


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 holds only a partition of it (created under zero.Init)."""
    return getattr(p, "ds_numel", p.numel())


def train_flops_per_token(model: nn.Module, all_trained: float) -> float:
    """Training FLOPs per token for MFU: `all_trained` (the model's 6N + attention, ModelArgs.flops_per_token) less
    the weight gradients frozen weights never get: a frozen matrix costs 2 FLOPs/param forward + 2 for the
    activation gradient, a trained one 2 more for its weight gradient (LoRA: most of the model is frozen)."""
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}  # a tied lm_head included
    frozen = sum(numel(p) for p in model.parameters() if not p.requires_grad and id(p) in matrices)
    return all_trained - 2 * frozen


def device_label(device: torch.device) -> str:
    """cpu, or cuda with the GPU's name (what MFU's peak and the kernels depend on)."""
    return f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: allocated on the GPU, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


CSV_FIELDS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb", "skipped_steps",
              "val_loss", "val_bpb", "val_accuracy", "elapsed_s")


class Metrics:
    """metrics.csv (one row per log step and per evaluation), TensorBoard through DeepSpeed's monitor, loss.png.
    Rank 0 only."""

    def __init__(self, run_dir: Path, monitor, resume_step: Optional[int], extra_fields: Sequence[str] = ()):
        self.path, self.png, self.monitor = run_dir / "metrics.csv", run_dir / "loss.png", monitor
        self.fields = CSV_FIELDS[:-1] + tuple(extra_fields) + CSV_FIELDS[-1:]  # e.g. val_pretrain_loss
        rows = []
        if resume_step is not None and self.path.is_file():  # drop what a stopped run logged after its checkpoint
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        tmp = self.path.with_name(".metrics.csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def write(self, row: dict):
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow({k: row.get(k, "") for k in self.fields})
        if self.monitor is not None and self.monitor.enabled:
            prefix = "Eval" if "val_loss" in row else "Train"
            events = [(f"{prefix}/{k}", float(v), row["step"]) for k, v in row.items()
                      if k not in ("step", "elapsed_s") and isinstance(v, (int, float)) and math.isfinite(v)]
            self.monitor.write_events(events)

    def plot(self):
        """loss.png: train loss per logged step and val loss per evaluation (written atomically)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with self.path.open() as f:
            rows = list(csv.DictReader(f))
        fig, ax = plt.subplots(figsize=(7, 4))
        extra = [k for k in self.fields if k.endswith("_loss") and k != "val_loss"]  # e.g. val_pretrain_loss
        curves = [("loss", "train"), ("val_loss", "val")] + [(k, k[:-5].replace("_", " ")) for k in extra]
        for key, label in curves:
            pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "", "nan")]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key.startswith("val") else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        tmp = self.png.with_name(".loss.tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, self.png)


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the step and returns. A second
    SIGINT interrupts at once."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}

    def __call__(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)

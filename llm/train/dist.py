"""The launcher's environment and the process group: the only reader of RANK / WORLD_SIZE / LOCAL_RANK.

DeepSpeed's launcher and torchrun set RANK, LOCAL_RANK, WORLD_SIZE (and LOCAL_WORLD_SIZE); a plain `python` start
has none of them and becomes a world of one. Before the process group exists, rank and world come from the
environment; after, from torch.distributed.
"""
from __future__ import annotations

import os
import socket
import subprocess
from typing import Optional

import torch

from llm.errors import UserError


def rank() -> int:
    """This process's rank: the launcher's RANK (init_distributed sets it for a plain start), else the group's."""
    if "RANK" in os.environ or not torch.distributed.is_initialized():
        return int(os.environ.get("RANK", "0"))
    return torch.distributed.get_rank()


def world_size() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))


def is_main() -> bool:
    """Rank 0: the one process that prints, writes shared files and reports errors."""
    return rank() == 0


def log(*args, **kwargs):
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def quiet_cpu_accelerator():
    """Where DeepSpeed would fall back to the CPU anyway (no CUDA, XPU or MPS device, no other accelerator's
    package), say so with DS_ACCELERATOR=cpu: its auto-detection would print a warning line before any output
    (also before a one-line error). The torch checks do not initialize CUDA (device_count asks NVML)."""
    import importlib.util

    if "DS_ACCELERATOR" in os.environ or torch.cuda.device_count() > 0:
        return
    if (hasattr(torch, "xpu") and torch.xpu.is_available()) or torch.backends.mps.is_available():
        return
    others = ("torch_npu", "torch_sdaa", "habana_frameworks", "torch_mlu", "torch_supa", "torch_xmlir")
    if any(importlib.util.find_spec(name) is not None for name in others):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


def on_cpu() -> bool:
    """Whether DeepSpeed's accelerator is the CPU (no usable GPU)."""
    quiet_cpu_accelerator()
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def visible_gpus() -> int:
    """NVIDIA GPUs this process is meant to use: those `nvidia-smi -L` lists, none when CUDA_VISIBLE_DEVICES hides
    them all ("" or "-1"). (DeepSpeed's launcher sets CUDA_VISIBLE_DEVICES on CPU ranks too: alone it proves
    nothing.)"""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip()
    if hidden == "" or hidden.startswith("-"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return torch.cuda.device_count()
    return max(sum(line.startswith("GPU ") for line in out.splitlines()), torch.cuda.device_count())


def check_accelerator():
    """Refuse to train on the CPU by accident: GPUs are visible but DeepSpeed chose the CPU (a CPU-only torch, or
    a CUDA build the driver cannot run). LLM_ALLOW_CPU=1 trains on the CPU deliberately. One line per node."""
    if not on_cpu() or os.environ.get("LLM_ALLOW_CPU") == "1" or (n := visible_gpus()) == 0:
        return
    build = ("is a CPU-only build" if torch.version.cuda is None else
             f"is built for CUDA {torch.version.cuda}, which this driver cannot run (torch.cuda.is_available() is "
             "False)")
    if local_rank() != 0:
        raise SystemExit(2)  # every rank of a node finds the same: its local rank 0 says it
    raise UserError(f"{n} NVIDIA GPU(s) visible (nvidia-smi -L) but torch {torch.__version__} {build}, so DeepSpeed "
                    "would train on the CPU — install the CUDA torch for this driver (bash tools/setup_env.sh), or "
                    "set LLM_ALLOW_CPU=1 to train on the CPU deliberately")


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); gloo on CPU, the accelerator's backend (nccl) otherwise. A plain `python`
    start (no launcher) becomes a world of one. Stops first when GPUs are visible but unusable (check_accelerator)."""
    quiet_cpu_accelerator()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    check_accelerator()
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        # The shared-memory allreduce op is JIT-compiled (~30 s, needs g++) and can abort ZeRO-3 at exit.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if "OMP_NUM_THREADS" not in os.environ:  # ranks on one host share its cores
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size()))
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank())
        device = torch.device(acc.device_name(local_rank()))
    if not torch.distributed.is_initialized():
        backend = "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()
        deepspeed.init_distributed(dist_backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def all_reduce(x: float | torch.Tensor, device, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    """x summed (or `op`) over the ranks, as a float64 tensor on `device`."""
    t = (x if isinstance(x, torch.Tensor) else torch.tensor(float(x))).detach().to(device, torch.float64).clone()
    torch.distributed.all_reduce(t, op=op)
    return t


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def raise_together(error: Optional[BaseException]):
    """After rank 0 alone checked something (`error`: what it found wrong, else None), every rank stops when it
    failed: rank 0 raises it (its one line), the others exit 2 silently — none is left waiting in a collective
    rank 0 never joins. One process: `error` is raised as it is."""
    if world_size() > 1 and broadcast(error is not None):
        torch.distributed.destroy_process_group()  # a group left at exit aborts the process (gloo)
        if error is None:
            raise SystemExit(2)  # rank 0 says why
    if error is not None:
        raise error

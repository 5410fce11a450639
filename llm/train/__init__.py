"""The training spine: one loop (`fit`) driven by a `Task` (llm/train/task.py).

    config.py      TrainConfig (the `train:` section of every YAML), TrainState
    plan.py        preflight: batch shape per world size, precision, DeepSpeed config, AdamW + schedule
    dist.py        the launcher's environment (rank, world, local rank) and the process group
    sampler.py     Split: epoch order, rank sharding, length buckets, resumable micro batches
    checkpoint.py  save / find / validate / resume checkpoints, fp32 consolidation
    metrics.py     log line figures (tokens/s, MFU, memory), metrics.csv, TensorBoard, loss.png, stop signals
    loop.py        fit(task, cfg): the step, accumulation, non-finite skipping, eval and save cadence
"""
from llm.train.config import DTYPES, TrainConfig, TrainState
from llm.train.loop import fit
from llm.train.plan import Plan, preflight
from llm.train.sampler import Split
from llm.train.task import Task

__all__ = ["DTYPES", "Plan", "Split", "Task", "TrainConfig", "TrainState", "fit", "preflight"]

"""The GPU benchmark behind bench/gpu.sh: every section in its own process, with its own time cap, results in one
JSON and a markdown table.

    python bench/gpu.py [--dry-run] [--out DIR] [--only train,decode] [--budget SECONDS]

Sections (bench/gpu_train.py, gpu_checks.py, gpu_context.py):
  train            bf16 training tokens/s, MFU and peak memory, ours (eager and compiled) vs transformers'
                   LlamaForCausalLM under the same DeepSpeed config, presets 125M and 350M at ZeRO 0/2/3
  zero_memory      peak torch.cuda.max_memory_allocated of 3 steps per DeepSpeed config (zero0-3, zero3_lowmem;
                   125M, seq 256, micro batch 1, bf16 and fp32), bench/zero_memory.py's table on one GPU: with one
                   rank nothing is partitioned, so it shows each stage's overhead (savings need >1 GPU)
  attention        loss and gradient parity of the model's attention paths (flash-attn when importable, SDPA with
                   only the FLASH/EFFICIENT kernels allowed) against an fp32 math-kernel reference; the SDPA kernel
                   that runs
  bf16_parity      bf16 vs fp32 training losses over the same steps
  fp16             300 fp16 steps through fit() (ZeRO-1, loss scale from 2^16): the scaler's overflow skips are
                   counted apart from non-finite steps, so the run finishes (no max_bad_steps abort)
  zero3_samples    fit() under ZeRO-3 on one GPU with evaluations that decode greedy samples: no hang, and the
                   samples equal the ZeRO-0 path's (plain module) on the same weights
  eval_generate    corpus_perplexity (tools/eval.py ppl) on the GPU vs the CPU, fp32 and bf16; llm.generate greedy
                   vs transformers' generate on the same trained weights on the GPU, single and left-padded batches
  decode           batch-1 greedy decoding tokens/s, llm.generate vs transformers' generate
  context          a tiny model learns to copy, is extended 4x (YaRN + LongLoRA) and passkey-tested at both lengths
  longlora_memory  peak memory of a LongLoRA step at 8k context (125M, bf16), S²-Attn vs full attention

A section that fails or runs out of time records `error` in its entry and the next one runs; an item that fails
inside a section records its error under its own key. `--budget` bounds all sections together: when the caps
still to come (plus each process's start-up) exceed the time left, the next caps shrink in proportion (bench/gpu.sh
passes what is left of its 450 s). `--dry-run` runs everything on CPU with tiny sizes (CI).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# name: (module, function, GPU seconds, dry-run seconds). The GPU caps add up to 465 s: more than the 450 s that
# gpu.sh leaves them, so when every section runs to its cap, `--budget` shrinks the later ones (the quick checks
# usually end well before theirs). The dry-run caps only stop a hang: on a loaded 2-core CI machine the tiny sizes
# still take up to tens of seconds each (~45 s of CPU time in all).
SECTIONS = {
    "train": ("gpu_train", "throughput", 120, 90),
    "zero_memory": ("gpu_train", "zero_memory", 40, 40),
    "attention": ("gpu_checks", "attention", 25, 40),
    "bf16_parity": ("gpu_train", "bf16_parity", 25, 60),
    "fp16": ("gpu_train", "fp16_startup", 35, 60),
    "zero3_samples": ("gpu_train", "zero3_samples", 40, 60),
    "eval_generate": ("gpu_checks", "eval_generate", 35, 45),
    "decode": ("gpu_checks", "decode", 45, 40),
    "context": ("gpu_context", "context_extension", 80, 40),
    "longlora_memory": ("gpu_checks", "longlora_memory", 20, 45),
}
GRACE_S = 20  # past its cap a section's process is killed (it stops itself at the cap when it can)
START_S = 8  # a section process's start-up (imports, CUDA context) before its cap begins, for --budget
MIN_CAP_S = 10  # --budget never shrinks a cap below this (the section skips what does not fit)


class Section:
    """What a section function gets: its time left, dry-run or not, the device, and `put`/`row`, which save the
    section's results to disk at once (a section killed at its cap keeps what it had)."""

    def __init__(self, name: str, dry: bool, budget: float, part: Path):
        import torch

        self.name, self.dry, self.budget, self.part = name, dry, budget, part
        self.t0 = time.perf_counter()
        self.data: dict = {}
        self.device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def put(self, key: str, value):
        self.data[key] = value
        self._save()

    def row(self, key: str, value: dict):
        """Append a row to the table `key` (a list of dicts with the same keys)."""
        self.data.setdefault(key, []).append(value)
        self._save()

    def skip(self, key: str, need_s: float) -> bool:
        """True (and `key` recorded as skipped) when less than `need_s` seconds are left."""
        if self.left() >= need_s:
            return False
        self.put(key, {"skipped": f"time budget ({self.left():.0f} s left, ~{need_s:.0f} s needed)"})
        return True

    @contextlib.contextmanager
    def guard(self, key: str):
        """Run an item; an exception is recorded as {"error": ...} under `key` and the section goes on. An item
        still running at the section's cap is interrupted (SIGALRM raises TimeoutError in it: a compilation, a
        training loop), so the section ends itself with its results saved instead of being killed."""

        def alarm(*_):
            raise TimeoutError(f"interrupted at the section's {self.budget:.0f} s cap")

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.5))
        try:
            yield
        except Exception as e:  # noqa: BLE001 - any failure of one item must not lose the others
            traceback.print_exc()
            self.put(key, {"error": f"{type(e).__name__}: {str(e)[:500]}"})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if self.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()

    def _save(self):
        tmp = self.part.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
        tmp.replace(self.part)


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


# ----------------------------------------------------------------------------------------------- child
def run_sections(names: list[str], dry: bool, parts: Path, caps: list[float]) -> None:
    """Run sections one after the other in this process, each into parts/<name>.json under its cap (seconds)."""
    import importlib

    for name, cap in zip(names, caps):
        module, fn = SECTIONS[name][:2]
        t = time.perf_counter()
        if len(names) > 1:
            print(f"\n--- {name} (cap {cap:.0f} s) ---", flush=True)
        sec = Section(name, dry, cap, parts / f"{name}.json")
        sec._save()
        try:
            getattr(importlib.import_module(module), fn)(sec)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            sec.put("error", f"{type(e).__name__}: {str(e)[:500]}")
        sec.put("elapsed_s", round(time.perf_counter() - t, 1))
        print(f"--- {name}: {sec.data['elapsed_s']} s", flush=True)


# ----------------------------------------------------------------------------------------------- parent
def errors_in(obj, path: str = "") -> list[str]:
    """Every `error` (and `skipped`) entry in a nested result, as 'path: message'."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            here = f"{path}.{k}" if path else k
            if k in ("error", "skipped") and isinstance(v, str):
                found.append(f"{here}: {v}")
            else:
                found += errors_in(v, here)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += errors_in(v, f"{path}[{i}]")
    return found


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        return f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v, default=_jsonable)
        return s if len(s) <= 80 else s[:77] + "..."
    return str(v).replace("|", "/").replace("\n", " ")


def markdown(result: dict) -> str:
    """One heading per section: its scalars as a two-column table, each list of rows as a table of its own."""
    env = result["env"]
    out = ["# GPU benchmark (bench/gpu.sh)", "",
           " · ".join(f"{k} {fmt(v)}" for k, v in env.items()), ""]
    for name, sec in result["sections"].items():
        cap = f" of a {fmt(sec['cap_s'])} s cap" if "cap_s" in sec else ""
        out += [f"## {name} ({fmt(sec.get('elapsed_s'))} s{cap})", ""]
        scalars = []

        def walk(d: dict, prefix: str = ""):
            for k, v in d.items():
                if isinstance(v, dict) and v and all(not isinstance(x, (dict, list)) for x in v.values()) \
                        and len(v) <= 3:
                    scalars.append((prefix + k, ", ".join(f"{a}={fmt(b)}" for a, b in v.items())))
                elif isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                elif isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
                    tables.append((prefix + k, v))
                else:
                    scalars.append((prefix + k, fmt(v)))

        tables: list = []
        walk({k: v for k, v in sec.items() if k not in ("elapsed_s", "cap_s")})
        if scalars:
            out += ["| item | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in scalars] + [""]
        for key, rows in tables:
            cols = list(dict.fromkeys(c for r in rows for c in r))
            out += [f"**{key}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows] + [""]
    return "\n".join(out)


def environment(dry: bool) -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    env = {"mode": "dry-run (CPU)" if dry else "gpu", "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "deepspeed", "peft", "flash-attn"):
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = None
    if torch.cuda.is_available() and not dry:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def shrink(caps: list[float], later: list[float], left: float) -> list[float]:
    """`caps` (the next process's sections), scaled down in proportion when they and the `later` ones, each with a
    process start-up, would not fit in the `left` seconds; never below MIN_CAP_S."""
    total = sum(caps) + sum(later)
    room = left - START_S * (len(caps) + len(later))
    if total <= room:
        return caps
    return [max(MIN_CAP_S, round(c * max(room, 0) / total)) for c in caps]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, every section (CI)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/gpu", help="folder for gpu.json and gpu.md")
    ap.add_argument("--only", default=None, help="comma-separated sections (default: all)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all sections together: later caps shrink in proportion to fit (default: none)")
    ap.add_argument("--sections", help=argparse.SUPPRESS)  # child mode: run these into --parts
    ap.add_argument("--caps", help=argparse.SUPPRESS)
    ap.add_argument("--parts", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.sections:
        run_sections(a.sections.split(","), a.dry_run, Path(a.parts), [float(c) for c in a.caps.split(",")])
        return 0

    names = a.only.split(",") if a.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"env": environment(a.dry_run), "sections": {}}
    t_all = time.perf_counter()
    # On the GPU a process per section: a crash, a hang or a poisoned CUDA context costs one section. The dry run
    # shares one process (start-up and imports are most of its time on a 2-core CPU).
    groups = [names] if a.dry_run else [[n] for n in names]
    with tempfile.TemporaryDirectory() as parts:  # not under --out: the device returns only a few files from $OUT
        col = 3 if a.dry_run else 2
        for i, group in enumerate(groups):
            caps = [SECTIONS[n][col] for n in group]
            if a.budget is not None:
                later = [SECTIONS[n][col] for g in groups[i + 1:] for n in g]
                caps = shrink(caps, later, a.budget - (time.perf_counter() - t_all))
            cap = sum(caps)
            if len(group) == 1:
                print(f"\n=== {group[0]} (cap {cap:.0f} s) ===", flush=True)
            t = time.perf_counter()
            cmd = [sys.executable, __file__, "--sections", ",".join(group), "--caps", ",".join(map(str, caps)),
                   "--parts", parts]
            try:
                rc = subprocess.run(cmd + (["--dry-run"] if a.dry_run else []), timeout=cap + GRACE_S).returncode
                why = None if rc == 0 else f"process exited with code {rc}"
            except subprocess.TimeoutExpired:
                why = f"killed after {cap + GRACE_S} s (cap {cap} s)"
            for name, c in zip(group, caps):
                try:
                    data = json.loads((Path(parts) / f"{name}.json").read_text())
                except (OSError, json.JSONDecodeError):
                    data = {"error": "did not start (an earlier section ended the process)"} if len(group) > 1 else {}
                if why and "elapsed_s" not in data:  # the section that was running when the process ended
                    data["error"] = why + (f"; before that: {data['error']}" if "error" in data else "")
                data.setdefault("elapsed_s", round(time.perf_counter() - t, 1))
                data["cap_s"] = c
                result["sections"][name] = data
                problems = errors_in(data)
                print(f"=== {name}: {data['elapsed_s']} s, "
                      + (f"{len(problems)} error(s)/skip(s)" if problems else "ok"), flush=True)
            (out / "gpu.json").write_text(json.dumps(result, indent=1, default=_jsonable))
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    (out / "gpu.json").write_text(json.dumps(result, indent=1, default=_jsonable))
    md = markdown(result)
    (out / "gpu.md").write_text(md + "\n")
    print("\n" + md)
    for name, data in result["sections"].items():
        for p in errors_in(data):
            print(f"! {name}.{p}")
    print(f"\nwrote {out / 'gpu.json'} and {out / 'gpu.md'} ({result['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a 1-8 GPU user hits first, checked on a CPU machine: run.sh's choice of GPUs (CUDA_VISIBLE_DEVICES
honoured), tools/setup_env.sh's pinned CUDA torch, the startup check that refuses a CPU fallback when GPUs are
visible, and the precision decisions made for GPUs (grad accumulation dtype, TF32, fp16 loss-scale skips).
A fake `nvidia-smi` on PATH stands in for the driver."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def fake_nvidia_smi(bin_dir: Path, n: int = 4, cuda: str = "12.8") -> Path:
    """An `nvidia-smi` that lists `n` H100s (-L) and reports driver CUDA version `cuda` (no arguments)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    gpus = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-0000000{i})"\n' for i in range(n))
    (bin_dir / "nvidia-smi").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-L" ]; then\n{gpus}exit 0\nfi\n'
        f'echo "| NVIDIA-SMI 570.86.15    Driver Version: 570.86.15    CUDA Version: {cuda}     |"\n')
    (bin_dir / "nvidia-smi").chmod(0o755)
    return bin_dir


def run_sh(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    """`bash run.sh --print-plan ARGS` with the fake driver first on PATH."""
    e = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    e |= {"PATH": f"{fake_nvidia_smi(tmp_path / 'bin')}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(ROOT / "run.sh"), "--print-plan", *args], env=e, capture_output=True,
                          text=True, timeout=60)


def plan(tmp_path, *args, **env) -> dict[str, str]:
    """The `key: value` lines of run.sh's plan."""
    r = run_sh(tmp_path, *args, **env)
    assert r.returncode == 0, r.stderr
    return dict(line.split(": ", 1) for line in r.stdout.splitlines())


def test_run_sh_honours_cuda_visible_devices(tmp_path):
    p = plan(tmp_path, CUDA_VISIBLE_DEVICES="1,3")
    assert p["gpus"].startswith("2 ") and p["config"] == "configs/pretrain/25M.yaml"
    assert p["launch"] == "env -u CUDA_VISIBLE_DEVICES .venv/bin/deepspeed --include localhost:1,3"
    p = plan(tmp_path, "--gpus", "1", CUDA_VISIBLE_DEVICES="1,3")
    assert p["gpus"].startswith("1 ") and p["launch"].endswith("--include localhost:1")
    p = plan(tmp_path)  # no CUDA_VISIBLE_DEVICES: all that nvidia-smi lists
    assert p["gpus"] == "4" and p["launch"] == ".venv/bin/deepspeed --num_gpus 4"
    p = plan(tmp_path, CUDA_VISIBLE_DEVICES="")  # set but empty: no GPU
    assert p["gpus"].startswith("0 ") and p["config"] == "configs/pretrain/cpu-demo.yaml"
    assert p["launch"] == ".venv/bin/python"
    r = run_sh(tmp_path, CUDA_VISIBLE_DEVICES="GPU-00000001")  # UUIDs: the launcher's --include needs indices
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'GPU-00000001' is not a GPU index" in r.stderr


def setup_torch(tmp_path, cuda, **env) -> subprocess.CompletedProcess:
    """`bash tools/setup_env.sh --print-torch` with a driver reporting CUDA `cuda` (None: nvidia-smi fails)."""
    bin_dir = fake_nvidia_smi(tmp_path / "bin", cuda=cuda or "")
    if cuda is None:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    e = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_INDEX")}
    e |= {"PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(ROOT / "tools" / "setup_env.sh"), "--print-torch"], env=e,
                          capture_output=True, text=True, timeout=60)


def test_setup_env_pins_the_cuda_torch_the_driver_runs(tmp_path):
    want = {None: "torch: torch==2.13.0",  # no working driver: the CPU build, as before
            "12.8": "torch: torch==2.13.0 from https://download.pytorch.org/whl/cu128",
            "12.9": "torch: torch==2.13.0 from https://download.pytorch.org/whl/cu128",
            "12.10": "torch: torch==2.13.0 from https://download.pytorch.org/whl/cu128",
            "13.1": "torch: torch==2.13.0 from https://download.pytorch.org/whl/cu130",
            "12.6": "torch: torch==2.13.0 from https://download.pytorch.org/whl/cu126"}
    for cuda, line in want.items():
        r = setup_torch(tmp_path, cuda)
        assert (r.returncode, r.stdout.strip()) == (0, line), (cuda, r.stderr)
    r = setup_torch(tmp_path, "12.4")  # too old a driver for every build: one line, before anything is installed
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "supports CUDA 12.4" in r.stderr
    r = setup_torch(tmp_path, "12.4", TORCH_SPEC="torch==2.6.0", TORCH_INDEX="https://download.pytorch.org/whl/cu124")
    assert r.stdout.strip() == "torch: torch==2.6.0 from https://download.pytorch.org/whl/cu124"


def test_visible_gpus_with_a_cpu_torch_stop_the_run_in_one_line(tmp_path, monkeypatch):
    """GPUs visible (nvidia-smi lists them, CUDA_VISIBLE_DEVICES=0) and this CPU-only torch: DeepSpeed would pick the
    CPU, so init_distributed stops before joining any process group; LLM_ALLOW_CPU=1 lets it go on."""
    import torch

    from llm.errors import UserError
    from llm.train.dist import check_accelerator, init_distributed, on_cpu, visible_gpus

    assert on_cpu() and torch.version.cuda is None  # this machine: the CPU wheel
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin', n=2)}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("LLM_ALLOW_CPU", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert visible_gpus() == 2
    with pytest.raises(UserError) as e:
        init_distributed()
    msg = str(e.value)
    assert "2 NVIDIA GPU(s) visible (nvidia-smi -L) but torch" in msg and "is a CPU-only build" in msg
    assert "bash tools/setup_env.sh" in msg and "LLM_ALLOW_CPU=1" in msg and "\n" not in msg
    monkeypatch.setenv("LOCAL_RANK", "1")  # the node's other ranks exit quietly
    with pytest.raises(SystemExit) as e:
        check_accelerator()
    assert e.value.code == 2
    monkeypatch.setenv("LLM_ALLOW_CPU", "1")
    check_accelerator()  # deliberate: no error
    monkeypatch.delenv("LLM_ALLOW_CPU")
    for hidden in ("", "-1"):  # every GPU hidden on purpose: the CPU is what the user asked for
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert visible_gpus() == 0
        check_accelerator()


def test_startup_line_names_device_precision_attention_and_world(monkeypatch):
    import torch

    import llm.model
    from llm.model import attention_kernel
    from llm.train.metrics import device_label

    assert device_label(torch.device("cpu")) == "cpu" and attention_kernel(torch.device("cpu"), "bf16") == "sdpa"
    monkeypatch.setattr(llm.model, "flash_attn_func", lambda *a, **k: None)  # as if flash-attn were installed
    assert attention_kernel(torch.device("cuda", 0), "bf16") == "flash-attn"
    assert attention_kernel(torch.device("cuda", 0), "fp32") == "sdpa"  # flash-attn takes 16-bit only


def test_precision_decisions_for_gpus(tmp_path, monkeypatch):
    """bf16 with accumulation sums gradients in fp32 where DeepSpeed supports it (ZeRO-2); fp16's loss-scale
    overflow skips do not count toward max_bad_steps unless the loss itself is non-finite."""
    from llm.train import TrainConfig, preflight
    from llm.train.loop import is_bad_step

    monkeypatch.delenv("RANK", raising=False)
    for stage, accum, want in ((2, 2, "fp32"), (2, 4, "fp32"), (2, 1, None), (1, 2, None), (0, 2, None), (3, 2, None)):
        cfg = TrainConfig(run_dir=str(tmp_path / "r"), ds_config=f"zero{stage}", precision="bf16", micro_batch_size=2,
                          grad_accum=accum)
        assert preflight(cfg, world_size=2).ds_config.get("data_types", {}).get("grad_accum_dtype") == want
    cfg = TrainConfig(run_dir=str(tmp_path / "r"), ds_config="zero2", precision="fp32", grad_accum=4)
    assert "data_types" not in preflight(cfg, world_size=2).ds_config
    assert not is_bad_step("fp16", 10.3)  # the scaler's overflow skip: normal while the scale settles
    assert is_bad_step("fp16", float("nan")) and is_bad_step("fp16", float("inf"))
    assert is_bad_step("bf16", 10.3) and is_bad_step("fp32", 10.3)  # there a skip means a non-finite gradient


def test_mfu_counts_no_weight_gradients_for_frozen_weights_and_gpu_peaks(monkeypatch):
    import torch

    from llm.config import ModelArgs
    from llm.model import Transformer
    from llm.train.metrics import peak_flops, train_flops_per_token

    args = ModelArgs.from_preset("debug")
    model = Transformer(args)
    full = args.flops_per_token(64)
    assert train_flops_per_token(model, full) == full
    matrices = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for p in model.parameters():  # LoRA-like: every matrix frozen, the norms trained
        p.requires_grad_(p.ndim < 2)
    frozen = sum(p.numel() for p in {id(p): p for p in matrices}.values())
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * 64
    assert train_flops_per_token(model, full) == 4 * frozen + (full - attention - 6 * frozen) + attention
    want = {"NVIDIA H200 NVL": 835, "NVIDIA H800 PCIe": 756, "NVIDIA H200": 989, "NVIDIA H100 80GB HBM3": 989,
            "NVIDIA H100 PCIe": 756, "NVIDIA A100-SXM4-80GB": 312}
    for name, tflops in want.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert peak_flops(torch.device("cuda", 0)) == tflops * 1e12, name


def test_run_sh_divides_the_cores_between_ranks(tmp_path):
    nproc = len(os.sched_getaffinity(0))
    assert plan(tmp_path)["OMP_NUM_THREADS"] == str(max(1, nproc // 4))  # 4 GPU ranks
    assert plan(tmp_path, CUDA_VISIBLE_DEVICES="")["OMP_NUM_THREADS"] == str(nproc)  # one CPU process
    assert plan(tmp_path, OMP_NUM_THREADS="3")["OMP_NUM_THREADS"] == "3"  # the user's choice stands

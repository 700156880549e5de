"""The only module that talks to DeepSpeed: launcher variables, the process group, and the engine.

Rank variables are understood from every launcher users have: the `deepspeed` launcher and torchrun
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`; the injected `--local_rank` flag too),
SLURM's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) and Open MPI's `mpirun`
(`OMPI_COMM_WORLD_*`). A plain `python launch/train.py` is a world of one.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm.config import ConfigError

REPO_DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def normalize_launcher_env(env: dict[str, str] | None = None, local_rank_flag: int | None = None) -> DistEnv:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK (and MASTER_* for one process) from whichever launcher started us."""
    env = os.environ if env is None else env
    pid, _, seen = env.get("VLM_LAUNCHER", "").partition(":")
    if pid == str(os.getpid()):  # already normalised in this process (children inherit env, not this marker's pid)
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), seen)
    launcher = "deepspeed/torchrun"
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        launcher = "slurm"
    elif "RANK" not in env and "OMPI_COMM_WORLD_RANK" in env:
        env["RANK"], env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        launcher = "openmpi"
    elif "RANK" not in env:
        env["RANK"], env["WORLD_SIZE"] = "0", "1"
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
        launcher = "single process"
    if "LOCAL_RANK" not in env:
        env["LOCAL_RANK"] = str(local_rank_flag if local_rank_flag is not None else 0)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    env["VLM_LAUNCHER"] = f"{os.getpid()}:{launcher}"
    return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), launcher)


def launcher_problems(env: dict[str, str] | None = None) -> list[str]:
    """Inconsistent launcher variables, found before any process group is formed."""
    env = os.environ if env is None else env
    problems = []
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except (KeyError, ValueError) as err:
        return [f"launcher variables RANK/WORLD_SIZE/LOCAL_RANK are missing or not integers ({err})"]
    if not 0 <= rank < world:
        problems.append(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    if not 0 <= local <= rank:
        problems.append(f"LOCAL_RANK={local} must be in 0..RANK ({rank})")
    if world > 1 and not env.get("MASTER_ADDR"):
        problems.append("MASTER_ADDR is not set for a multi-process run")
    port = env.get("MASTER_PORT", "")
    if not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(f"MASTER_PORT={port!r} is not a valid port")
    return problems


def _skip_cpu_shm_comm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op at start-up (~35 s on 2 cores, needs g++).

    Gloo does the same job for the small CPU runs this project makes (tests, the demo), so we skip the build
    unless VLM_DS_SHM_COMM=1 asks for it. `deepspeed.comm.torch` is shadowed by the `torch` attribute of
    `deepspeed.comm`, hence the sys.modules lookup.
    """
    if os.environ.get("VLM_DS_SHM_COMM") == "1":
        return
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_distributed(timeout_minutes: int = 30) -> DistEnv:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    env = normalize_launcher_env()
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        _skip_cpu_shm_comm_build()
    else:
        accelerator.set_device(env.local_rank)
    deepspeed.init_distributed(
        dist_backend=accelerator.communication_backend_name(),
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        verbose=False,
    )
    return env


def device_for_rank(local_rank: int, requested: str = "auto"):
    """The torch.device this rank computes on: the accelerator of LOCAL_RANK unless the config says otherwise."""
    import torch
    from deepspeed.accelerator import get_accelerator

    if requested != "auto":
        return torch.device(requested)
    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, local_rank)


def read_ds_config(zero_stage: int, path: str | None) -> dict[str, Any]:
    source = Path(path) if path else REPO_DS_CONFIGS / f"zero{zero_stage}.json"
    if not source.is_file():
        raise ConfigError([f"DeepSpeed config {source} does not exist (train.deepspeed_config / train.zero_stage)"])
    try:
        data = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError([f"DeepSpeed config {source} is not valid JSON: {err}"]) from err
    if not isinstance(data, dict):
        raise ConfigError([f"DeepSpeed config {source} must hold a JSON object"])
    return data


_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_OWNED_KEYS = ("optimizer", "scheduler", "gradient_clipping")


def batch_problems(batch_size: int, accumulation: int, world_size: int, global_batch: int | None = None) -> list[str]:
    """global batch = micro batch x accumulation x data-parallel world size, checked once, clearly."""
    problems = []
    if batch_size < 1 or accumulation < 1 or world_size < 1:
        problems.append(
            f"batch arithmetic needs positive numbers: batch_size={batch_size}, "
            f"accumulation_steps={accumulation}, world size={world_size}"
        )
    elif global_batch is not None and global_batch != batch_size * accumulation * world_size:
        problems.append(
            f"global batch {global_batch} != batch_size {batch_size} x accumulation_steps {accumulation} x "
            f"world size {world_size} = {batch_size * accumulation * world_size}"
        )
    return problems


def _precision(ds: dict[str, Any], dtype: str) -> list[str]:
    """Fill bf16/fp16 'enabled' from the YAML dtype; report explicit JSON settings that contradict it."""
    want = {"bf16": dtype == "bfloat16", "fp16": dtype == "float16"}
    problems = []
    for key, enabled in want.items():
        section = ds.setdefault(key, {})
        current = section.get("enabled", "auto")
        if current != "auto" and bool(current) != enabled:
            problems.append(f"the DeepSpeed config sets {key}.enabled={current} but train.dtype is {dtype!r}")
        section["enabled"] = enabled
    return problems


def build_ds_config(
    train_cfg, world_size: int, total_steps: int, on_cpu: bool, monitor_dir: str | None = None
) -> dict[str, Any]:
    """The DeepSpeed config: ZeRO/precision/offload from JSON, everything else from the YAML (one source)."""
    ds = read_ds_config(train_cfg.zero_stage, train_cfg.deepspeed_config)
    problems = [f"remove '{k}' from the DeepSpeed config: batch sizes come from the YAML" for k in _BATCH_KEYS if k in ds]
    problems += [f"remove '{k}' from the DeepSpeed config: it is set from the YAML's train section" for k in _OWNED_KEYS if k in ds]
    problems += batch_problems(train_cfg.batch_size, train_cfg.accumulation_steps, world_size)
    problems += _precision(ds, train_cfg.dtype)
    if problems:
        raise ConfigError(problems)
    ds["train_micro_batch_size_per_gpu"] = train_cfg.batch_size
    ds["gradient_accumulation_steps"] = train_cfg.accumulation_steps
    ds["train_batch_size"] = train_cfg.batch_size * train_cfg.accumulation_steps * world_size
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": train_cfg.learning_rate,
            "betas": list(train_cfg.betas),
            "eps": 1e-8,
            "weight_decay": train_cfg.weight_decay,
            # torch's AdamW on CPU: DeepSpeed's fused/CPU Adam would be JIT-compiled first.
            "torch_adam": on_cpu and not offload,
        },
    }
    ds["scheduler"] = {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": max(total_steps, train_cfg.warmup_steps + 1),
            "warmup_num_steps": train_cfg.warmup_steps,
            "warmup_min_ratio": 0.0,
            "warmup_type": "linear",
            "cos_min_ratio": train_cfg.min_lr_ratio,
        },
    }
    if train_cfg.grad_clip > 0:
        ds["gradient_clipping"] = train_cfg.grad_clip
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves, every log_interval steps
    if monitor_dir is not None:
        ds["csv_monitor"] = {"enabled": True, "output_path": monitor_dir, "job_name": "train"}
        if importlib.util.find_spec("tensorboard") is not None:
            ds["tensorboard"] = {"enabled": True, "output_path": monitor_dir, "job_name": "train"}
        if train_cfg.wandb_project:
            ds["wandb"] = {"enabled": True, "project": train_cfg.wandb_project}
    return ds


def build_engine(model, ds_config: dict[str, Any]):
    """Wrap the model in a DeepSpeed engine; only parameters that require grad reach the optimizer."""
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: check train.trainable / train.trainable_patterns")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    return engine

"""The DeepSpeed JSON config of a run: ZeRO, precision and offload from `ds_configs/`, everything else from the YAML.

Batch sizes, the optimizer and clipping are filled in from the `train` section (one source; the schedule is
`vlm.train.schedule`'s);
a DeepSpeed JSON that sets them itself is a configuration error, and so is one that turns on DeepSpeed's own
CSV/TensorBoard/W&B/Comet monitors (the trainer's `vlm.train.monitor` writes every metric, keyed by optimizer
step; DeepSpeed's would log a few of them again, keyed by sample count). Nothing here imports DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm.config import ConfigError, TrainConfig
from vlm.data.plan import Geometry

REPO_DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


def read_ds_config(zero_stage: int, path: str | None) -> dict[str, Any]:
    """The JSON at `path`, or `ds_configs/zero<zero_stage>.json`; ConfigError if missing or not a JSON object."""
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
_MONITOR_KEYS = ("csv_monitor", "tensorboard", "wandb", "comet")


def ds_config_problems(train_cfg: TrainConfig) -> list[str]:
    """Every problem of the run's DeepSpeed JSON: unreadable, or setting what the YAML owns, or a precision
    that contradicts train.dtype. The preflight reports them; `build_ds_config` raises them."""
    try:
        ds = read_ds_config(train_cfg.zero_stage, train_cfg.deepspeed_config)
    except ConfigError as err:
        return err.problems
    problems = [f"remove '{k}' from the DeepSpeed config: batch sizes come from the YAML" for k in _BATCH_KEYS if k in ds]
    problems += [f"remove '{k}' from the DeepSpeed config: it is set from the YAML's train section" for k in _OWNED_KEYS if k in ds]
    problems += [f"remove '{k}' from the DeepSpeed config: metrics go to train.monitors and train.wandb_project"
                 for k in _MONITOR_KEYS if isinstance(ds.get(k), dict) and ds[k].get("enabled")]
    return problems + _precision(ds, train_cfg.dtype)


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


def build_ds_config(train_cfg: TrainConfig, geometry: Geometry, on_cpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict: ZeRO/precision/offload from the JSON, batch sizes from `geometry` (the
    one batch arithmetic, `vlm.data.plan.Geometry`), optimizer and clipping from `train_cfg` (the learning
    rate schedule is `vlm.train.schedule`'s, handed to the engine).

    `on_cpu` picks torch's AdamW (DeepSpeed's fused Adam would be
    JIT-compiled first). DeepSpeed's monitors stay off: `vlm.train.monitor` logs the metrics.
    Raises ConfigError with every problem of `ds_config_problems`.
    """
    problems = ds_config_problems(train_cfg)
    if problems:
        raise ConfigError(problems)
    ds = read_ds_config(train_cfg.zero_stage, train_cfg.deepspeed_config)
    _precision(ds, train_cfg.dtype)
    ds["train_micro_batch_size_per_gpu"] = geometry.batch_size
    ds["gradient_accumulation_steps"] = geometry.accumulation
    ds["train_batch_size"] = geometry.global_batch
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
    if train_cfg.grad_clip > 0:
        ds["gradient_clipping"] = train_cfg.grad_clip
    if train_cfg.async_checkpoint:  # the plain Python file writer: DeepSpeed's fast one needs its async I/O op
        ds.setdefault("checkpoint", {})["writer"] = {"type": "PYTHON", "decoupled": True}
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves, every log_interval steps
    return ds

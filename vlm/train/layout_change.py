"""Resuming a checkpoint under another ZeRO stage or another number of ranks, through one stage-neutral folder.

DeepSpeed's universal checkpoint holds, per trainable parameter, the full fp32 master weight and the Adam
moments (`zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`) plus the optimizer's global state
(`zero/optimizer_state.pt`) and the rank-0 engine state (schedule, counters). DeepSpeed 0.19.8's converter
(`ds_to_universal`) reads ZeRO-1/2/3 checkpoints but writes two dialects: a ZeRO-3 conversion stores bare
tensors and an `optimizer_state.pt` the ZeRO-1/2 loader refuses ("Empty ds_version"), a ZeRO-1/2 one lacks the
`optimizer_state_dict` the ZeRO-3 loader reads, and nothing reads or writes ZeRO-0 (no partition files).

`build_universal` writes one dialect that DeepSpeed's own universal loaders of ZeRO-1, 2 and 3 all read, from
a checkpoint of any stage (ZeRO-0's model-states file is read here); `load_into_zero0` restores a ZeRO-0 engine
(torch's AdamW, or DeepSpeed's unfused bf16/fp16 wrapper) from it, which DeepSpeed cannot. Frozen parameters
are not in it (DeepSpeed's universal load does not restore them either): they keep the values the run builds
them with, the same starting weights as the run that wrote the checkpoint.

The files read here are DeepSpeed's pickles of your own run (`torch.load(weights_only=False)`, as DeepSpeed's
loader does): resume only checkpoints you wrote.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from vlm.train.checkpoint import CheckpointError

HP_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def rank0_model_states(checkpoint: Path) -> dict[str, Any]:
    """The rank-0 engine state of a DeepSpeed checkpoint folder (module, schedule, counters; ZeRO-0's optimizer)."""
    for name in MODEL_STATES:
        if (checkpoint / name).is_file():
            return _load(checkpoint / name)
    raise CheckpointError(f"{checkpoint} holds no DeepSpeed model-states file ({' or '.join(MODEL_STATES)})")


def build_universal(checkpoint: Path, zero_stage: int, names: list[str], target: Path,
                    convert: Any) -> None:
    """Write the stage-neutral universal folder of `checkpoint` (written under `zero_stage`) to `target`.

    `names`: the trainable parameters in optimizer order (`module.named_parameters()` with requires_grad), used
    to name ZeRO-0's per-index optimizer state. `convert(checkpoint, target)`: DeepSpeed's converter for
    ZeRO-1/2/3 (`vlm.train.distributed.convert_to_universal`), returning None or its error text.
    Raises CheckpointError naming what could not be read.
    """
    if target.exists():
        shutil.rmtree(target)
    states = rank0_model_states(checkpoint)
    if zero_stage == 0:
        param_group, step = _write_zero0_params(states.get("optimizer"), states.get("module", {}), names,
                                                target / "zero", checkpoint)
        global_state: dict[str, Any] = {}
    else:
        error = convert(checkpoint, target)
        if error is not None:
            raise CheckpointError(f"converting {checkpoint} to a universal checkpoint failed:\n{error}")
        global_state = _load(target / "zero" / "optimizer_state.pt")
        param_group = dict(global_state["param_groups"][0])
        step = _saved_adam_step(checkpoint, zero_stage)
        _normalise_params(target / "zero", step)
    param_group["params"] = [0]
    param_group["step"] = float(step)  # DeepSpeed's FusedAdam (GPU) counts per group; torch's AdamW ignores it
    # A superset of what the ZeRO-1/2 loader (`_load_global_state`, param_groups, per-parameter step.pt) and
    # the ZeRO-3 loader (`optimizer_state_dict`) read.
    global_state.update({
        "ds_version": states.get("ds_version"),
        "param_groups": [param_group],
        "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": [param_group]},
    })
    torch.save(global_state, target / "zero" / "optimizer_state.pt")
    engine_state = {k: v for k, v in states.items() if k not in ("module", "optimizer")}
    engine_state.update(module={}, optimizer=None)
    for name in MODEL_STATES:  # the file name each stage's loader looks for
        torch.save(engine_state, target / name)


def _write_zero0_params(optimizer: Any, module: dict[str, torch.Tensor], names: list[str], zero_dir: Path,
                        checkpoint: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """Per-parameter files from a ZeRO-0 optimizer state; returns (its param group, Adam's step count)."""
    if not isinstance(optimizer, dict):
        raise CheckpointError(f"{checkpoint} holds no optimizer state to convert")
    if "fp32_groups_flat" in optimizer:
        raise CheckpointError(f"{checkpoint} was written by DeepSpeed's fused fp16/bf16 ZeRO-0 optimizer, which "
                              "this trainer does not convert: resume it with --zero_stage 0")
    if "fp32_groups" in optimizer:  # DeepSpeed's unfused bf16/fp16 wrapper: fp32 copies beside a torch optimizer
        torch_state, masters = optimizer["optimizer_state_dict"], list(optimizer["fp32_groups"][0])
    else:  # fp32: torch's optimizer on the module's own parameters
        torch_state, masters = optimizer, [module[name] for name in names if name in module]
    if len(torch_state["param_groups"]) != 1 or len(masters) != len(names):
        raise CheckpointError(f"{checkpoint}: its optimizer holds {len(masters)} parameters, this run trains "
                              f"{len(names)}: resume with the same train.trainable")
    per_index = torch_state["state"]
    for index, name in enumerate(names):
        state = per_index.get(index, {})
        values = {"fp32": masters[index], "exp_avg": state.get("exp_avg"), "exp_avg_sq": state.get("exp_avg_sq")}
        folder = zero_dir / name
        folder.mkdir(parents=True)
        for key, value in values.items():
            if value is None:  # never stepped (a run stopped before its first optimizer step)
                value = torch.zeros_like(masters[index], dtype=torch.float32)
            torch.save({"param": value.float().reshape(masters[index].shape)}, folder / f"{key}.pt")
    step = _step_of(torch_state)
    for name in names:
        torch.save(step, zero_dir / name / "step.pt")
    return dict(torch_state["param_groups"][0]), step


def _normalise_params(zero_dir: Path, step: torch.Tensor) -> None:
    """Every per-parameter file as {'param': tensor} (what the ZeRO-1/2 loader needs), one step.pt each."""
    for folder in zero_dir.iterdir():
        if not folder.is_dir():
            continue
        for key in HP_KEYS:
            if not (folder / f"{key}.pt").is_file():  # a tied alias (lm_head of a shared embedding): never read
                continue
            value = _load(folder / f"{key}.pt")
            if torch.is_tensor(value):
                torch.save({"param": value}, folder / f"{key}.pt")
        torch.save(step, folder / "step.pt")


def _saved_adam_step(checkpoint: Path, zero_stage: int) -> torch.Tensor:
    """Adam's step count in rank 0's optimizer file of a ZeRO-1/2/3 checkpoint."""
    files = sorted(checkpoint.glob("*zero_pp_rank_0_*optim_states.pt"))
    if not files:
        raise CheckpointError(f"{checkpoint} holds no ZeRO-{zero_stage} optimizer file for rank 0")
    saved = _load(files[0])["optimizer_state_dict"]
    inner = saved.get("base_optimizer_state") or saved.get("optimizer_state_dict") or {}
    return _step_of(inner, fallback=saved.get("base_optimizer_state_step"))


def _step_of(torch_state: dict[str, Any], fallback: Any = None) -> torch.Tensor:
    """The step count of a torch optimizer state dict: the largest per-parameter or per-group `step` (DeepSpeed's
    FusedAdam advances only its last parameter's and keeps the group's at 0), else `fallback`, else 0."""
    steps = [float(state["step"]) for state in (torch_state.get("state") or {}).values() if "step" in state]
    steps += [float(group["step"]) for group in torch_state.get("param_groups") or [] if "step" in group]
    if fallback is not None:
        steps.append(float(fallback))
    return torch.tensor(max(steps, default=0.0))  # 0: no step taken yet


def load_into_zero0(engine, universal: Path, named: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
    """Restore a ZeRO-0 engine from a universal folder of `build_universal`: master weights, Adam moments and
    step, the module's weights (cast to their dtype), the schedule and the engine's step counters.

    `named`: the engine module's trainable (name, parameter) pairs. Raises CheckpointError for DeepSpeed's
    fused fp16/bf16 wrapper (GPU), whose flat buffers this does not write.
    """
    zero_dir = universal / "zero"
    optimizer, basic = engine.optimizer, engine.basic_optimizer
    if hasattr(optimizer, "fp32_groups_flat"):
        raise CheckpointError("DeepSpeed's fused fp16/bf16 ZeRO-0 optimizer cannot take a checkpoint of another "
                              "ZeRO stage: resume with the stage the checkpoint was written under")
    masters = {}
    if hasattr(optimizer, "fp32_groups"):  # unfused bf16/fp16 wrapper: an fp32 copy per parameter
        for low, high in zip((p for g in optimizer.fp16_groups for p in g), (p for g in optimizer.fp32_groups for p in g)):
            masters[id(low)] = high
    step = torch.as_tensor(_load(zero_dir / "optimizer_state.pt")["optimizer_state_dict"]["state"][0]["step"])
    with torch.no_grad():
        for name, param in named:
            folder = zero_dir / name
            if not folder.is_dir():
                raise CheckpointError(f"{universal} holds no state for parameter {name}: the checkpoint trained "
                                      "other parameters; resume with the same train.trainable")
            values = {key: _load(folder / f"{key}.pt")["param"].reshape(param.shape) for key in HP_KEYS}
            master = masters.get(id(param), param)
            master.copy_(values["fp32"])
            if master is not param:
                param.copy_(values["fp32"])
            basic.state[master] = {"step": step.clone(), "exp_avg": values["exp_avg"].to(master),
                                   "exp_avg_sq": values["exp_avg_sq"].to(master)}
    for group in basic.param_groups:  # DeepSpeed's FusedAdam (GPU) takes its bias correction from the group
        if "step" in group or type(basic).__name__ == "FusedAdam":
            group["step"] = float(step)
    states = _load(universal / MODEL_STATES[0])
    if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    for counter in ("global_steps", "global_samples", "skipped_steps"):
        if counter in states:
            setattr(engine, counter, states[counter])

"""The only module that imports DeepSpeed: process group, collectives, the engine, ZeRO-3 gathering and
consolidation, universal-checkpoint conversion and the accelerator's RNG.

Everything else calls the small functions here, so DeepSpeed's API surface (and any change of it) sits in
one file. Launcher variables are read by `vlm.train.launcher`, the DeepSpeed JSON is built by
`vlm.train.ds_config`; neither imports DeepSpeed.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

from vlm.train.checkpoint import CheckpointError
from vlm.train.launcher import DistEnv, LaunchError, normalize_launcher_env, unlaunchable
from vlm.train.signals import TRAINER_PID_VAR


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
    """Form the process group of this launch (NCCL on GPUs, gloo on CPU); returns this process's place in it.

    Joining an existing group is a no-op (several runs in one process share it); the group is destroyed
    when the process exits (`destroy_distributed` is registered with atexit).
    """
    env = normalize_launcher_env()
    problem = unlaunchable(os.environ)
    if problem is not None:
        raise LaunchError(problem)
    atexit.register(destroy_distributed)  # registering twice is harmless: the second call finds no group
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        _skip_cpu_shm_comm_build()
    else:
        accelerator.set_device(env.local_rank)
    try:
        deepspeed.init_distributed(
            dist_backend=accelerator.communication_backend_name(),
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            verbose=False,
        )
    except RuntimeError as err:  # torch's DistNetworkError among them
        if "EADDRINUSE" in str(err) or "address already in use" in str(err).lower():
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise LaunchError(f"the rendezvous port {where} is in use (another job, or a process left over from "
                              "one): pick a free one with --master_port N (deepspeed), --master-port N (torchrun) "
                              "or MASTER_PORT=N; launch/slurm/train.sbatch picks one per job") from None
        raise
    return env


def destroy_distributed() -> None:
    """Tear the process group down (at exit, and at once after an error); a no-op when none exists.

    Through DeepSpeed, which also forgets the groups it cached, so a later run in the same process can form
    a new group and build a new engine.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for_rank(local_rank: int, requested: str = "auto") -> torch.device:
    """The torch.device this rank computes on: the accelerator of LOCAL_RANK unless the config says otherwise."""
    if requested != "auto":
        return torch.device(requested)
    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, local_rank)


def accelerator_name() -> str:
    """'cuda', 'cpu', ...: the accelerator DeepSpeed detected (DS_ACCELERATOR overrides)."""
    return get_accelerator().device_name()


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], lr_scheduler: Any = None):
    """Wrap the model in a DeepSpeed engine; only parameters that require grad reach the optimizer.

    `lr_scheduler`: a callable optimizer -> scheduler (`vlm.train.schedule.scheduler_factory`), stepped by the
    engine after every optimizer step and saved in its checkpoints. Raises ValueError when nothing is trainable.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: check train.trainable / train.trainable_patterns")
    # What DeepSpeed's universal-checkpoint converter needs in a ZeRO-1/2 checkpoint to resume it on another
    # number of ranks: for plain data parallelism (no tensor/pipeline parallel patterns) just the version.
    if getattr(model, UNIVERSAL_CHECKPOINT_INFO, None) is None:
        setattr(model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    if ds_config.get("checkpoint", {}).get("writer", {}).get("decoupled"):
        # DeepSpeed's background writer must be a fresh process: it wants "spawn" but keeps whatever start
        # method is already fixed, and a forked writer inherits every open file (out_dir's lock) and cannot
        # use CUDA. (The data loader's workers name their own start method.)
        torch.multiprocessing.set_start_method("spawn", force=True)
        os.environ[TRAINER_PID_VAR] = str(os.getpid())  # the writer checks it is still this process's child
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config,
                                           lr_scheduler=lr_scheduler)
    return engine


# -- collectives (all no-ops for a world of one) ----------------------------------------------------------
def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the group (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """Collective: wait until every rank got here."""
    if world_size() > 1:
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Collective: True on every rank if `flag` is True on at least one (an all-reduce of MAX)."""
    return _reduce_flag(flag, device, dist.ReduceOp.MAX)


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Collective: True on every rank only if `flag` is True on all of them (an all-reduce of MIN)."""
    return _reduce_flag(flag, device, dist.ReduceOp.MIN)


def any_rank_each(flags: list[bool] | torch.Tensor, device: torch.device) -> list[bool]:
    """Collective: for each flag (bools, or a float tensor of 0/1 on `device`), True on every rank if it is
    True on at least one; one all-reduce for all, one read back."""
    values = flags if torch.is_tensor(flags) else torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    if world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in values.tolist()]


def _reduce_flag(flag: bool, device: torch.device, op) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if world_size() > 1:
        dist.all_reduce(value, op=op)
    return bool(value.item() > 0)


def on_rank0(action: Any, device: torch.device, what: str) -> Any:
    """Collective: run `action()` on rank 0 only, then agree: every rank raises if it failed (rank 0 its own
    error, the others a CheckpointError naming `what`), so no rank waits alone at the next collective.
    Returns the action's result on rank 0, None elsewhere."""
    result, error = None, None
    if rank() == 0:
        try:
            result = action()
        except Exception as err:  # any failure of rank 0's part is every rank's stop
            error = err
    if any_rank(error is not None, device):
        raise error if error is not None else CheckpointError(f"rank 0 could not {what}; see its log")
    return result


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Collective: `tensor` summed over ranks, in place; returned for chaining."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


@contextlib.contextmanager
def optimizer_step_skipped(engine) -> Iterator[None]:
    """Inside the block the engine's optimizer step and schedule step do nothing.

    DeepSpeed still runs its boundary bookkeeping (gradient reduction, clipping, zeroing the gradients,
    copying the unchanged fp32 master weights back), so every rank stays in step, but no parameter, no
    optimizer state (Adam moments, step count, weight decay) and no schedule position changes. Works the same
    for ZeRO 0-3, any precision and CPU offload: each of them ends in the basic optimizer's `step`.
    """
    patched = [obj for obj in (engine.basic_optimizer, engine.lr_scheduler) if obj is not None]
    saved = [obj.__dict__.get("step") for obj in patched]
    for obj in patched:
        obj.step = _no_step
    try:
        yield
    finally:
        for obj, step in zip(patched, saved):
            if step is None:
                del obj.step
            else:
                obj.step = step
        _clear_persistent_gradients(engine.optimizer)


def apply_optimizer_settings(engine, betas: tuple[float, float], weight_decay: float, grad_clip: float) -> None:
    """Set this run's Adam betas, weight decay and clipping threshold on a restored engine: loading a checkpoint
    brings back the ones it was written with (DeepSpeed restores the optimizer's param groups, and its universal
    loader the ZeRO optimizer's clipping threshold too)."""
    for group in engine.optimizer.param_groups:
        group["betas"], group["weight_decay"] = tuple(betas), weight_decay
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = grad_clip


def _clear_persistent_gradients(optimizer) -> None:
    """Zero the gradient buffers DeepSpeed keeps from one step to the next: a parameter that gets no gradient
    in the next step's first micro-batch would otherwise carry the skipped step's NaN on (ZeRO-3's flat
    gradient partitions, ZeRO-1/2's CPU-offload accumulators). Other layouts drop their gradients themselves."""
    flat = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if torch.is_tensor(flat):
        flat.zero_()
    accumulated = getattr(optimizer, "accumulated_grads_in_cpu", None)
    if isinstance(accumulated, dict):
        for buffer in accumulated.values():
            buffer.zero_()


def _no_step(*args: Any, **kwargs: Any) -> None:
    return None


# -- DeepSpeed's decoupled checkpoint writer (train.async_checkpoint) ------------------------------------------
def writes_checkpoints_in_background(engine) -> bool:
    """Whether `engine.save_checkpoint` only hands the files to DeepSpeed's decoupled writer (a process per
    rank), so that they are on disk only after `commit_checkpoint`."""
    return engine.checkpoint_engine.is_decoupled()


ASYNC_COMMIT_TIMEOUT_S = 3600.0  # how long a rank waits for its background writer to finish one checkpoint


def commit_checkpoint(engine, timeout_s: float = ASYNC_COMMIT_TIMEOUT_S) -> None:
    """Wait until this rank's background writer has written every file of the pending checkpoint (a no-op
    without one). No collective: DeepSpeed's own commit adds barriers that a rank whose writer failed would
    skip, leaving the others waiting; the caller agrees across ranks afterwards. Raises RuntimeError when the
    writer process is gone or has not finished within `timeout_s` (DeepSpeed's own limit is 300 s)."""
    if not writes_checkpoints_in_background(engine):
        return
    from deepspeed.runtime.checkpoint_engine.decoupled_checkpoint_engine import DecoupledEvent

    writer = engine.checkpoint_engine
    if writer.get_commit_info() is None:
        return
    writer.commit_info = None  # handled here; DeepSpeed's commit at the next step finds nothing to do
    process = writer.ckpt_process
    if process is None:  # a rank DeepSpeed gave no writer
        return
    if not process.is_alive():
        raise RuntimeError("the background checkpoint writer process is gone (killed, out of memory?)")
    writer.save_queue.put((None, DecoupledEvent.COMMIT_EVENT))
    deadline = time.monotonic() + timeout_s
    while not writer.save_event.wait(timeout=5.0):
        if not process.is_alive():
            raise RuntimeError("the background checkpoint writer process died while writing (out of memory?)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the background checkpoint writer did not finish within {timeout_s:.0f} s")
    writer.save_event.clear()


@contextlib.contextmanager
def plain_checkpoint_reader(engine) -> Iterator[None]:
    """Inside the block the engine reads checkpoints with DeepSpeed's plain torch engine: the decoupled one's
    `load` (DeepSpeed 0.19) calls `torch.load` with PyTorch's weights-only default, which refuses DeepSpeed's
    own ZeRO-3 files."""
    if not writes_checkpoints_in_background(engine):
        yield
        return
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    writer = engine.checkpoint_engine
    engine.checkpoint_engine = TorchCheckpointEngine()
    try:
        yield
    finally:
        engine.checkpoint_engine = writer


@contextlib.contextmanager
def closing_checkpoint_writer(engine) -> Iterator[None]:
    """Stop the background writer process (if any) when the block ends, however it ends: a process never told
    to stop keeps the interpreter from exiting. A checkpoint the block left unfinished (`commit_checkpoint`
    was not called, e.g. after an error) is abandoned: finishing it could wait on ranks that are gone."""
    try:
        yield
    finally:
        if writes_checkpoints_in_background(engine):
            engine.checkpoint_engine.commit_info = None
            engine.checkpoint_engine.cleanup()


# -- ZeRO-3 and checkpoints --------------------------------------------------------------------------------
@contextlib.contextmanager
def gathered_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Collective under ZeRO-3: inside the block every rank holds the full parameters of `module` (read-only).

    Without partitioned parameters (ZeRO 0-2, or no engine) it does nothing.
    """
    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def consolidated_zero3_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a ZeRO-3 checkpoint folder, merged from every rank's partition by DeepSpeed's
    own utility (which unpickles DeepSpeed's files: only for checkpoints you wrote)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))


def convert_to_universal(checkpoint: Path, target: Path) -> str | None:
    """DeepSpeed's universal checkpoint of `checkpoint` (loadable on any world size) written to `target`.

    Runs `deepspeed.checkpoint.ds_to_universal` in a child process; returns None on success, else the end
    of its error output.
    """
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
           "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    return None if result.returncode == 0 else result.stderr[-3000:]


def accelerator_rng_state() -> torch.Tensor | None:
    """The accelerator's RNG state (None on CPU, where torch's own state covers it)."""
    accelerator = get_accelerator()
    return None if accelerator.device_name() == "cpu" else accelerator.get_rng_state()


def set_accelerator_rng_state(state: torch.Tensor) -> None:
    """Restore what `accelerator_rng_state` returned."""
    get_accelerator().set_rng_state(state)

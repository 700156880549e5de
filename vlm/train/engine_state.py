"""Saving and restoring a DeepSpeed engine's training state in the checkpoint folders of `vlm.train.checkpoint`.

Collective: every rank calls `start_checkpoint`, then `finish_checkpoint` (a save), and `load_checkpoint`.
Model, optimizer and schedule are DeepSpeed's files; every rank's RNG state goes to rng/rank{r}.pt|json; rank 0
writes meta.json last, once every rank's files are on disk, which makes the checkpoint complete. With
DeepSpeed's background writer (train.async_checkpoint) that is when the writer processes are done, so a run
killed before then resumes from the checkpoint before. A checkpoint written on another number of ranks is
loaded through DeepSpeed's universal checkpoint, converted once beside it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlm.train import distributed, layout_change
from vlm.train.checkpoint import (
    META,
    CheckpointError,
    checkpoint_root,
    complete_checkpoints,
    file_sizes,
    prune_checkpoints,
    read_meta,
    tag_for,
    write_json_atomic,
)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    accelerator = distributed.accelerator_rng_state()
    if accelerator is not None:
        tensors["accelerator"] = accelerator
    version, state, gauss = random.getstate()
    return tensors, {"python": [version, list(state), gauss]}


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "accelerator" in tensors:
        distributed.set_accelerator_rng_state(tensors["accelerator"])
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (read-only folder, full disk, ...); the run stops with
    EXIT_CHECKPOINT_WRITE, its newest complete checkpoint named."""


EXIT_CHECKPOINT_WRITE = 74  # EX_IOERR


@dataclass
class PendingCheckpoint:
    """A checkpoint whose files are written, or being written by DeepSpeed's background writer
    (train.async_checkpoint), and not yet published: `finish_checkpoint` makes it complete."""

    folder: Path
    out_dir: Path
    step: int
    meta: dict[str, Any]
    keep: int


def start_checkpoint(engine, out_dir: str | Path, step: int, meta: dict[str, Any], keep: int) -> PendingCheckpoint:
    """Collective: write this step's checkpoint files (DeepSpeed's, and every rank's RNG state); with the
    background writer DeepSpeed's files are only handed over. Raises CheckpointWriteError on every rank when
    any rank could not write its part, or has no room for one more checkpoint the size of the last."""
    root = checkpoint_root(out_dir)
    tag = tag_for(step)
    rank = distributed.rank()
    # A folder of this name can only be left from an interrupted save or an abandoned timeline: never write
    # into it (its meta.json would call the half-written checkpoint complete, its extra files would stay).
    distributed.on_rank0(lambda: _clear(root / tag, out_dir), engine.device, f"clear {root / tag}")
    # A rank that fails inside DeepSpeed's save leaves the others waiting in its collectives: refuse together,
    # before writing, when any rank's disk cannot hold another checkpoint the size of the last one.
    short = _short_of_space(root, out_dir)
    if distributed.any_rank(short is not None, engine.device):
        raise _write_error(root / tag, short, out_dir)
    error = None
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        rng_dir = root / tag / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        tensors, plain = _rng_state()
        torch.save(tensors, rng_dir / f"rank{rank}.pt")
        write_json_atomic(rng_dir / f"rank{rank}.json", plain)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        error = err
    if distributed.any_rank(error is not None, engine.device):
        raise _write_error(root / tag, error, out_dir)
    return PendingCheckpoint(root / tag, Path(out_dir), step, meta, keep)


def finish_checkpoint(engine, pending: PendingCheckpoint) -> Path:
    """Collective: wait for the background writer (if any) on every rank, then rank 0 publishes the checkpoint:
    meta.json (with every file's size, so a damaged checkpoint is recognised on resume) and `latest`, and
    prunes this run's (`meta["run_id"]`) older checkpoints beyond `keep`, never another run's. Returns the
    folder. Raises CheckpointWriteError on every rank when any rank's files could not be written."""
    folder, out_dir = pending.folder, pending.out_dir
    error = None
    try:
        distributed.commit_checkpoint(engine)
    except (OSError, RuntimeError) as err:  # the writer process died, or timed out
        error = err
    # Every rank's files are on disk (or some rank failed) before the checkpoint is declared complete.
    if distributed.any_rank(error is not None, engine.device):
        raise _write_error(folder, error, out_dir)
    if distributed.rank() == 0:
        try:
            write_json_atomic(folder / META, {**pending.meta, "step": pending.step, "tag": folder.name,
                                              "saved_at": time.time(), "files": file_sizes(folder)})
            root = folder.parent
            (root / ".latest.tmp").write_text(folder.name)
            os.replace(root / ".latest.tmp", root / "latest")
            prune_checkpoints(out_dir, pending.keep, pending.meta.get("run_id"), folder)
        except (OSError, CheckpointError) as err:
            error = err
    if distributed.any_rank(error is not None, engine.device):
        raise _write_error(folder, error, out_dir)
    return folder


def _short_of_space(root: Path, out_dir: str | Path) -> OSError | None:
    """An OSError naming the free and needed space when `root`'s file system (as this rank sees it) has less free
    than the newest complete checkpoint takes (its recorded file sizes); None when it has room, or nothing to
    compare with yet."""
    done = complete_checkpoints(out_dir)
    if not done:
        return None
    try:
        needed = sum(read_meta(done[-1]).get("files", {}).values())
        free = shutil.disk_usage(root).free
    except (OSError, CheckpointError):
        return None  # the save itself reports what is wrong
    if free >= needed:
        return None
    return OSError(f"{free / 2**20:.1f} MiB free, the last checkpoint took {needed / 2**20:.1f} MiB")


def _clear(folder: Path, out_dir: str | Path) -> None:
    if folder.exists():
        try:
            shutil.rmtree(folder)
        except OSError as err:
            raise _write_error(folder, err, out_dir) from err


def _write_error(folder: Path, error: BaseException | None, out_dir: str | Path) -> CheckpointWriteError:
    done = [p for p in complete_checkpoints(out_dir) if p != folder]
    cause = f"{type(error).__name__}: {error}" if error is not None else "another rank could not write its part"
    newest = done[-1] if done else "none (nothing to resume from)"
    return CheckpointWriteError(f"cannot write checkpoint {folder} ({cause}); the newest complete checkpoint is "
                                f"{newest}. Free disk space or make {folder.parent} writable, then resume")


def needs_universal(meta: dict[str, Any], zero_stage: int, world_size: int, dtype: str | None = None) -> bool:
    """Whether resuming `meta`'s checkpoint under (`zero_stage`, `world_size`, `dtype`) goes through a universal
    checkpoint (`vlm.train.layout_change`): any change of ZeRO stage or of precision (another optimizer
    wrapper: fp32 Adam, bf16/fp16 master weights), or another world size under ZeRO 1-3. ZeRO-0 keeps the
    whole optimizer in one file, so a ZeRO-0 checkpoint of the same precision loads directly on any world size."""
    saved_stage, saved_world = meta.get("zero_stage", zero_stage), meta.get("world_size", world_size)
    saved_dtype = meta.get("config", {}).get("train", {}).get("dtype", dtype)
    if saved_stage != zero_stage or (dtype is not None and saved_dtype != dtype):
        return True
    return zero_stage > 0 and saved_world != world_size


def load_checkpoint(engine, checkpoint: Path, universal_root: Path | None = None) -> dict[str, Any]:
    """Collective: restore model, optimizer, scheduler and (same world size) this rank's RNG; return meta.

    With `universal_root` (this run's out_dir/universal) the checkpoint is first converted there to a
    universal checkpoint (another world size, ZeRO stage or precision: `needs_universal`), which DeepSpeed loads into
    a ZeRO-1/2/3 engine (`"checkpoint": {"load_universal": true}` in its config) and
    `layout_change.load_into_zero0` into a ZeRO-0 one. Raises CheckpointError when it cannot be loaded.
    """
    meta = read_meta(checkpoint)
    with distributed.plain_checkpoint_reader(engine):
        path = _load_engine(engine, checkpoint, meta, universal_root)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {checkpoint}")
    rank = distributed.rank()
    rng = checkpoint / "rng"
    if meta.get("world_size") == distributed.world_size() and (rng / f"rank{rank}.pt").is_file():
        tensors = torch.load(rng / f"rank{rank}.pt", map_location="cpu", weights_only=True)
        _set_rng_state(tensors, json.loads((rng / f"rank{rank}.json").read_text()))
    return meta


def _load_engine(engine, checkpoint: Path, meta: dict[str, Any], universal_root: Path | None):
    """DeepSpeed's part of `load_checkpoint`: the loaded path, or None when DeepSpeed found nothing."""
    if universal_root is None:
        path, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_module_strict=True)
    else:
        trainable = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
        folder = universal_checkpoint(checkpoint, meta, [name for name, _ in trainable], universal_root,
                                      engine.device)
        if engine.zero_optimization_stage() == 0:
            layout_change.load_into_zero0(engine, folder, trainable)
            path = folder
        else:
            path, _ = engine.load_checkpoint(str(universal_root), tag=None, load_module_strict=True)
    return path


def universal_checkpoint(checkpoint: Path, meta: dict[str, Any], names: list[str], target_root: Path,
                         device) -> Path:
    """Collective: the universal folder of `checkpoint` in `target_root` (`layout_change.build_universal`),
    built by rank 0 unless the one there is of this very checkpoint (its path and save time); every rank
    stops if it fails. `names`: the trainable parameters in optimizer order."""
    target, marker = target_root / checkpoint.name, target_root / "latest_universal"  # the marker names the tag
    source_file = target_root / "source.json"
    source = {"checkpoint": str(checkpoint.resolve()), "saved_at": meta.get("saved_at"), "format": 2}

    def convert() -> None:
        done = target.is_dir() and source_file.is_file() and json.loads(source_file.read_text()) == source
        if not done:
            target_root.mkdir(parents=True, exist_ok=True)
            source_file.unlink(missing_ok=True)
            for old in target_root.glob("step_*"):  # an earlier conversion: a full fp32 copy + moments, not needed
                shutil.rmtree(old)
            layout_change.build_universal(checkpoint, meta.get("zero_stage", 0), names, target,
                                          distributed.convert_to_universal)
            marker.write_text(checkpoint.name)
            write_json_atomic(source_file, source)

    distributed.on_rank0(convert, device, f"convert {checkpoint} to a universal checkpoint")
    return target

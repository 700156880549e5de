"""Self-describing, atomically published training checkpoints.

    out_dir/checkpoints/
        step_000000200/            one checkpoint (DeepSpeed's model/optimizer files, written by all ranks)
            rng/rank{r}.pt|json    every rank's RNG states
            meta.json              written last, by rank 0, after every rank finished: step, epoch, data
                                   position, world size, ZeRO stage and the resolved config
        latest                     the newest complete checkpoint's name (a convenience pointer)

A checkpoint is complete exactly when its meta.json exists; meta.json and `latest` are written to a
temporary name and renamed. A kill -9 during a save therefore leaves the previous checkpoint the newest
complete one. Saving and loading are separate functions.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
META = "meta.json"
_TAG = re.compile(r"^step_(\d{9})$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    return f"step_{step:09d}"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _TAG.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / META
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {META}); it may have been interrupted")
    return json.loads(path.read_text())


def resolve_resume(out_dir: str | Path, resume: str) -> Path | None:
    """'never' -> None; 'auto' -> the newest complete checkpoint or None; else that checkpoint folder."""
    if resume == "never":
        return None
    if resume == "auto":
        done = complete_checkpoints(out_dir)
        return done[-1] if done else None
    path = Path(resume)
    if (path / CHECKPOINTS).is_dir():  # an out_dir was given: take its newest
        done = complete_checkpoints(path)
        if not done:
            raise CheckpointError(f"--resume {resume}: no complete checkpoint under {path / CHECKPOINTS}")
        return done[-1]
    read_meta(path)
    return path


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    try:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        if accelerator.device_name() != "cpu":
            tensors["accelerator"] = accelerator.get_rng_state()
    except ImportError:
        pass
    version, state, gauss = random.getstate()
    return tensors, {"python": [version, list(state), gauss]}


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "accelerator" in tensors:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_rng_state(tensors["accelerator"])
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(engine, out_dir: str | Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder once it is complete and published."""
    import deepspeed.comm as dist

    root = checkpoint_root(out_dir)
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    rng_dir = root / tag / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    tensors, plain = _rng_state()
    torch.save(tensors, rng_dir / f"rank{rank}.pt")
    write_json_atomic(rng_dir / f"rank{rank}.json", plain)
    dist.barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if rank == 0:
        write_json_atomic(root / tag / META, {**meta, "step": step, "tag": tag, "saved_at": time.time()})
        (root / ".latest.tmp").write_text(tag)
        os.replace(root / ".latest.tmp", root / "latest")
        prune_checkpoints(out_dir, keep)
    dist.barrier()
    return root / tag


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and interrupted saves older than the newest."""
    done = complete_checkpoints(out_dir)
    if not done:
        return
    newest = done[-1].name
    for path in done[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for path in checkpoint_root(out_dir).iterdir():
        if _TAG.match(path.name) and not (path / META).is_file() and path.name < newest:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine, checkpoint: Path, load_universal: bool = False) -> dict[str, Any]:
    """Collective: restore model, optimizer, scheduler and (same world size) this rank's RNG; return meta."""
    import deepspeed.comm as dist

    meta = read_meta(checkpoint)
    load_dir, tag = checkpoint.parent, checkpoint.name
    if load_universal:
        load_dir, tag = convert_to_universal(checkpoint), None
    path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {checkpoint}")
    rank = dist.get_rank()
    rng = checkpoint / "rng"
    if meta.get("world_size") == dist.get_world_size() and (rng / f"rank{rank}.pt").is_file():
        tensors = torch.load(rng / f"rank{rank}.pt", map_location="cpu", weights_only=True)
        _set_rng_state(tensors, json.loads((rng / f"rank{rank}.json").read_text()))
    return meta


def convert_to_universal(checkpoint: Path) -> Path:
    """DeepSpeed's universal checkpoint (any world size), converted once by rank 0 next to the original."""
    import deepspeed.comm as dist

    target_root = checkpoint.parent.parent / "universal"
    target, marker = target_root / checkpoint.name, target_root / "latest_universal"
    converted = target.is_dir() and marker.is_file() and marker.read_text().strip() == checkpoint.name
    if dist.get_rank() == 0 and not converted:
        _run_ds_to_universal(checkpoint, target)
        marker.write_text(checkpoint.name)
    dist.barrier()
    return target_root


def _run_ds_to_universal(checkpoint: Path, target: Path) -> None:
    import subprocess
    import sys

    if target.exists():
        shutil.rmtree(target)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
           "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckpointError(f"converting {checkpoint} to a universal checkpoint failed:\n{result.stderr[-3000:]}")

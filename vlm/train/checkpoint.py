"""Self-describing, atomically published training checkpoints.

    out_dir/checkpoints/
        step_000000200/            one checkpoint (DeepSpeed's model/optimizer files, written by all ranks)
            rng/rank{r}.pt|json    every rank's RNG states
            meta.json              written last, by rank 0, after every rank finished: step, epoch, data
                                   position, world size, ZeRO stage and the resolved config
        latest                     the newest complete checkpoint's name (a convenience pointer)

A checkpoint is complete exactly when its meta.json exists; meta.json and `latest` are written to a
temporary name and renamed. A kill -9 during a save therefore leaves the previous checkpoint the newest
complete one. This module is the folder format and its reading (used by export and inference too);
`vlm.train.engine_state` saves and restores an engine into it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
META = "meta.json"
_TAG = re.compile(r"^step_(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, unconvertible); the message names it."""


def checkpoint_root(out_dir: str | Path) -> Path:
    """out_dir/checkpoints."""
    return Path(out_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    """The folder name of the checkpoint taken after optimizer step `step`."""
    return f"step_{step:09d}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name beside `path`, then rename: readers see the old file or the new one."""
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
    """The meta.json of a complete checkpoint; CheckpointError if there is none."""
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



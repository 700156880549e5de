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
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from vlm.config import ARCHITECTURE_FIELDS, Config

CHECKPOINTS = "checkpoints"
META = "meta.json"
_TAG = re.compile(r"^step_(\d{9})$")
log = logging.getLogger("vlm.train")


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
    """The meta.json of a complete checkpoint; CheckpointError if the folder does not exist or has none."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"{checkpoint} does not exist (train.resume takes 'auto' for the newest checkpoint "
                              "of train.out_dir, 'never', an out_dir or one checkpoint folder)")
    if not (path / META).is_file():
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {META}); it may have been interrupted")
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / META} cannot be read: {err}") from err


def file_sizes(checkpoint: str | Path) -> dict[str, int]:
    """{path relative to the checkpoint: bytes} of every file in it but meta.json (recorded at save time)."""
    root = Path(checkpoint)
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != META}


def damage(checkpoint: str | Path, meta: dict[str, Any]) -> list[str]:
    """What is wrong with a checkpoint's files against the sizes its meta.json recorded ([] = intact, or
    written before sizes were recorded)."""
    recorded = meta.get("files")
    if not isinstance(recorded, dict):
        return []
    now = file_sizes(checkpoint)
    problems = [f"{name} is missing" for name in recorded if name not in now]
    problems += [f"{name} has {now[name]} bytes, {size} were written" for name, size in recorded.items()
                 if name in now and now[name] != size]
    return problems


def newest_intact(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose files are as written; each newer damaged one is named in a warning.

    None when there is no complete checkpoint; CheckpointError when there are some and every one is damaged.
    """
    damaged = []
    for path in reversed(complete_checkpoints(out_dir)):
        problems = damage(path, read_meta(path))
        if not problems:
            for name, found in damaged:
                log.warning("checkpoint %s is damaged (%s): resuming from %s instead", name, found, path.name)
            return path
        damaged.append((path.name, "; ".join(problems[:3])))
    if damaged:
        raise CheckpointError(f"every checkpoint in {checkpoint_root(out_dir)} is damaged: "
                              + "; ".join(f"{name}: {found}" for name, found in damaged))
    return None


def resolve_resume(out_dir: str | Path, resume: str) -> Path | None:
    """'never' -> None; 'auto' -> the newest intact checkpoint of out_dir, or None; an out_dir -> its newest
    intact one; else that checkpoint folder, which must be complete and intact. Raises CheckpointError."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_intact(out_dir)
    path = Path(resume)
    if (path / CHECKPOINTS).is_dir():  # an out_dir was given: take its newest
        found = newest_intact(path)
        if found is None:
            raise CheckpointError(f"--resume {resume}: no complete checkpoint under {path / CHECKPOINTS}")
        return found
    problems = damage(path, read_meta(path))
    if problems:
        raise CheckpointError(f"--resume {resume}: the checkpoint is damaged: {'; '.join(problems)}")
    return path


# Settings whose change makes a checkpoint unloadable: the model's shapes and the optimizer's parameters.
RESUME_FIXED = tuple(("model", name) for name in ARCHITECTURE_FIELDS + (
    "vocab_size", "tokenizer", "image_placeholder", "vision_trainable", "projector", "pixel_shuffle",
    "vision_feature_layer", "vision_cls")) + (
    ("train", "trainable"), ("train", "trainable_patterns"))


def resume_problems(checkpoint: Path, meta: dict[str, Any], cfg: Config) -> list[str]:
    """The settings that differ between the checkpoint's resolved config and `cfg` and that a resume cannot
    bridge (model shape, vocabulary, what trains), each naming both values ([] = resumable)."""
    saved, now = meta.get("config") or {}, cfg.to_dict()
    changed = [f"{section}.{name}: {saved[section][name]!r} in {checkpoint.name}, {now[section][name]!r} now"
               for section, name in RESUME_FIXED
               if name in saved.get(section, {}) and saved[section][name] != now[section][name]]
    if changed:
        changed.append("resume with the checkpoint's settings, or start fresh: another train.out_dir, or "
                       "--resume never --train.previous_run=move")
    return changed


def abandon_newer(checkpoint: Path) -> list[str]:
    """Rename the step folders newer than `checkpoint` in its checkpoints/ (a timeline a resume from an older
    checkpoint abandons, or damaged saves) to `step_N.abandoned-<time>`: kept for inspection, but never resumed,
    pruned or written into again. Returns the new names."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for path in sorted(checkpoint.parent.iterdir()):
        if _TAG.match(path.name) and path.name > checkpoint.name:
            target = path.with_name(f"{path.name}.abandoned-{stamp}")
            os.replace(path, target)
            moved.append(target.name)
    return moved


def prune_checkpoints(out_dir: str | Path, keep: int, run_id: str | None, written: Path) -> None:
    """Keep this run's newest `keep` complete checkpoints, `written` (the one just saved) always; drop its older
    ones and interrupted saves older than `written`. Checkpoints of other runs (another run_id) are never
    touched."""
    ours = [p for p in complete_checkpoints(out_dir) if read_meta(p).get("run_id") == run_id and p != written]
    for path in ours[: max(0, len(ours) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    for path in checkpoint_root(out_dir).iterdir():
        if _TAG.match(path.name) and not (path / META).is_file() and path.name < written.name:
            shutil.rmtree(path, ignore_errors=True)

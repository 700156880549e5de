"""An out_dir belongs to one run: a lock while the run lives, and a fresh run never mixes with an older one.

`OutDirLock` is an exclusive POSIX record lock (`lockf`) on out_dir/.lock, held by rank 0 for the run's life:
the kernel drops it when that process dies, even by kill -9, and unlike `flock` it is not shared with forked
DataLoader workers, which could outlive their rank for a moment; the file says who holds it. `claim_out_dir` decides what a fresh run
(nothing to resume) does with complete checkpoints already there: refuse, naming them, or move the earlier
run's outputs aside to out_dir/previous-<time>/ (`train.previous_run: move`). A run is identified by the
`run_id` its checkpoints carry, so pruning only ever touches its own (`vlm.train.checkpoint`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from vlm.train.checkpoint import CHECKPOINTS, CheckpointError, complete_checkpoints

LOCK_NAME = ".lock"
# What an earlier run leaves in an out_dir; moved aside together so the new run's metrics, plots and audit
# never continue the old ones.
RUN_OUTPUTS = (CHECKPOINTS, "metrics.jsonl", "loss.png", "export", "samples", "logs", "universal")


class OutDirBusyError(CheckpointError):
    """Another live run holds the out_dir's lock; the message says which process."""


class OutDirLock:
    """The out_dir's lock; `acquire()` raises OutDirBusyError when another process holds it."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0, sign: bool = True) -> OutDirLock:
        """Take the lock, retrying for `wait_s` seconds (a killed run's processes may still be exiting); with
        `sign`, write pid, host and start time into the lock file. Raises OutDirBusyError."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EACCES) and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    raise OutDirBusyError(f"train.out_dir {self.path.parent} is in use by another run "
                                          f"({holder(self.path)}); wait for it, stop it, or use another out_dir"
                                          ) from err
                return self  # a file system without locks (some network mounts): run unlocked rather than not at all
        if sign:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.time()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Let go of the lock (also done by the kernel when the process exits)."""
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def holder(lock_file: Path) -> str:
    """'pid N on HOST since TIME' from a lock file, or 'unknown holder'."""
    try:
        who = json.loads(lock_file.read_text())
        return f"pid {who['pid']} on {who['host']} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(who['since']))}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown holder"


def lock_problem(out_dir: str | Path) -> str | None:
    """For the doctor: a message when another live run holds the out_dir's lock, else None (nothing held).

    Probes by taking and dropping the lock without signing it; not for a process that holds the lock itself
    (closing any descriptor of the file drops a POSIX lock)."""
    if not (Path(out_dir) / LOCK_NAME).is_file():
        return None
    try:
        OutDirLock(out_dir).acquire(sign=False).release()
    except OutDirBusyError as err:
        return str(err)
    return None


def claim_out_dir(out_dir: str | Path, previous_run: str, move: bool) -> Path | None:
    """A fresh run's check of out_dir: raise CheckpointError if it holds complete checkpoints and
    `previous_run` is 'refuse'; with 'move', and `move` True (rank 0 only), move the earlier run's outputs
    to out_dir/previous-<time>/ and return that folder."""
    done = complete_checkpoints(out_dir)
    if not done:
        return None
    if previous_run != "move":
        raise CheckpointError(
            f"train.out_dir {out_dir} holds checkpoints of an earlier run (newest {done[-1].name}) but this run "
            "starts fresh (train.resume never): resume it with --resume auto, use another out_dir, or set "
            "--train.previous_run=move to move its outputs aside")
    if not move:
        return None
    target = Path(out_dir) / time.strftime("previous-%Y%m%d-%H%M%S")
    target.mkdir()
    for name in RUN_OUTPUTS:
        if (Path(out_dir) / name).exists():
            os.replace(Path(out_dir) / name, target / name)
    return target

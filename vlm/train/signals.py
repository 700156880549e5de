"""Graceful stop on SIGTERM/SIGUSR1, or when the launcher is gone: a flag all ranks agree on at the next step.

A batch system sends the signal before a time limit or on preemption. The trainer then checkpoints on
every rank and exits with EXIT_CHECKPOINTED_ON_SIGNAL, which `launch/slurm/train.sbatch` recognises and
answers by requeueing the job; the requeued job resumes from that checkpoint.

The `deepspeed` launcher does not pass a SIGTERM on to its ranks: it dies (exit 143) and the ranks would
train on unseen. So every rank also watches the launcher processes above it (`deepspeed`, its
`deepspeed.launcher.launch`, or torchrun's agent; identified from /proc) and treats their disappearance as a
stop signal: whichever process is signalled, the ranks checkpoint and exit 75, and nothing keeps running.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

EXIT_CHECKPOINTED_ON_SIGNAL = 75  # EX_TEMPFAIL: "try again later"
TRAINER_PID_VAR = "VLM_TRAINER_PID"  # the rank that starts helper processes, for `die_with_parent`
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# In a launcher's command line: the `deepspeed` command, its per-node launcher, torchrun's agent.
LAUNCHER_MARKS = ("bin/deepspeed ", "deepspeed.launcher.launch", "torch.distributed.run", "bin/torchrun ")


def _proc_start(pid: int) -> str | None:
    """The start time of process `pid` from /proc (tells a live process from a reused pid); None if it is gone
    or a zombie (dead, not yet reaped by its parent)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # state (field 3), start time (field 22)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def launcher_processes(levels: int = 2) -> list[tuple[int, str]]:
    """(pid, start time) of the launcher processes among this process's parent and grandparent ([] where
    /proc is missing, or for a process no launcher started)."""
    found, pid = [], os.getpid()
    for _ in range(levels):
        pid = _parent(pid)
        if not pid or pid == 1:
            break
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            break
        start = _proc_start(pid)
        if start is not None and any(mark in cmdline for mark in LAUNCHER_MARKS):
            found.append((pid, start))
    return found


class StopFlag:
    """Remembers a received SIGTERM/SIGUSR1 (`received`: its number) so training stops at a step boundary,
    and the launcher processes above this rank, whose disappearance counts as a stop signal too.

    `install` sets the handlers, `uninstall` restores the previous ones, `pending` is this rank's view.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._launchers = launcher_processes()

    def install(self) -> StopFlag:
        """Handle STOP_SIGNALS by recording them (the previous handlers are kept); returns self."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the signal handlers that `install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def pending(self) -> bool:
        """Whether this rank received a stop signal or lost its launcher (the trainer agrees across ranks)."""
        return self.received is not None or any(_proc_start(pid) != start for pid, start in self._launchers)


def die_with_parent() -> None:
    """In a helper process (DeepSpeed's background checkpoint writer): be killed when the process that started
    it dies, however it dies (Linux `PR_SET_PDEATHSIG`; elsewhere a no-op). Without it a rank killed with
    SIGKILL leaves its writer blocked on a queue that only it still holds open, forever."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    trainer = os.environ.get(TRAINER_PID_VAR, "")
    if trainer.isdigit() and os.getppid() != int(trainer):  # the trainer died before prctl took effect
        os._exit(1)

"""Graceful stop on SIGTERM/SIGUSR1: a flag that all ranks agree on at the next step boundary.

A batch system sends the signal before a time limit or on preemption. The trainer then checkpoints on
every rank and exits with EXIT_CHECKPOINTED_ON_SIGNAL, which `launch/slurm/train.sbatch` recognises and
answers by requeueing the job; the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import signal

import torch

from vlm.train import distributed

EXIT_CHECKPOINTED_ON_SIGNAL = 75  # EX_TEMPFAIL: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Remembers a received SIGTERM/SIGUSR1 (`received`: its number) so training stops at a step boundary.

    `install` sets the handlers, `uninstall` restores the previous ones, `agreed` is the cross-rank check.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

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

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank if any rank received a stop signal."""
        return distributed.any_rank(self.received is not None, device)

"""Graceful stop on SIGTERM/SIGUSR1: a flag that all ranks agree on at the next step boundary.

A batch system sends the signal before a time limit or on preemption. The trainer then checkpoints on
every rank and exits with EXIT_CHECKPOINTED_ON_SIGNAL, which `launch/slurm/train.sbatch` recognises and
answers by requeueing the job; the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import signal

import torch

EXIT_CHECKPOINTED_ON_SIGNAL = 75  # EX_TEMPFAIL: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank if any rank received a stop signal."""
        import deepspeed.comm as dist

        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

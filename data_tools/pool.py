"""An ordered process pool for the data tools: results in input order, bounded memory, and workers that stop
with their command (Ctrl-C, an error, a kill of the parent)."""

from __future__ import annotations

import itertools
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator

_STOP = None  # in a pool worker: the pool's stop event (see `stop_requested`)


class WorkerDied(RuntimeError):
    """A pool worker ended without a result (killed, e.g. by the out-of-memory killer)."""


def stop_requested() -> bool:
    """True in a pool worker once its pool is being shut down early (an error or Ctrl-C in the parent): long
    tasks check it between items, clean up and stop. Always False outside a pool."""
    return _STOP is not None and _STOP.is_set()


def ordered_map(fn: Callable, cfg, items: Iterable, workers: int, batch: int = 32,
                ahead: int | None = None) -> Iterator:
    """fn(cfg, batch) over batches of `items`, results flattened in input order.

    With workers > 1 a process pool runs the batches, at most `ahead` (default 2 per worker) submitted and
    not yet consumed, so memory stays bounded when the consumer is the slower side. Workers are forked (no
    interpreter start, no re-imports) when that is safe: on Linux, from a process with one thread and without
    torch loaded (the command line); else spawned. Neither imports webdataset or torch. Workers ignore Ctrl-C
    (the parent handles it), and when the consumer stops early (closes this generator, or an exception) the
    pool's stop event is set, so tasks that poll `stop_requested` end soon. Raises WorkerDied when a worker
    process dies.
    """
    if workers == 1:
        for item in items:
            yield from fn(cfg, [item])
        return
    import multiprocessing  # only a pool needs these (about 10 ms to import)
    import threading
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    forkable = sys.platform == "linux" and threading.active_count() == 1 and "torch" not in sys.modules
    context = multiprocessing.get_context("fork" if forkable else "spawn")
    stop = context.Event()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_setup,
                             initargs=(os.getpid(), stop)) as pool:
        pending: deque = deque()
        items = iter(items)
        try:
            while chunk := list(itertools.islice(items, batch)):
                pending.append(pool.submit(fn, cfg, chunk))
                if len(pending) >= (ahead or 2 * workers):
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool as e:
            raise WorkerDied("a worker process died (killed, or out of memory?)") from e
        finally:
            stop.set()  # tasks still running end at their next check
            pool.shutdown(cancel_futures=True)


def _worker_setup(parent: int, stop) -> None:
    """Pool worker initializer: ignore SIGINT (Ctrl-C reaches the whole process group; the parent decides),
    keep the stop event, and start a thread that ends this worker once `parent` has gone: workers of a
    command killed with SIGKILL would otherwise wait for tasks forever (they hold the task pipe's other end)."""
    import signal
    import threading
    import time

    global _STOP
    _STOP = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()

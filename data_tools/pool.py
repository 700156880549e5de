"""An ordered process pool for the data tools: results in input order, bounded memory, workers that end
with their parent."""

from __future__ import annotations

import itertools
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator


def ordered_map(fn: Callable, cfg, items: Iterable, workers: int, batch: int = 32,
                ahead: int | None = None) -> Iterator:
    """fn(cfg, batch) over batches of `items`, results flattened in input order.

    With workers > 1 a process pool runs the batches, at most `ahead` (default 2 per worker) submitted and
    not yet consumed, so memory stays bounded when the consumer is the slower side. Workers are forked (no
    interpreter start, no re-imports) when that is safe: on Linux, from a process with one thread and without
    torch loaded (the command line); else spawned. Neither imports webdataset or torch.
    """
    if workers == 1:
        for item in items:
            yield from fn(cfg, [item])
        return
    import multiprocessing  # only a pool needs these (about 10 ms to import)
    import threading
    from concurrent.futures import ProcessPoolExecutor

    forkable = sys.platform == "linux" and threading.active_count() == 1 and "torch" not in sys.modules
    context = multiprocessing.get_context("fork" if forkable else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_end_with_parent,
                             initargs=(os.getpid(),)) as pool:
        pending: deque = deque()
        items = iter(items)
        try:
            while chunk := list(itertools.islice(items, batch)):
                pending.append(pool.submit(fn, cfg, chunk))
                if len(pending) >= (ahead or 2 * workers):
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            pool.shutdown(cancel_futures=True)


def _end_with_parent(parent: int) -> None:
    """Pool worker initializer: a thread that ends this worker once `parent` has gone. Workers of a command
    killed with SIGKILL would otherwise wait for tasks forever (they hold the task pipe's other end)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()

"""Audit mode (`data.log_samples`): the sample keys each rank consumed, one JSON line per micro-batch.

    out_dir/samples/rank{r}.jsonl   {"epoch": e, "micro_step": j, "keys": [...]}   (+ "skipped": reason when
                                    the micro-batch's optimizer step was skipped: consumed, not trained)

On resume, lines past the restored position (micro-batches trained after the checkpoint, then lost to the
interruption) are dropped, so the files always describe exactly what the model's weights have seen and
exactly-once can be checked from outside across restarts and world-size changes.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlm.data import plan


class SampleAudit:
    """Appends this rank's consumed sample keys to out_dir/samples/rank{r}.jsonl."""

    def __init__(self, out_dir: str | Path, rank: int):
        self.path = Path(out_dir) / "samples" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def record(self, epoch: int, micro_step: int, keys: list[str], skipped: str | None = None) -> None:
        """Write one line: the keys of micro-batch `micro_step` of `epoch`, in batch order; `skipped` names
        why they were consumed but not trained (their optimizer step was skipped), else they trained."""
        line = {"epoch": epoch, "micro_step": micro_step, "keys": keys}
        if skipped is not None:
            line["skipped"] = skipped
        self._file.write(json.dumps(line) + "\n")

    def flush(self) -> None:
        """Flush the written lines to the file (the trainer does so at every checkpoint)."""
        self._file.flush()


def position_of(data_state: dict) -> tuple[int, int]:
    """(epoch, micro-batches consumed in it) of a saved loader position."""
    consumed = plan.consumed_before(data_state) + data_state["segments"][-1]["micro_batches_consumed"]
    return data_state["epoch"], consumed


def truncate_audit(out_dir: str | Path, data_state: dict) -> None:
    """Keep only the records of micro-batches the restored checkpoint includes (all ranks' files)."""
    if "segments" not in data_state:  # resampled streams: exactly-once does not apply, nothing to align
        return
    limit = position_of(data_state)
    for path in sorted((Path(out_dir) / "samples").glob("rank*.jsonl")):
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and _before(json.loads(line), limit)]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def _before(record: dict, limit: tuple[int, int]) -> bool:
    return (record["epoch"], record["micro_step"]) < limit

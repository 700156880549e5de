"""One metrics writer: every record of metrics.jsonl also goes to the monitors the run configures, keyed by
optimizer step. Rank 0 writes; the other ranks hold a writer that does nothing.

  csv          out_dir/logs/metrics.csv: `step`, then one column per metric (train.monitors)
  tensorboard  out_dir/logs/tensorboard/: `tensorboard --logdir out_dir/logs/tensorboard` (train.monitors)
  wandb        the W&B project train.wandb_project, the run named by the run id (resumes continue it)

Metric names are metrics.jsonl's keys; a nested count is flattened with '/' (`samples_skipped/nonfinite_loss`).
A resumed run starts again at its checkpoint's step: when the writer opens, the CSV drops its rows after that
step and TensorBoard hides the old events after it (`purge_step`); W&B ignores steps it has seen.
A monitor whose package is missing is a preflight problem (`monitor_problems`), found before the model is built.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
from pathlib import Path
from typing import Any

from vlm.config import TrainConfig
from vlm.train.metrics import MetricsLog

LOGS = "logs"  # under out_dir (one of vlm.train.ownership's RUN_OUTPUTS)
CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # monitor -> the package it needs

Value = float | int | None


def active_monitors(train_cfg: TrainConfig) -> list[str]:
    """The monitors a run writes to besides metrics.jsonl: train.monitors, and 'wandb' when
    train.wandb_project is set."""
    return list(train_cfg.monitors) + (["wandb"] if train_cfg.wandb_project else [])


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken install, or a module with no spec
        return False


def monitor_problems(train_cfg: TrainConfig) -> list[str]:
    """One line per configured monitor whose package is not installed, naming the package, the pip command
    and the setting that turns the monitor off."""
    problems = []
    for name in active_monitors(train_cfg):
        package = PACKAGES.get(name)
        if package is None or _installed(package):
            continue
        if name == "wandb":
            setting, off = f"train.wandb_project is {train_cfg.wandb_project!r}", "unset train.wandb_project"
        else:
            setting, off = f"train.monitors has '{name}'", f"remove '{name}' from train.monitors"
        problems.append(f"{setting} but the {package} package is not installed: pip install {package} (or {off})")
    return problems


def flatten(record: dict[str, Any]) -> dict[str, Value]:
    """A metrics record's values by name, without `step`: nested dicts flattened with '/', booleans as 0/1,
    NaN and infinities as None (as metrics.jsonl writes them)."""
    flat: dict[str, Value] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in flatten(value).items()})
        elif isinstance(value, bool):
            flat[key] = int(value)
        elif isinstance(value, float) and not math.isfinite(value):
            flat[key] = None
        elif value is None or isinstance(value, int | float):
            flat[key] = value
    return flat


def _numbers(values: dict[str, Value]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if v is not None}


def _cell(value: Value | str) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)  # repr: the shortest exact float


class CsvMonitor:
    """One CSV file, one row per optimizer step: `step`, then the metrics in the order they first appeared;
    an empty cell is a metric with no value at that step (an eval-only row has no loss; a skipped step's loss
    is empty). A record for the step of the last row (the eval after a log line) fills that row in. A metric
    seen for the first time adds a column: the file is rewritten once with the wider header, so it stays one
    table that a spreadsheet opens. Opening it keeps only the rows up to `start_step`."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        self.columns = ["step"]
        self.last: dict[str, str] | None = None  # the last row as written, and where it starts in the file
        self.last_offset = 0
        if path.is_file():
            header, rows = self._read()
            self.columns = _union(self.columns, header)
            self._rewrite([r for r in rows if r["step"].isdigit() and int(r["step"]) <= start_step])

    def write(self, step: int, values: dict[str, Value]) -> None:
        """Add the row of `step`, or fill in the last row when it is that step's."""
        row = {"step": str(step), **{k: _cell(v) for k, v in values.items()}}
        same_step = self.last is not None and self.last["step"] == row["step"]
        if same_step:
            row = {**self.last, **{k: v for k, v in row.items() if v != "" or k not in self.last}}
        if any(k not in self.columns for k in row) or not self.path.is_file():  # a new file starts with its header
            self.columns = _union(self.columns, list(row))
            self._rewrite(self._rows()[:-1] + [row] if same_step else self._rows() + [row])
            return
        with self.path.open("r+b" if same_step else "ab") as f:
            if same_step:
                f.truncate(self.last_offset)
            f.seek(0, os.SEEK_END)
            self.last_offset = f.tell()
            f.write(self._line(row))
        self.last = row

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        """The header, and the rows with their non-empty cells (and the step)."""
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = [{k: v for k, v in r.items() if k and v} | {"step": r.get("step") or ""} for r in reader]
            return list(reader.fieldnames or []), rows

    def _rows(self) -> list[dict[str, str]]:
        return self._read()[1] if self.path.is_file() else []

    def close(self) -> None:
        """Nothing to do: each row is written and closed at once."""

    def _line(self, row: dict[str, str] | None = None) -> bytes:
        """One CSV line: `row` in the columns' order, or the header."""
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, restval="", lineterminator="\n")
        if row is None:
            writer.writeheader()
        else:
            writer.writerow(row)
        return text.getvalue().encode()

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        """The whole file anew (header and `rows`), written beside it and renamed over it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(self._line())
            for row in rows:
                self.last_offset = f.tell()
                f.write(self._line(row))
        os.replace(tmp, self.path)
        self.last = rows[-1] if rows else None


def _union(columns: list[str], more: list[str]) -> list[str]:
    return columns + [c for c in dict.fromkeys(more) if c not in columns]


class TensorBoardMonitor:
    """Scalars in TensorBoard event files, one tag per metric, at the optimizer step. Events that earlier runs
    in the folder wrote for steps after `start_step` are hidden (TensorBoard's purge_step): a resumed run
    trains those steps again, and a fresh run (start_step 0) all of them."""

    def __init__(self, log_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1)

    def write(self, step: int, values: dict[str, Value]) -> None:
        """Add each number of `values` at `step` and flush (a killed run keeps what it logged)."""
        for name, value in _numbers(values).items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class WandbMonitor:
    """A Weights & Biases run in train.wandb_project, its id the run id the checkpoints carry, so a resumed run
    continues it (W&B drops steps at or below the last one it has)."""

    def __init__(self, project: str, run_id: str | None, log_dir: Path, config: dict[str, Any] | None):
        import wandb

        log_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, id=run_id, resume="allow", dir=str(log_dir), config=config)

    def write(self, step: int, values: dict[str, Value]) -> None:
        """Log the numbers of `values` at `step`."""
        self.run.log(_numbers(values), step=step)

    def close(self) -> None:
        """Finish the W&B run."""
        self.run.finish()


class MetricsWriter:
    """metrics.jsonl and every configured monitor (`active_monitors`), written from one record at a time.

    `start_step`: the optimizer step the run continues from (0 when fresh); `run_id` names the W&B run;
    `config` (the resolved config) is stored with it. Does nothing unless `enabled` (rank 0).
    """

    def __init__(self, out_dir: str | Path, train_cfg: TrainConfig, enabled: bool, start_step: int = 0,
                 run_id: str | None = None, config: dict[str, Any] | None = None):
        self.log = MetricsLog(out_dir, enabled)
        self.monitors: list[Any] = []
        self.step, self.sent = -1, {}  # the last step written, and what was written for it
        if not enabled:
            return
        logs = Path(out_dir) / LOGS
        names = active_monitors(train_cfg)
        if "csv" in names:
            self.monitors.append(CsvMonitor(logs / CSV_FILE, start_step))
        if "tensorboard" in names:
            self.monitors.append(TensorBoardMonitor(logs / TENSORBOARD_DIR, start_step))
        if "wandb" in names:
            self.monitors.append(WandbMonitor(train_cfg.wandb_project, run_id, logs, config))

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` (its "step" is the optimizer step) to metrics.jsonl and to each monitor."""
        self.log.write(record)
        step = int(record["step"])
        if step != self.step:
            self.step, self.sent = step, {}
        # A second record of a step (the eval after a log line) repeats its epoch: one point per step and metric.
        values = {k: v for k, v in flatten(record).items() if k not in self.sent or self.sent[k] != v}
        self.sent.update(values)
        for monitor in self.monitors:
            monitor.write(step, values)

    def read(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl (`MetricsLog.read`)."""
        return self.log.read()

    def close(self) -> None:
        """Close the monitors that hold files or connections open (TensorBoard, W&B)."""
        for monitor in self.monitors:
            monitor.close()
        self.monitors = []

"""Throughput, MFU, the metrics.jsonl log and the loss-curve plot (rank 0 writes; every rank measures)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common training GPUs, matched by substring of the device name.
KNOWN_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "4090": 165e12,
    "3090": 71e12,
    "T4": 65e12,
}


def detect_peak_flops(device_name: str | None) -> float | None:
    """Dense bf16/fp16 peak FLOP/s of the GPU named `device_name` (KNOWN_PEAK_FLOPS), else None."""
    if not device_name:
        return None
    for key, flops in KNOWN_PEAK_FLOPS.items():
        if key in device_name:
            return flops
    return None


def train_flops_per_token(lm_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6N for the weights plus the attention score/value matmuls."""
    return 6.0 * lm_params + 12.0 * n_layers * hidden * seq_len


class StepTimer:
    """Splits wall time into waiting for data and computing, between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Start a new window now, with the data wait, tokens, samples and FLOPs back at zero."""
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.tokens = 0
        self.samples = 0
        self.flops = 0.0

    def add(self, data_wait: float, tokens: int, samples: int, flops: float) -> None:
        """Count one micro-batch of this rank: `data_wait` in seconds, its tokens, samples and FLOPs."""
        self.data_wait += data_wait
        self.tokens += tokens
        self.samples += samples
        self.flops += flops

    def summary(self, world_size: int, peak_flops: float | None) -> dict[str, float | None]:
        """Rates over the window since `reset`: tokens/s and samples/s, data_wait_share and MFU.

        Tokens and samples are this rank's counts times `world_size`; `data_wait_share` is the fraction
        of wall time spent waiting for data; `mfu` is this rank's FLOP/s over `peak_flops` (FLOP/s), or None
        without a peak.
        """
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        flops_per_s = self.flops / elapsed  # this rank's
        return {
            "tokens_per_s": self.tokens * world_size / elapsed,
            "samples_per_s": self.samples * world_size / elapsed,
            "data_wait_share": self.data_wait / elapsed,
            "mfu": flops_per_s / peak_flops if peak_flops else None,
        }


class MetricsLog:
    """One JSON object per logged step in out_dir/metrics.jsonl (appended across resumes)."""

    def __init__(self, out_dir: str | Path, enabled: bool):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` as one JSON line (sorted keys; NaN and infinities become null, which JSON has);
        does nothing unless enabled (rank 0)."""
        if self.enabled:
            clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            with self.path.open("a") as f:
                f.write(json.dumps(clean, sort_keys=True, allow_nan=False) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl, blank lines skipped; [] when the file does not exist."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict[str, Any]], path: str | Path, title: str = "training loss") -> Path | None:
    """A loss-curve PNG (train loss, and eval loss where logged) from metrics records."""
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)

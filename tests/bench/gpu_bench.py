"""GPU training benchmark of the seed's SFT setting on one GPU (a script, not a test): prints one table.

    tests/bench/gpu_bench.sh WHEELS_DIR [FLAGS]            # on the GPU machine: installs wheels, runs this
    PYTHONPATH=. python tests/bench/gpu_bench.py [--cells 'mb64-*'] [--warmup 5] [--steps 5]
    PYTHONPATH=. python tests/bench/gpu_bench.py --dry-run  # on a CPU: tiny sizes, every code path, ~2 min

The setting: a 512 x 8 MiniMind language model (8 heads, 2 KV heads, vocabulary 6400), CLIP ViT-B/16 geometry
with random weights (224 px, 196 image tokens; `train_bench.make_vit_b16`), max_seq_len 640, bf16, ZeRO-2,
projector + language model trainable, vision tower frozen; one process (world size 1). The grid: micro-batch
16 / 64 / 256 x `data.batching` dynamic / pack x `train.compile` off / on. Each cell runs the real trainer
(`vlm.train.cli.main`, in this process) for `--warmup` + `--steps` optimizer steps with `--log_interval 1` on
the synthetic caption corpus of `train_bench.make_corpus` (160 pictures, 64-320 px, ~230 tokens a sample),
repeated through `data.train_weights` so that every step gets fresh batches. From the cell's metrics.jsonl:
medians over the timed steps of samples/s, useful (non-padding) tokens/s, MFU and data-wait share, the
largest `memory_gb` (torch.cuda.max_memory_allocated, reset before each cell); checkpoint s: the run's one
save, at its end (see `checkpoint_seconds`).

One more run of mb64-dynamic-eager has `torch.cuda.set_sync_debug_mode("warn")` switched on after the
warm-up: every warning "called a synchronizing CUDA operation" until the final checkpoint is counted, per
step and by call site. That pass logs only at its last step, as real training logs rarely.

Order: the eager cells, the sync pass, then the compiled cells (a minute or so each to compile); no cell
starts after `--budget-s` (default 390 s), and the cells left out are named for a second run.
Optimizer: DeepSpeed's FusedAdam is compiled just in time, which needs nvcc; `--optimizer auto` uses it
when nvcc is found and torch's AdamW (what the trainer uses on CPUs) otherwise; the header says which.
Each cell's output goes to a log file (`--work-dir` keeps them); a failed cell prints its log's tail, the
other cells still run (none if the first one fails: the set-up is at fault), and the exit code is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_bench, beside this file (not a package)
SYNC_WARNING = "synchroniz"  # torch: "called a synchronizing CUDA operation"


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid."""

    batch_size: int
    batching: str
    compile: bool

    @property
    def name(self) -> str:
        return f"mb{self.batch_size}-{self.batching}-{'compile' if self.compile else 'eager'}"


@dataclass(frozen=True)
class Sizes:
    """What the full benchmark and the dry run differ in."""

    hidden: int
    layers: int
    max_seq_len: int
    dtype: str
    batch_sizes: tuple[int, ...]
    warmup: int
    steps: int
    sync_steps: int
    workers: int


FULL = Sizes(hidden=512, layers=8, max_seq_len=640, dtype="bfloat16", batch_sizes=(16, 64, 256), warmup=5,
             steps=5, sync_steps=10, workers=8)
DRY = Sizes(hidden=64, layers=2, max_seq_len=256, dtype="bfloat16", batch_sizes=(2,), warmup=2, steps=2,
            sync_steps=2, workers=1)


def grid(sizes: Sizes) -> list[Cell]:
    return [Cell(b, batching, compiled) for b in sizes.batch_sizes for batching in ("dynamic", "pack")
            for compiled in (False, True)]


def pick_cells(cells: list[Cell], patterns: str | None) -> list[Cell]:
    """The cells whose names match any of the comma-separated fnmatch `patterns` (all without patterns)."""
    if not patterns:
        return cells
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    picked = [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in wanted)]
    if not picked:
        raise SystemExit(f"--cells {patterns!r} matches none of: {', '.join(c.name for c in cells)}")
    return picked


def make_inputs(root: Path, dry_run: bool) -> tuple[Path, Path, int]:
    """(shard folder, vision tower folder, samples in the corpus); a --work-dir's earlier ones are reused."""
    from train_bench import make_corpus, make_vit_b16

    from vlm.formats.manifest import load_manifest
    from vlm.model.vision_encoder import write_tiny_vision_encoder

    shards, vision = root / "shards", root / ("tiny_vision" if dry_run else "clip_vit_b16")
    with output_to(root / "inputs.log"):  # the sharder reports on stdout, which is the table's
        if not (shards / "manifest.json").is_file():
            shards = make_corpus(root)
        if not (vision / "config.json").is_file():
            vision = write_tiny_vision_encoder(vision) if dry_run else make_vit_b16(root)
    return shards, vision, load_manifest(shards)["total_samples"]


def cell_argv(cell: Cell, sizes: Sizes, shards: Path, vision: Path, corpus: int, out: Path, steps: int,
              log_interval: int = 1) -> list[str]:
    """The trainer's command line for one run of `steps` optimizer steps of `cell`."""
    repeats = math.ceil(cell.batch_size * (steps + 1) / corpus)  # enough fresh batches for every step
    return [
        "--train_shards", str(shards), "--data.train_weights", str(repeats), "--out_dir", str(out),
        "--resume", "never", "--max_steps", str(steps), "--epochs", "1", "--batch_size", str(cell.batch_size),
        "--max_seq_len", str(sizes.max_seq_len), "--dim", str(sizes.hidden), "--n_layers", str(sizes.layers),
        "--model.num_attention_heads", "8", "--model.num_key_value_heads", "2", "--model.vocab_size", "6400",
        "--model.vision_model", str(vision), "--model.vision_trainable", "false",
        "--train.stage", "sft", "--train.trainable", "projector+lm", "--dtype", sizes.dtype,
        "--zero_stage", "2", "--data.batching", cell.batching, "--num_workers", str(sizes.workers),
        "--learning_rate", "1e-4", "--log_interval", str(log_interval), "--save_interval", str(10**9),
        f"--train.compile={cell.compile}",
    ]


@contextlib.contextmanager
def output_to(path: Path):
    """Send file descriptors 1 and 2 to `path`: Python's, C++'s and the DataLoader workers' output alike."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def fresh_state() -> None:
    """Between runs in one process: drop the last engine, compiled code and the memory peak."""
    import torch

    gc.collect()
    torch.compiler.reset()  # else a new model's blocks count as recompiles and hit dynamo's cache limit
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train(argv: list[str], out: Path, log: Path) -> None:
    """One in-process run of the real trainer into `out` (emptied first: a fresh run refuses an earlier run's
    checkpoints); raises RuntimeError naming the exit code and the log's tail."""
    from vlm.train.cli import main

    shutil.rmtree(out, ignore_errors=True)
    log.unlink(missing_ok=True)
    fresh_state()
    with output_to(log):
        try:
            code = main(argv)
        except Exception as err:  # a cell's failure is reported, the grid goes on
            traceback.print_exc()
            code = f"exception {type(err).__name__}"
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"trainer exit {code}; last lines of {log}:\n  " + "\n  ".join(tail))


def drop_weights(out: Path) -> None:
    """Delete a measured run's checkpoints and export (~0.8 GB a run at full size); its logs stay."""
    for name in ("checkpoints", "export"):
        shutil.rmtree(out / name, ignore_errors=True)


def read_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_seconds(out: Path, records: list[dict]) -> float | None:
    """The trainer's `checkpoint_s` where a log line carries one; else the final save, which starts right
    after the last metrics line is written and ends with its meta.json's `saved_at`."""
    logged = [r["checkpoint_s"] for r in records if r.get("checkpoint_s")]
    if logged:
        return logged[-1]
    metas = sorted((out / "checkpoints").glob("step_*/meta.json"))
    if not metas or not (out / "metrics.jsonl").is_file():
        return None
    return json.loads(metas[-1].read_text())["saved_at"] - (out / "metrics.jsonl").stat().st_mtime


def summarise(out: Path, warmup: int) -> dict:
    """Medians over the timed steps (those after `warmup`) of a finished cell's metrics.jsonl."""
    records = [r for r in read_records(out) if "loss" in r]
    timed = [r for r in records if r["step"] > warmup]
    if not timed:
        raise RuntimeError(f"{out / 'metrics.jsonl'} has no step after the {warmup} warm-up steps")

    def median(key: str) -> float | None:
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"samples_per_s": median("samples_per_s"), "tokens_per_s": median("tokens_per_s"),
            "mfu": median("mfu"), "data_wait_share": median("data_wait_share"),
            "memory_gb": max(r["memory_gb"] for r in records),
            "checkpoint_s": checkpoint_seconds(out, records), "step_time_s": median("step_time_s"),
            "slowest_step_s": max(r["step_time_s"] for r in timed)}


def nvcc_found() -> bool:
    """Whether DeepSpeed could JIT-compile its FusedAdam here (it runs CUDA_HOME/bin/nvcc)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False
    try:
        subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "-V"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return shutil.which("ninja") is not None


@contextlib.contextmanager
def torch_adamw():
    """DeepSpeed with torch's AdamW instead of its FusedAdam (`torch_adam`, as the trainer does on CPUs).
    vlm has no setting for it (its ds_config picks FusedAdam on every GPU), hence the patch."""
    from vlm.train import trainer

    build = trainer.build_ds_config

    def with_torch_adam(*args, **kwargs):
        ds = build(*args, **kwargs)
        ds["optimizer"]["params"]["torch_adam"] = True
        return ds

    with mock.patch.object(trainer, "build_ds_config", with_torch_adam):
        yield


class SyncCounter:
    """Counts synchronising CUDA calls from the first micro-batch after `warmup` to the start of the final
    checkpoint: `torch.cuda.set_sync_debug_mode("warn")` makes each one a warning, recorded here.
    Without CUDA (the dry run) the same wrappers run but the mode is never set, so nothing is counted."""

    def __init__(self, warmup: int, cuda: bool):
        self.warmup, self.cuda = warmup, cuda
        self.micro_batches = 0
        self.caught: list[warnings.WarningMessage] = []

    def _set(self, on: bool) -> None:
        if self.cuda:
            import torch

            torch.cuda.set_sync_debug_mode("warn" if on else "default")
            if on:  # a probe: one known synchronising call, which must be seen (else a filter hides them)
                torch.ones(1, device="cuda").item()

    @contextlib.contextmanager
    def installed(self):
        from vlm.train import trainer

        run_micro_batch, start_checkpoint = trainer.run_micro_batch, trainer.start_checkpoint

        def counted_micro_batch(*args, **kwargs):
            self.micro_batches += 1
            if self.micro_batches == self.warmup + 1:
                self._set(True)
            return run_micro_batch(*args, **kwargs)

        def uncounted_save(*args, **kwargs):
            self._set(False)
            return start_checkpoint(*args, **kwargs)

        with (mock.patch.object(trainer, "run_micro_batch", counted_micro_batch),
              mock.patch.object(trainer, "start_checkpoint", uncounted_save),
              warnings.catch_warnings(record=True) as self.caught):
            warnings.simplefilter("always")  # every occurrence, not once per call site
            try:
                yield self
            finally:
                self._set(False)

    def sites(self) -> Counter:
        """Synchronising calls by `file:line` of the Python code that made them (the probe excluded)."""
        return Counter(f"{Path(w.filename).name}:{w.lineno}" for w in self._syncs() if not _from_here(w))

    def probe_seen(self) -> bool:
        return any(_from_here(w) for w in self._syncs())

    def _syncs(self) -> list[warnings.WarningMessage]:
        return [w for w in self.caught if SYNC_WARNING in str(w.message)]


def _from_here(warning: warnings.WarningMessage) -> bool:
    return Path(warning.filename).resolve() == Path(__file__).resolve()


def sync_pass(cell: Cell, sizes: Sizes, inputs: tuple, root: Path, cuda: bool) -> str:
    """Run `cell` with the sync counter; returns the line that reports it."""
    steps = sizes.warmup + sizes.sync_steps
    out = root / "sync"
    argv = cell_argv(cell, sizes, *inputs, out, steps, log_interval=10**9)  # the last step logs, no other
    counter = SyncCounter(sizes.warmup, cuda)
    with counter.installed():
        train(argv, out, root / "sync.log")
    drop_weights(out)
    sites = counter.sites()
    total = sum(sites.values())
    where = f"{cell.name}, {sizes.sync_steps} steps after {sizes.warmup} warm-up, one log line"
    if not cuda:
        return (f"Synchronising CUDA calls per step: n/a (dry run, no CUDA: the counting pass ran {where}, "
                "but sync debug mode was not set)")
    if not counter.probe_seen():
        raise RuntimeError("the probe's synchronising call raised no warning: something filters them out")
    top = ", ".join(f"{site} x{n}" for site, n in sites.most_common(6)) or "none"
    return (f"Synchronising CUDA calls per step ({where}): {total / sizes.sync_steps:.1f} "
            f"({total} in all; by call site: {top})")


def table(rows: list[tuple[Cell, dict | str]]) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = ["| cell | samples/s | tokens/s | MFU | peak memory GB | data-wait share | checkpoint s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cell, m in rows:
        if isinstance(m, str):  # why there are no figures
            lines.append(f"| {cell.name} | {m} | | | | | |")
            continue
        figures = (fmt(m["samples_per_s"], ".1f"), fmt(m["tokens_per_s"], ",.0f"), fmt(m["mfu"], ".1%"),
                   fmt(m["memory_gb"], ".2f"), fmt(m["data_wait_share"], ".1%"),
                   fmt(m["checkpoint_s"], ".2f"))
        lines.append(f"| {cell.name} | " + " | ".join(figures) + " |")
    return "\n".join(lines)


def header(sizes: Sizes, dry_run: bool, optimizer: str) -> str:
    import deepspeed
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
    vision = "tiny CLIP tower (64 px, 64 tokens)" if dry_run else "CLIP ViT-B/16 geometry (224 px, 196 tok.)"
    return (f"{sizes.hidden} x {sizes.layers} MiniMind + {vision}, random weights, max_seq_len "
            f"{sizes.max_seq_len}, {sizes.dtype}, ZeRO-2, 1 process, projector+LM trainable, loader workers "
            f"{sizes.workers}; {sizes.warmup} warm-up + {sizes.steps} timed steps, medians; {device}; "
            f"optimizer {optimizer}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"deepspeed {deepspeed.__version__}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, micro-batch 2: every code path")
    p.add_argument("--cells", help="comma-separated cell names or fnmatch patterns, e.g. 'mb64-*,*-eager'")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps per cell (default 5: compiled blocks "
                   "recompile during the first few; dry run 2)")
    p.add_argument("--steps", type=int, help="timed optimizer steps per cell (default 5; dry run 2)")
    p.add_argument("--sync-steps", type=int, help="steps counted by the sync pass (default 10; dry run 2)")
    p.add_argument("--sync-cell", help="the cell the sync pass runs (default mb64-dynamic-eager; dry run "
                   "mb2-dynamic-eager; 'none': skip the pass)")
    p.add_argument("--workers", type=int, help="DataLoader workers (default 8, sft.yaml's; dry run 1)")
    p.add_argument("--optimizer", choices=("auto", "fused", "torch"), default="auto",
                   help="fused: DeepSpeed's FusedAdam (JIT-compiled, needs nvcc); torch: torch's AdamW; "
                   "auto: fused where nvcc is found")
    p.add_argument("--work-dir", type=Path, help="keep corpus, runs and logs here (default: a temporary one)")
    p.add_argument("--budget-s", type=float, help="start no cell after this many seconds (default 390; dry "
                   "run: none); the cells left out are named, to run them next")
    args = p.parse_args(argv)
    if args.budget_s is None and not args.dry_run:
        args.budget_s = 390.0  # compiled cells included, the whole run stays within about 8 minutes
    for name, least in (("warmup", 0), ("workers", 0), ("steps", 1), ("sync_steps", 1)):
        if (value := getattr(args, name)) is not None and value < least:
            p.error(f"--{name.replace('_', '-')} {value} is too small")
    return args


FAILED, NOT_RUN, OVER_BUDGET = "FAILED", "not run", "not run (time budget)"


def nothing_worked(results: dict) -> bool:
    """Some cell failed and none gave figures: the set-up is at fault rather than a cell."""
    return FAILED in results.values() and not any(isinstance(m, dict) for m in results.values())


def run_cells(cells: list[Cell], sizes: Sizes, inputs: tuple, root: Path, results: dict,
              deadline: float, total: int) -> None:
    """Run `cells` in turn, adding each one's figures, or why there are none, to `results` (by name). A
    failure is reported on stderr; after `nothing_worked` the rest are not run; past `deadline`
    (perf_counter seconds) no cell is started."""
    for cell in cells:
        if nothing_worked(results):
            results[cell.name] = NOT_RUN
            continue
        if time.perf_counter() > deadline:
            results[cell.name] = OVER_BUDGET
            continue
        started = time.perf_counter()
        try:
            out = root / cell.name
            argv = cell_argv(cell, sizes, *inputs, out, sizes.warmup + sizes.steps)
            train(argv, out, root / f"{cell.name}.log")
            figures = results[cell.name] = summarise(out, sizes.warmup)
            drop_weights(out)
            status = (f"median {figures['step_time_s']:.3f} s/step, "
                      f"slowest timed step {figures['slowest_step_s']:.3f} s")
        except RuntimeError as err:
            results[cell.name] = FAILED
            status = f"FAILED: {err}"
        elapsed = time.perf_counter() - started
        print(f"[{len(results)}/{total}] {cell.name}: {elapsed:.0f} s, {status}", file=sys.stderr, flush=True)


def measure_syncs(args: argparse.Namespace, sizes: Sizes, inputs: tuple, root: Path, cuda: bool,
                  results: dict) -> tuple[str, bool]:
    """(the sync pass's line, whether it failed)."""
    if args.sync_cell == "none":
        return "Synchronising CUDA calls: not measured (--sync-cell none)", False
    if nothing_worked(results):
        return "Synchronising CUDA calls: not measured (every cell failed)", False
    middle = sizes.batch_sizes[len(sizes.batch_sizes) // 2]
    cell = pick_cells(grid(sizes), args.sync_cell or f"mb{middle}-dynamic-eager")[0]
    try:
        return sync_pass(cell, sizes, inputs, root, cuda), False
    except RuntimeError as err:
        return f"Synchronising CUDA calls: the pass FAILED: {err}", True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = DRY if args.dry_run else FULL
    flags = ("warmup", "steps", "sync_steps", "workers")
    sizes = dataclasses.replace(base, **{k: v for k in flags if (v := getattr(args, k)) is not None})
    cells = pick_cells(grid(sizes), args.cells)
    if args.dry_run:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is first imported
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("error: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    fused = cuda and (args.optimizer == "fused" or (args.optimizer == "auto" and nvcc_found()))
    started = time.perf_counter()
    deadline = started + (args.budget_s or math.inf)
    with contextlib.ExitStack() as stack:
        root = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_bench_")))
        root.mkdir(parents=True, exist_ok=True)
        if not fused:
            stack.enter_context(torch_adamw())
        inputs = make_inputs(root, args.dry_run)
        print(f"inputs ready in {time.perf_counter() - started:.0f} s: {inputs[2]} samples, work dir {root}",
              file=sys.stderr, flush=True)
        results: dict[str, dict | str] = {}
        # The cheap and sure first: eager cells, the sync pass, then compiled cells while the budget lasts.
        run_cells([c for c in cells if not c.compile], sizes, inputs, root, results, deadline, len(cells))
        sync_line, sync_failed = measure_syncs(args, sizes, inputs, root, cuda, results)
        run_cells([c for c in cells if c.compile], sizes, inputs, root, results, deadline, len(cells))
    print(header(sizes, args.dry_run, "DeepSpeed FusedAdam" if fused else "torch AdamW"))
    print()
    print(table([(cell, results[cell.name]) for cell in cells]))
    print()
    print(sync_line)
    failed = [name for name, m in results.items() if m in (FAILED, NOT_RUN)]
    if sync_failed:
        failed.append("sync pass")
    skipped = [name for name, m in results.items() if m == OVER_BUDGET]
    notes = [f"wall time {time.perf_counter() - started:.0f} s"]
    if failed:
        notes.append(f"FAILED: {', '.join(failed)}")
    if skipped:
        notes.append(f"left out by --budget-s {args.budget_s:.0f}, to run next: --cells {','.join(skipped)}")
    print("\n" + "; ".join(notes))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

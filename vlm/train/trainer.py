"""One trainer for every stage: pretrain and SFT differ only in their YAML.

    deepspeed --num_gpus 2 launch/train.py --config launch/configs/debug.yaml

`run(cfg)` sets up (process group, model, freezing, loader, engine, resume), then `Trainer.fit()` loops
over micro-batches; DeepSpeed handles accumulation, clipping, the optimizer and the schedule. Returns the
process exit code: 0 done, EXIT_CHECKPOINTED_ON_SIGNAL after a signal-triggered checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlm.build import Built, build
from vlm.config import Config
from vlm.data import plan
from vlm.data.image import PixelNormalizer
from vlm.data.pipeline import EvalLoader, LoaderSettings, TrainLoader
from vlm.train import distributed
from vlm.train.audit import SampleAudit, truncate_audit
from vlm.train.checkpoint import CheckpointError, abandon_newer, read_meta, resolve_resume, resume_problems
from vlm.train.ds_config import build_ds_config
from vlm.train.engine_state import finish_checkpoint, load_checkpoint, needs_universal, start_checkpoint
from vlm.train.export_live import export_live
from vlm.train.freeze import apply_trainable_policy
from vlm.train.launcher import DistEnv, normalize_launcher_env
from vlm.train.metrics import (
    StepTimer,
    detect_peak_flops,
    flop_shape,
    micro_batch_flops,
    plot_loss,
)
from vlm.train.monitor import MetricsWriter
from vlm.train.ownership import OutDirLock, claim_out_dir
from vlm.train.preflight import check_at_startup
from vlm.train.schedule import scheduler_factory, set_peak_lr
from vlm.train.signals import EXIT_CHECKPOINTED_ON_SIGNAL, StopFlag
from vlm.train.stepping import StepResult, agree_at_boundary, evaluate_loss, run_micro_batch, step_engine

log = logging.getLogger("vlm.train")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated NaN losses, an epoch shorter than one step)."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (initialisation; the data order has its own seeds)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """The training loop of one rank: micro-batches through the engine, logging, eval, checkpoints, signals.

    `start` holds the optimizer step to continue from and the run's identity ({"step": n, "run_id": id});
    `total_steps` is the step the run ends at (`vlm.data.plan.last_step`).
    """

    def __init__(self, cfg: Config, built: Built, engine, loader: TrainLoader, eval_loader: EvalLoader | None,
                 dist_env: DistEnv, device: torch.device, start: dict, total_steps: int):
        self.cfg, self.built, self.engine = cfg, built, engine
        self.loader, self.eval_loader = loader, eval_loader
        self.env, self.device = dist_env, device
        self.normalize_pixels = PixelNormalizer(built.image_config)  # loader pixels are uint8 (vlm.data.collate)
        self.out_dir = Path(cfg.train.out_dir)
        self.is_main = dist_env.rank == 0
        self.step = start.get("step", 0)
        self.run_id = start.get("run_id")
        self.skipped_before = start.get("skipped") or {"steps": 0, "samples": 0}  # earlier runs' totals
        # metrics.jsonl and train.monitors / train.wandb_project, all keyed by optimizer step (rank 0 writes)
        self.metrics = MetricsWriter(self.out_dir, cfg.train, self.is_main, start_step=self.step,
                                     run_id=self.run_id, config=cfg.to_dict())
        self.audit = SampleAudit(self.out_dir, dist_env.rank) if cfg.data.log_samples else None
        self.timer = StepTimer()
        self.stop = StopFlag().install()
        self.bad_in_row = 0
        self.saved_step = self.step  # a resumed run's starting point is already a checkpoint
        self.last_save_time, self.checkpoint_seconds = time.monotonic(), 0.0
        self.pending = None  # a checkpoint the background writer is still writing (train.async_checkpoint)
        self.evaluated_step, self.eval_loss = -1, None
        self.step_batches = []  # the optimizer step being accumulated
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # a NaN/Inf loss in it (on the device)
        self.stop_now = self.save_due = False  # agreed across ranks at the last step boundary
        self.skipped_steps, self.samples_skipped = 0, Counter()
        self.window: list[StepResult] = []
        self.window_skipped = 0
        self.flop_shape = flop_shape(built.model)  # after freezing: trained and frozen weights cost differently
        self.total_steps = total_steps

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train until the last step or a stop signal; returns 0, or EXIT_CHECKPOINTED_ON_SIGNAL."""
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.is_main, desc="train", unit="step")
        try:
            while self.loader.epoch < self.cfg.train.epochs and self.step < self.total_steps:
                if self._run_epoch(bar) == "signal":
                    return EXIT_CHECKPOINTED_ON_SIGNAL
            self._publish()
            self._finish()
            return 0
        finally:
            bar.close()
            self.stop.uninstall()
            self.metrics.close()

    def _run_epoch(self, bar) -> str | None:
        accumulation = self.cfg.train.accumulation_steps
        fetch_start = time.perf_counter()
        for batch in self.loader:
            wait = time.perf_counter() - fetch_start
            result = run_micro_batch(self.engine, batch, self.device, self.normalize_pixels, self.nonfinite)
            self._account(batch, result, wait)
            self.step_batches.append((batch["micro_step"], batch.get("keys", []), batch["num_samples"]))
            consumed = batch["micro_step"] + 1
            # Step boundaries count from where this run's plan segment starts (a resume may change geometry).
            if (consumed - self.loader.segment_start) % accumulation != 0:
                step_engine(self.engine)
            else:
                self._optimizer_step()
                bar.update(1)
                outcome = self._after_step(consumed)
                if outcome is not None:
                    return outcome
            fetch_start = time.perf_counter()
        self.loader.set_epoch(self.loader.epoch + 1)
        if self.saved_step != self.step:  # the epoch's end is a checkpoint (unless this step already is one)
            self.save(self.loader.state_dict(0))
        return None

    def _optimizer_step(self) -> None:
        """Collective, at an accumulation boundary: the step's one agreement (a NaN/Inf loss on any rank, a
        stop signal, the time-based save cadence), then DeepSpeed's step, skipped on every rank when needed."""
        skip, self.stop_now, self.save_due = agree_at_boundary(
            self.nonfinite, [self.stop.pending(), self._save_due()], self.device)
        self._publish()  # the background writer had this step's forward and backward to finish
        skipped_before = self.engine.skipped_steps  # a Python int: DeepSpeed's own overflow skips
        step_engine(self.engine, skip=skip)
        skipped_by_deepspeed = not skip and self.engine.skipped_steps > skipped_before
        if skipped_by_deepspeed and self.is_main:
            log.warning("step %d: DeepSpeed skipped the optimizer step itself (a non-finite gradient norm, or an "
                        "fp16 overflow); counted as skipped", self.step + 1)
        self.step += 1
        self._close_step(skip or skipped_by_deepspeed)

    def _account(self, batch: dict, result: StepResult, wait: float) -> None:
        self.window.append(result)
        rows, row_len = batch["input_ids"].shape  # every position is computed, padding included
        scored = batch["loss_index"].numel() if "loss_index" in batch else None  # the head's rows (a shape)
        flops = (micro_batch_flops(self.flop_shape, rows, row_len, batch["num_images"], scored)
                 if result.loss is not None else 0.0)
        self.timer.add(wait, batch["num_tokens"], batch["num_samples"], flops)

    def _close_step(self, skipped: bool) -> None:
        """Account the step just finished: audit lines, and for a skipped step its samples as not trained;
        raises TrainingError after train.max_bad_steps skipped steps in a row."""
        reason = "nonfinite_loss" if skipped else None
        samples = sum(n for _, _, n in self.step_batches)
        self.bad_in_row = self.bad_in_row + 1 if skipped else 0
        if reason is not None:
            self.skipped_steps += 1
            self.window_skipped += 1
            self.samples_skipped[reason] += samples
            if self.is_main:
                log.warning("step %d skipped: a NaN/Inf loss or gradient; no weight, optimizer state or "
                            "schedule position changed, and its samples were not trained (%d on rank 0)",
                            self.step, samples)
        if self.audit is not None:
            for micro_step, keys, _ in self.step_batches:
                self.audit.record(self.loader.epoch, micro_step, keys, skipped=reason)
        self.step_batches = []
        if self.bad_in_row >= self.cfg.train.max_bad_steps:
            raise TrainingError(
                f"{self.bad_in_row} optimizer steps in a row had a NaN/Inf loss (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}); lower train.learning_rate, set train.grad_clip, or check the data"
            )

    def _after_step(self, consumed: int) -> str | None:
        """'signal' or 'done' end the epoch loop; None goes on."""
        t = self.cfg.train
        if self.step % t.log_interval == 0 or self.step == self.total_steps:
            self._log()
        if t.eval_interval and self.step % t.eval_interval == 0:
            self.evaluate()
        if self.stop_now:
            self.save(self.loader.state_dict(consumed), wait=True)
            if self.is_main:
                log.warning("stop signal received: checkpointed at step %d; exiting with code %d",
                            self.step, EXIT_CHECKPOINTED_ON_SIGNAL)
            return "signal"
        if self.step >= self.total_steps or self.step % t.save_interval == 0 or self.save_due:
            self.save(self.loader.state_dict(consumed))
        return "done" if self.step >= self.total_steps else None

    def _finish(self) -> None:
        loss = self.evaluate()
        if self.is_main:
            plot_loss(self.metrics.read(), self.out_dir / "loss.png", title=f"{self.cfg.train.stage} loss")
        export_live(self.engine, self.built, self.out_dir / "export", self.is_main)
        if self.is_main and loss is not None:
            log.info("final eval loss %.4f", loss)

    # -- logging, eval, checkpoints ------------------------------------------------------------------
    def _log(self) -> None:
        losses = [r.loss for r in self.window if r.loss is not None]
        # One all-reduce per log line: finite loss sum, micro-batches with one, samples of skipped steps, bad
        # samples the data pipeline dropped; the losses were kept on the device, this is where they are read.
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)
        if losses:
            stacked = torch.stack(losses).double()
            finite = torch.isfinite(stacked)
            stats[0], stats[1] = torch.where(finite, stacked, 0.0).sum(), finite.sum()
        stats[2], stats[3] = self.samples_skipped["nonfinite_loss"], self.loader.monitor.bad
        distributed.all_reduce_sum(stats)
        mean_loss = float(stats[0] / stats[1]) if stats[1] > 0 else None  # None: every micro-batch was skipped
        summary = self.timer.summary(self.env.world_size, self.peak_flops)
        remaining = self.total_steps - self.step
        elapsed = time.perf_counter() - self.timer.start
        steps_in_window = max(len(self.window) // self.cfg.train.accumulation_steps, 1)
        norm = self.engine.get_global_grad_norm()
        record = {
            "step": self.step, "epoch": self.loader.epoch, "loss": mean_loss,
            "lr": self.window[-1].lr if self.window else None,  # what this step used, not the next one's
            "grad_norm": float(norm) if norm is not None and math.isfinite(float(norm)) else None,
            **summary, "memory_gb": _memory_gb(self.device),
            "eta_s": remaining * elapsed / steps_in_window, "step_time_s": elapsed / steps_in_window,
            "skipped_nonfinite": self.window_skipped,  # optimizer steps of this window skipped for a NaN/Inf loss
            # checkpoint writes since the last log line, and their share of that wall time
            "checkpoint_s": self.checkpoint_seconds, "checkpoint_share": self.checkpoint_seconds / max(elapsed, 1e-9),
        }
        self.checkpoint_seconds = 0.0
        skipped = self._skipped_totals(int(stats[2]))
        record.update(skipped_steps=skipped["steps"], samples_skipped={"nonfinite_loss": skipped["samples"]},
                      bad_samples=int(stats[3]))  # dropped by the data pipeline, all ranks, this run so far
        self.metrics.write(record)
        if self.is_main:
            tqdm.write(
                f"step {self.step}/{self.total_steps} loss {_fmt(mean_loss)} lr {record['lr'] or 0:.2e} "
                f"tok/s {record['tokens_per_s']:.0f} data-wait {record['data_wait_share']:.0%}"
            )
        self.window.clear()
        self.window_skipped = 0
        self.timer.reset()

    @property
    def peak_flops(self) -> float | None:
        """Peak FLOP/s of this rank's device for MFU: train.peak_flops, else a known GPU's, else None."""
        if self.cfg.train.peak_flops:
            return self.cfg.train.peak_flops
        if self.device.type == "cuda":
            return detect_peak_flops(torch.cuda.get_device_name(self.device))
        return None

    def evaluate(self) -> float | None:
        """Collective: the eval loss over data.eval_shards (logged and returned) and the answers of
        `vlm.train.eval_answers` (logged), once per step; None without eval shards, or when no eval sample
        could be used (then a warning names the skip reasons)."""
        if self.eval_loader is None:
            return None
        if self.evaluated_step == self.step:  # e.g. eval_interval hit the last step: the end adds no second one
            return self.eval_loss
        self.evaluated_step = self.step
        self.eval_loss = loss = evaluate_loss(self.engine, self.eval_loader, self.device, self.normalize_pixels)
        self.metrics.write({"step": self.step, "epoch": self.loader.epoch, "eval_loss": loss})
        if self.is_main and loss is None:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.eval_loader.monitor.by_reason.most_common())
            log.warning("step %d: no eval sample of data.eval_shards could be used (skipped: %s); eval loss is "
                        "null. Check them with `python -m data_tools.verify` and data.max_seq_len",
                        self.step, reasons or "none counted on rank 0")
        elif self.is_main:
            tqdm.write(f"step {self.step} eval loss {loss:.4f}")
        if self.cfg.train.eval_answers > 0:  # every rank generates the same answers (no rank waits); rank 0 logs
            from vlm.train.eval_answers import answer_samples, log_answers

            answers = answer_samples(self.engine, self.built, self.cfg, self.device)
            if self.is_main:
                log_answers(answers, self.step, self.metrics)
        return loss

    def _skipped_totals(self, samples: int | None = None) -> dict[str, int]:
        """Skipped optimizer steps and their samples over all ranks, this run and the earlier ones. Collective
        unless `samples` (this run's, already summed over ranks) is given."""
        if samples is None:
            samples = int(distributed.all_reduce_sum(torch.tensor(
                [self.samples_skipped["nonfinite_loss"]], dtype=torch.float64, device=self.device)).item())
        return {"steps": self.skipped_before["steps"] + self.skipped_steps,
                "samples": self.skipped_before["samples"] + samples}

    def _save_due(self) -> bool:
        """Whether train.save_interval_minutes passed since this run's last checkpoint (or its start)."""
        minutes = self.cfg.train.save_interval_minutes
        return minutes is not None and time.monotonic() - self.last_save_time >= 60.0 * minutes

    def save(self, data_state: dict, wait: bool = False) -> None:
        """Collective: a checkpoint of this step with the loader position `data_state`, complete on return
        unless DeepSpeed's background writer writes it (train.async_checkpoint, and not `wait`): then it is
        published (`_publish`) at the next optimizer step or when the run ends. The wall time this loop spends
        on it counts in the next log line's `checkpoint_s` / `checkpoint_share`."""
        started = time.perf_counter()
        meta = {
            "epoch": data_state.get("epoch", self.loader.epoch), "data_state": data_state,
            "world_size": self.env.world_size, "zero_stage": self.cfg.train.zero_stage,
            "config": self.cfg.to_dict(), "total_steps": self.total_steps, "run_id": self.run_id,
            "skipped": self._skipped_totals(),
        }
        self._publish()
        if self.audit is not None:
            self.audit.flush()  # the audit lines of every step up to this checkpoint are on disk before it
        self.pending = start_checkpoint(self.engine, self.out_dir, self.step, meta, self.cfg.train.keep_checkpoints)
        self.saved_step = self.step
        self.checkpoint_seconds += time.perf_counter() - started
        self.last_save_time = time.monotonic()
        if wait or not distributed.writes_checkpoints_in_background(self.engine):
            self._publish()

    def _publish(self) -> None:
        """Collective: make the pending checkpoint complete (`finish_checkpoint`); a no-op without one."""
        if self.pending is None:
            return
        started = time.perf_counter()
        path = finish_checkpoint(self.engine, self.pending)
        self.pending = None
        self.checkpoint_seconds += time.perf_counter() - started
        if self.is_main:
            tqdm.write(f"checkpoint {path}")


def _fmt(value: float | None) -> str:
    return "skipped" if value is None else f"{value:.4f}"


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB (Linux)
    except ImportError:
        return 0.0


def run(cfg: Config) -> int:
    """Check, set everything up and train; returns the exit code.

    A single process runs the preflight before anything else; several ranks run it once the process group
    exists, so that they stop together when any of them finds a problem. An error tears the process group
    down at once; otherwise it lives until the process exits (a following run in the same process reuses it).
    """
    if normalize_launcher_env().world_size == 1:
        check_at_startup(cfg, 1, 0)
    env = distributed.init_distributed()
    try:
        device = distributed.device_for_rank(env.local_rank, cfg.train.device)
        if env.world_size > 1:
            check_at_startup(cfg, env.world_size, env.rank, lambda flag: distributed.any_rank(flag, device))
        lock = _lock_out_dir(Path(cfg.train.out_dir), device)
        try:
            return _train(cfg, env, device)
        finally:
            if lock is not None:
                lock.release()
    except BaseException:
        distributed.destroy_distributed()
        raise


LOCK_WAIT_S = 30.0  # how long a new run waits for a killed run's processes to let go of the out_dir


def _lock_out_dir(out_dir: Path, device: torch.device) -> OutDirLock | None:
    """Collective: rank 0 takes out_dir's lock for the run's life; every rank stops if it could not."""
    return distributed.on_rank0(lambda: OutDirLock(out_dir).acquire(wait_s=LOCK_WAIT_S), device,
                                f"lock train.out_dir {out_dir}")


def _train(cfg: Config, env: DistEnv, device: torch.device) -> int:
    out_dir = Path(cfg.train.out_dir)
    seed_everything(cfg.train.seed)
    built = build(cfg)
    counts = apply_trainable_policy(built.model, cfg.train.trainable, cfg.train.trainable_patterns)
    fmt = built.sample_format(cfg.data)
    settings = LoaderSettings.from_config(cfg, env.world_size, env.rank, pin_memory=device.type == "cuda")
    loader = TrainLoader(cfg.data.train_shards, fmt, settings)
    eval_loader = EvalLoader(cfg.data.eval_shards, fmt, settings) if cfg.data.eval_shards else None
    resume = resolve_resume(out_dir, cfg.train.resume)
    meta = read_meta(resume) if resume else None
    if meta is None or not _inside(resume, out_dir):  # a fresh run, or one continuing another out_dir's
        moved = distributed.on_rank0(lambda: claim_out_dir(out_dir, cfg.train.previous_run, move=True), device,
                                     f"claim train.out_dir {out_dir}")
        if moved is not None:
            log.warning("train.previous_run=move: the earlier run's outputs are now in %s", moved)
    else:
        abandoned = distributed.on_rank0(lambda: abandon_newer(resume), device, "set newer checkpoints aside")
        if abandoned:
            log.warning("resuming from %s: the newer %s are set aside and will not be resumed", resume.name,
                        ", ".join(abandoned))
    if meta is not None:
        problems = resume_problems(resume, meta, cfg)
        if problems:
            raise CheckpointError(f"cannot resume from {resume}: " + "; ".join(problems))
        loader.load_state_dict(meta["data_state"])  # the position decides how many steps are left
    done = meta["step"] if meta is not None else 0
    run_id = meta.get("run_id") if meta is not None else uuid.uuid4().hex  # rank 0's is the one saved
    total = plan.last_step(loader.position, done, cfg.train.epochs, cfg.train.max_steps)
    if meta is None and total < 1:
        raise TrainingError(
            f"the training data gives {loader.micro_batches_per_epoch} micro-batches per rank per epoch: fewer "
            f"than one optimizer step (global batch {loader.geometry.global_batch} = batch_size "
            f"{cfg.train.batch_size} x accumulation_steps {cfg.train.accumulation_steps} x world size "
            f"{env.world_size}); use smaller batches or more data"
        )
    ds_config = build_ds_config(cfg.train, loader.geometry, device.type == "cpu")
    universal = meta is not None and needs_universal(meta, cfg.train.zero_stage, env.world_size, cfg.train.dtype)
    if universal and cfg.train.zero_stage > 0:  # a ZeRO-0 engine is restored by vlm.train.layout_change
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    engine = distributed.build_engine(built.model, ds_config, scheduler_factory(cfg.train, total))
    with distributed.closing_checkpoint_writer(engine):
        built.model.match_vision_dtype()  # the frozen tower computes in the engine's precision too
        if cfg.train.compile:
            log.info("train.compile: %d modules compiled at their first batch", built.model.compile_blocks())
        if resume is not None:
            load_checkpoint(engine, resume, universal_root=out_dir / "universal" if universal else None)
            distributed.apply_optimizer_settings(engine, cfg.train.betas, cfg.train.weight_decay, cfg.train.grad_clip)
            previous = set_peak_lr(engine.lr_scheduler, cfg.train.learning_rate)
            if env.rank == 0 and not math.isclose(previous, cfg.train.learning_rate):
                log.info("train.learning_rate changed on resume: %.3g -> %.3g, from step %d on",
                         previous, cfg.train.learning_rate, done + 1)
            if cfg.data.log_samples:
                distributed.on_rank0(lambda: truncate_audit(out_dir, meta["data_state"]), device, "align the audit")
        if env.rank == 0:
            _print_header(cfg, env, counts, loader, resume, total)
        distributed.barrier()
        start = {"step": done, "run_id": run_id, "skipped": meta.get("skipped") if meta is not None else None}
        return Trainer(cfg, built, engine, loader, eval_loader, env, device, start, total).fit()


def _inside(checkpoint: Path, out_dir: Path) -> bool:
    """Whether `checkpoint` is one of out_dir's own checkpoints."""
    return checkpoint.resolve().parent == (out_dir / "checkpoints").resolve()


def _print_header(cfg: Config, env, counts: dict, loader, resume, total: int) -> None:
    lines = {
        "launcher": env.launcher, "world size": env.world_size, "stage": cfg.train.stage,
        "parameters": f"{counts['total']:,} total, {counts['trainable']:,} trainable ({cfg.train.trainable})",
        "micro-batches per rank per epoch": loader.micro_batches_per_epoch,
        "dropped per epoch (tail < one global batch)": loader.dropped_per_epoch,
        "optimizer steps": total, "resume from": str(resume) if resume else "start",
    }
    tqdm.write(json.dumps(lines, indent=1))



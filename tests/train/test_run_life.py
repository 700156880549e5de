"""A run's whole life through the real entry point (`vlm.train.cli.main`, one process, in this process):
schedules, resume under a new geometry or learning rate, and what a resume refuses."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.data.shard_fixtures import write_shards
from vlm.train.cli import main
from vlm.train.schedule import lr_factor

PEAK = 1e-3


@pytest.fixture(scope="module")
def shards60(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("s60") / "shards", [25, 35], images_of=lambda i: 1)


def train(shards: Path, out_dir: Path, *flags: str) -> int:
    return main(["--config", "launch/configs/debug.yaml", "--train_shards", str(shards), "--out_dir", str(out_dir),
                 "--learning_rate", str(PEAK), "--train.warmup_steps", "0", "--log_interval", "1", *flags])


def step_records(out_dir: Path) -> dict[int, dict]:
    """The last training record of each step in metrics.jsonl (a resumed run appends)."""
    records = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record
    return records


def audited_keys(out_dir: Path) -> Counter:
    keys = Counter()
    for path in (out_dir / "samples").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            keys.update(json.loads(line)["keys"])
    return keys


def test_no_warm_up_means_the_first_step_learns_at_the_peak(shards60, tmp_path, launch_env):
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "2") == 0
    lrs = [r["lr"] for _, r in sorted(step_records(out).items())]
    assert lrs == pytest.approx([PEAK * lr_factor(s, 0, 2, 0.1) for s in range(2)]) and lrs[0] == PEAK


def test_warm_up_runs_no_step_at_learning_rate_zero_and_a_short_run_is_warned(shards60, tmp_path, launch_env,
                                                                               caplog):
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "2", "--train.warmup_steps", "4") == 0
    lrs = [r["lr"] for _, r in sorted(step_records(out).items())]
    assert lrs == pytest.approx([PEAK / 4, PEAK / 2])
    assert "never reaches train.learning_rate" in caplog.text


def test_schedule_shape():
    assert [lr_factor(s, 4, 10, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, 4, 10, 0.1) == pytest.approx(0.1) and lr_factor(20, 4, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 0, 10, 0.1) == 1.0


def test_a_larger_global_batch_after_a_resume_keeps_the_rest_of_the_epoch(shards60, tmp_path, launch_env):
    # 60 samples, batch 4: 6 steps = 24 samples; then accumulation 2 (global batch 8): 4 more steps = 32
    # samples, a 4-sample tail. 56 of 60 trained, each once.
    out = tmp_path / "o"
    assert train(shards60, out, "--batch_size", "4", "--max_steps", "6", "--log_samples") == 0
    assert train(shards60, out, "--batch_size", "4", "--accumulation_steps", "2", "--max_steps", "null",
                 "--log_samples") == 0
    assert max(step_records(out)) == 10
    keys = audited_keys(out)
    assert len(keys) == 56 and set(keys.values()) == {1}
    assert train(shards60, out, "--batch_size", "4", "--accumulation_steps", "2", "--max_steps", "null",
                 "--log_samples") == 0  # the same command again: the epoch is done, nothing more
    assert max(step_records(out)) == 10 and audited_keys(out) == keys


def test_a_new_learning_rate_applies_from_the_first_resumed_step(shards60, tmp_path, launch_env, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "3") == 0
    assert train(shards60, out, "--max_steps", "5", "--learning_rate", str(PEAK / 2)) == 0
    records = step_records(out)
    assert records[4]["lr"] == pytest.approx(PEAK / 2 * lr_factor(3, 0, 5, 0.1))
    assert records[5]["lr"] == pytest.approx(PEAK / 2 * lr_factor(4, 0, 5, 0.1))
    assert "learning_rate changed on resume" in caplog.text


def test_an_eval_set_without_a_usable_sample_is_named_and_logged_as_null_once_per_step(shards60, tmp_path,
                                                                                        launch_env, caplog):
    broken = write_shards(tmp_path / "eval", [6], prefix="e", special={i: {"json": b"{not json"} for i in range(6)})
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "2", "--eval_shards", str(broken), "--train.eval_interval=1") == 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [(r["step"], r["eval_loss"]) for r in evals] == [(1, None), (2, None)]
    assert "no eval sample" in caplog.text and "bad_json" in caplog.text


def test_a_changed_model_shape_or_a_missing_checkpoint_is_named(shards60, tmp_path, launch_env, capsys):
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "2") == 0
    assert train(shards60, out, "--max_steps", "3", "--dim", "128") == 1
    err = capsys.readouterr().err
    assert "model.hidden_size: 64 in step_000000002, 128 now" in err and "--resume never" in err
    assert train(shards60, out, "--max_steps", "3", "--model.projector", "mlp", "--model.vision_cls", "keep") == 1
    err = capsys.readouterr().err
    assert "model.projector: 'linear' in step_000000002, 'mlp' now" in err and "model.vision_cls" in err
    assert train(shards60, out, "--max_steps", "3", "--resume", "latest") == 1
    assert "latest does not exist" in capsys.readouterr().err


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(shards60, tmp_path, launch_env, caplog):
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "4", "--save_interval", "2") == 0
    (optimizer,) = (out / "checkpoints" / "step_000000004").glob("*optim_states.pt")
    optimizer.write_bytes(b"")
    assert train(shards60, out, "--max_steps", "6", "--save_interval", "2") == 0
    assert "step_000000004 is damaged" in caplog.text and "resuming from step_000000002" in caplog.text
    assert sorted(step_records(out)) == [1, 2, 3, 4, 5, 6]


def test_a_fresh_run_refuses_or_moves_aside_an_older_runs_checkpoints(shards60, tmp_path, launch_env, capsys):
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "6", "--save_interval", "2") == 0  # an older, longer run
    assert train(shards60, out, "--max_steps", "4", "--save_interval", "2", "--resume", "never") == 2
    assert "holds checkpoints of an earlier run (newest step_000000006)" in capsys.readouterr().err
    assert train(shards60, out, "--max_steps", "4", "--save_interval", "2", "--resume", "never",
                 "--train.previous_run=move") == 0
    ours = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ours == ["step_000000002", "step_000000004"]
    assert (out / "checkpoints" / "latest").read_text() == "step_000000004"
    (previous,) = out.glob("previous-*")
    assert sorted(p.name for p in (previous / "checkpoints").glob("step_*")) == [
        "step_000000002", "step_000000004", "step_000000006"]
    assert sorted(step_records(out)) == [1, 2, 3, 4]  # the new run's metrics only
    assert train(shards60, out, "--max_steps", "4", "--save_interval", "2") == 0  # a restart resumes the new run
    assert sorted(step_records(out)) == [1, 2, 3, 4]


def test_a_second_run_in_a_live_runs_out_dir_is_refused(shards60, tmp_path, launch_env, capsys, monkeypatch):
    import signal
    import subprocess
    import time

    from tests.launching import REPO, cpu_env
    from vlm.doctor import main as doctor
    from vlm.train.ownership import lock_problem

    out = tmp_path / "o"
    first = subprocess.Popen(
        [sys.executable, "launch/train.py", "--config", "launch/configs/debug.yaml", "--train_shards",
         str(shards60), "--out_dir", str(out), "--epochs", "1000", "--max_steps", "null"],
        cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while lock_problem(out) is None:
            assert first.poll() is None and time.time() < deadline, "the first run never took its lock"
            time.sleep(0.2)
        monkeypatch.setattr("vlm.train.trainer.LOCK_WAIT_S", 1.0)  # not the 30 s a restart waits for a dying run
        assert train(shards60, out, "--max_steps", "2") == 1
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {first.pid}" in err
        assert doctor(["--config", "launch/configs/debug.yaml", "--train_shards", str(shards60), "--out_dir",
                       str(out), "--quick"]) == 1
        assert "in use by another run" in capsys.readouterr().out
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock_problem(out) is None  # the kernel let go of a killed run's lock


def test_a_checkpoint_that_cannot_be_written_stops_with_one_line_and_its_own_exit_code(shards60, tmp_path,
                                                                                      launch_env, capsys):
    import shutil
    import subprocess

    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "2", "--train.keep_checkpoints=1") == 0
    checkpoints = out / "checkpoints"
    used = sum(p.stat().st_size for p in checkpoints.rglob("*") if p.is_file())
    keep = tmp_path / "kept"
    shutil.move(checkpoints, keep)
    checkpoints.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + 256 * 1024}", "tmpfs", str(checkpoints)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk")
    try:
        for item in keep.iterdir():
            shutil.copytree(item, checkpoints / item.name) if item.is_dir() else shutil.copy(item, checkpoints)
        assert train(shards60, out, "--max_steps", "3", "--train.keep_checkpoints=1") == 74  # a full disk
        err = capsys.readouterr().err
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert "Traceback" not in err and "cannot write checkpoint" in line and "step_000000003" in line
        assert "the newest complete checkpoint is" in line and "step_000000002" in line
        assert "MiB free, the last checkpoint took" in line  # found before writing: no rank fails inside DeepSpeed
    finally:
        import gc

        gc.collect()  # a failed torch.save may still hold its file open
        subprocess.run(["umount", "--lazy", str(checkpoints)], capture_output=True)


def nan_loss_at(monkeypatch, micro_batch: int) -> None:
    """Make the loss of the `micro_batch`-th training micro-batch (1-based) NaN, as a diverging batch would."""
    from vlm.model.vlm import MiniMindVLM

    forward, calls = MiniMindVLM.forward, []

    def forward_with_a_nan(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if (kwargs.get("labels") is not None or kwargs.get("loss_index") is not None) and self.training:
            calls.append(1)
            if len(calls) == micro_batch:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MiniMindVLM, "forward", forward_with_a_nan)


def _states(checkpoint: Path) -> tuple[dict, dict, int]:
    """(model weights, optimizer state, schedule position) of a ZeRO-2 checkpoint folder (our own files)."""
    import torch

    model = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    (optim_file,) = checkpoint.glob("*optim_states.pt")
    optim = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    adam = {k: optim[k] for k in ("base_optimizer_state", "single_partition_of_fp32_groups")}  # moments, master
    return model["module"], adam, model["lr_scheduler"]["last_epoch"]


def _same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_nan_micro_batch_changes_nothing_and_its_samples_count_as_skipped(shards60, tmp_path, launch_env,
                                                                            monkeypatch, caplog):
    nan_loss_at(monkeypatch, 5)
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "6", "--save_interval", "1", "--train.keep_checkpoints=10",
                 "--train.weight_decay=0.1", "--log_samples") == 0
    root = out / "checkpoints"
    before, skipped, after = (_states(root / f"step_00000000{s}") for s in (4, 5, 6))
    assert _same(before[0], skipped[0]) and _same(before[1], skipped[1]) and before[2] == skipped[2] == 4
    assert not _same(skipped[0], after[0]) and after[2] == 5  # the next step trains as usual
    records = step_records(out)
    assert records[5]["skipped_steps"] == 1 and records[5]["samples_skipped"] == {"nonfinite_loss": 4}
    assert "step 5 skipped" in caplog.text
    lines = [json.loads(line) for line in (out / "samples" / "rank0.jsonl").read_text().splitlines()]
    assert [line.get("skipped") for line in lines] == [None] * 4 + ["nonfinite_loss"] + [None]


@pytest.mark.parametrize("stage, dtype", [(0, "float32"), (1, "float32"), (3, "float32"), (2, "bfloat16")])
def test_a_nan_micro_batch_changes_no_weight_under_every_zero_stage(shards60, tmp_path, launch_env, monkeypatch,
                                                                    stage, dtype):
    from vlm.load import checkpoint_state_dict

    nan_loss_at(monkeypatch, 3)
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "4", "--save_interval", "1", "--train.keep_checkpoints=10",
                 "--zero_stage", str(stage), "--dtype", dtype, "--accumulation_steps", "2") == 0
    # accumulation 2: micro-batch 3 is in step 2, whose other micro-batch trained too: the whole step is skipped
    weights = [checkpoint_state_dict(out / "checkpoints" / f"step_00000000{s}", stage) for s in (1, 2, 3)]
    assert _same(weights[0], weights[1]) and not _same(weights[1], weights[2])


def test_a_single_process_needs_no_port_even_with_a_stale_one_exported(shards60, tmp_path, launch_env):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        os.environ["MASTER_PORT"] = str(holder.getsockname()[1])  # left over from another job
        assert train(shards60, tmp_path / "o", "--max_steps", "1") == 0


@pytest.mark.parametrize("first, then", [(1, 2), (2, 1)])
def test_a_change_between_zero_1_and_2_resumes(shards60, tmp_path, launch_env, first, then):
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "3", "--zero_stage", str(first), "--log_samples") == 0
    assert train(shards60, out, "--max_steps", "null", "--zero_stage", str(then), "--log_samples") == 0
    keys = audited_keys(out)
    assert len(keys) == 60 and set(keys.values()) == {1}


def _weights(checkpoint: Path) -> dict:
    from vlm.load import checkpoint_state_dict

    meta = json.loads((checkpoint / "meta.json").read_text())
    return {k: v.float() for k, v in checkpoint_state_dict(checkpoint, meta["zero_stage"]).items()}


@pytest.mark.parametrize("first, then, dtype", [(0, 3, "float32"), (3, 0, "float32"), (2, 3, "float32"),
                                                (3, 1, "float32"), (0, 2, "bfloat16"), (2, 0, "bfloat16")])
def test_a_zero_stage_change_continues_the_same_training(shards60, tmp_path, launch_env, first, then, dtype):
    """Resumed at step 2 under another ZeRO stage, step 4 has the weights of the run that never changed: master
    weights, Adam moments and step count, schedule and data position all carried over."""
    import torch

    straight, changed = tmp_path / "straight", tmp_path / "changed"
    common = ("--max_steps", "4", "--save_interval", "2", "--dtype", dtype, "--train.weight_decay=0.1")
    assert train(shards60, straight, *common, "--zero_stage", str(first)) == 0
    assert train(shards60, changed, *common, "--zero_stage", str(then), "--resume",
                 str(straight / "checkpoints" / "step_000000002")) == 0
    want, got = (_weights(out / "checkpoints" / "step_000000004") for out in (straight, changed))
    assert want.keys() == got.keys()
    # fp32: equal to rounding (1.2e-7 measured); bf16: within one bf16 step (2^-7 relative; 4.9e-4 measured on
    # weights near 0.1, 7.8e-3 on layer-norm weights near 1)
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == "float32" else {"atol": 1e-3, "rtol": 2**-7}
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tolerance, msg=name)
    # Steps 3 and 4 moved the weights by much more than the tolerance: the comparison can fail.
    moved = max((want[n] - _weights(straight / "checkpoints" / "step_000000002")[n]).abs().max() for n in want)
    assert moved > 3 * tolerance["atol"]


def test_resume_refuses_other_data(shards60, tmp_path, launch_env, capsys):
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "2") == 0
    assert train(shards60, out, "--max_steps", "3", "--seed", "7") == 1
    assert "seed" in capsys.readouterr().err
    other = write_shards(tmp_path / "other", [30, 30], images_of=lambda i: 1)
    assert train(other, out, "--max_steps", "3") == 1
    assert "data.train_shards" in capsys.readouterr().err


def test_a_read_only_checkpoints_folder_stops_with_one_line_and_exit_74(shards60, tmp_path, launch_env, capsys):
    import subprocess

    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "1") == 0
    checkpoints = out / "checkpoints"
    # Root ignores permission bits; the immutable attribute holds even for root.
    if subprocess.run(["chattr", "+i", str(checkpoints)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        assert train(shards60, out, "--max_steps", "2") == 74
    finally:
        subprocess.run(["chattr", "-i", str(checkpoints)], capture_output=True)
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and "cannot write checkpoint" in line and "step_000000002" in line
    assert "the newest complete checkpoint is" in line and "step_000000001" in line


def test_resuming_at_an_epoch_end_does_not_rewrite_that_checkpoint(shards60, tmp_path, launch_env):
    out = tmp_path / "o"
    assert train(shards60, out, "--train.epochs=1", "--max_steps", "null") == 0  # 15 steps, the epoch's end
    meta = out / "checkpoints" / "step_000000015" / "meta.json"
    written = json.loads(meta.read_text())["saved_at"]
    assert train(shards60, out, "--train.epochs=1", "--max_steps", "null") == 0
    assert json.loads(meta.read_text())["saved_at"] == written


def test_a_resume_from_an_older_checkpoint_sets_the_newer_timeline_aside(shards60, tmp_path, launch_env):
    out = tmp_path / "o"
    root = out / "checkpoints"
    assert train(shards60, out, "--max_steps", "6", "--save_interval", "2") == 0
    assert train(shards60, out, "--max_steps", "4", "--save_interval", "2", "--resume",
                 str(root / "step_000000002")) == 0
    assert sorted(p.name for p in root.glob("step_*") if "." not in p.name) == [
        "step_000000002", "step_000000004"]
    assert sorted(p.name.split(".")[0] for p in root.glob("step_*.abandoned-*")) == [
        "step_000000004", "step_000000006"]
    assert (root / "latest").read_text() == "step_000000004"
    assert train(shards60, out, "--max_steps", "4", "--save_interval", "2") == 0  # auto: the new step 4, done


@pytest.mark.parametrize("stage", [2, 3])
def test_the_frozen_vision_tower_computes_in_the_engines_precision(shards60, tmp_path, launch_env, monkeypatch,
                                                                   tiny_vision_dir, stage):
    """Through the real engine: under bf16 every parameter the forward uses, the frozen tower's included, is
    bf16, and so are the image features."""
    import torch

    from vlm.train.trainer import Trainer

    seen = {}

    def inspect(trainer):
        model = trainer.engine.module
        encoder = model.get_vision_encoder()
        seen["trainable"] = model.vision_trainable
        seen["dtypes"] = {p.dtype for p in model.parameters()} | {p.dtype for p in encoder.parameters()}
        size = encoder.config.image_size
        with torch.no_grad():
            seen["features"] = model.image_features(torch.zeros(1, 3, size, size)).dtype
        return 0

    monkeypatch.setattr(Trainer, "fit", inspect)
    assert train(shards60, tmp_path / "o", "--max_steps", "1", "--dtype", "bfloat16", "--zero_stage", str(stage),
                 "--model.vision_trainable=false",
                 "--model.vision_model", str(tiny_vision_dir)) == 0
    assert seen == {"trainable": False, "dtypes": {torch.bfloat16}, "features": torch.bfloat16}


def test_train_compile_compiles_the_blocks_and_trains_the_same(shards60, tmp_path, launch_env, monkeypatch):
    """`--train.compile` (torch.compile per decoder block, on the CPU here): the same losses as eager."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    from vlm.train.trainer import Trainer

    fit, compiled = Trainer.fit, []

    def fit_and_look(trainer):
        code = fit(trainer)
        compiled.extend(getattr(b, "_compiled_call_impl", None) is not None for b in trainer.engine.module.model.layers)
        return code

    from torch._dynamo.utils import counters

    monkeypatch.setattr(Trainer, "fit", fit_and_look)
    assert train(shards60, tmp_path / "eager", "--max_steps", "3", "--dtype", "float32") == 0
    counters.clear()
    assert train(shards60, tmp_path / "compiled", "--max_steps", "3", "--dtype", "float32", "--train.compile") == 0
    assert compiled == [False, False, True, True]  # two blocks, eager then compiled
    assert not counters["graph_break"], dict(counters["graph_break"])  # each block is one graph (dynamic T too)
    eager, fast = (step_records(tmp_path / name) for name in ("eager", "compiled"))
    for step in (1, 2, 3):
        assert fast[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-4)


def test_a_time_based_checkpoint_cadence_and_the_checkpoint_share_is_logged(shards60, tmp_path, launch_env):
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "4", "--save_interval", "1000", "--train.keep_checkpoints=10",
                 "--train.save_interval_minutes", "0.0001") == 0  # 6 ms: due after every step
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [f"step_00000000{s}" for s in (1, 2, 3, 4)]
    records = step_records(out)
    assert records[1]["checkpoint_s"] == 0.0  # logged before its own checkpoint; that one counts in step 2's line
    assert all(records[s]["checkpoint_s"] > 0 and 0 < records[s]["checkpoint_share"] < 1 for s in (2, 3, 4))
    plain = tmp_path / "plain"
    assert train(shards60, plain, "--max_steps", "4", "--save_interval", "1000", "--train.keep_checkpoints=10") == 0
    assert sorted(p.name for p in (plain / "checkpoints").glob("step_*")) == ["step_000000004"]


@pytest.mark.parametrize("stage", [0, 2])
def test_a_change_of_precision_resumes(shards60, tmp_path, launch_env, stage):
    """fp32 -> bf16 changes the optimizer wrapper (master weights appear): the checkpoint goes through the
    universal folder instead of a direct load that would not fit it."""
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "2", "--zero_stage", str(stage), "--dtype", "float32",
                 "--log_samples") == 0
    assert train(shards60, out, "--max_steps", "null", "--zero_stage", str(stage), "--dtype", "bfloat16",
                 "--log_samples", "--train.epochs=1") == 0
    keys = audited_keys(out)
    assert len(keys) == 60 and set(keys.values()) == {1}
    assert (out / "universal" / "step_000000002").is_dir()


def test_a_skipped_step_leaves_no_nan_in_deepspeeds_kept_gradient_buffers(shards60, tmp_path, launch_env,
                                                                         monkeypatch):
    """ZeRO-3 keeps its flat gradient partitions from step to step: after a skipped NaN step they hold no NaN,
    and DeepSpeed skips no later step of its own."""
    import torch

    from vlm.train import stepping, trainer

    nan_loss_at(monkeypatch, 3)
    seen = []

    def step_and_look(engine, skip=False):
        stepping.step_engine(engine, skip)
        flat = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
        if skip and flat is not None:
            seen.append(bool(torch.isfinite(flat).all()))

    monkeypatch.setattr(trainer, "step_engine", step_and_look)
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "4", "--zero_stage", "3", "--dtype", "float32",
                 "--accumulation_steps", "2") == 0
    assert seen == [True]
    assert step_records(out)[4]["skipped_steps"] == 1  # the NaN step only


@pytest.mark.parametrize("stage, then", [(2, 2), (2, 3)])
def test_a_new_weight_decay_and_betas_apply_after_a_resume(shards60, tmp_path, launch_env, monkeypatch, stage, then):
    """The checkpoint's optimizer settings do not come back over this run's (direct and universal loads)."""
    from vlm.train.trainer import Trainer

    seen = {}

    def look(trainer):
        group = trainer.engine.optimizer.param_groups[0]
        seen.update(betas=tuple(group["betas"]), weight_decay=group["weight_decay"],
                    clip=getattr(trainer.engine.optimizer, "clip_grad", None))
        return 0

    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "2", "--zero_stage", str(stage), "--train.weight_decay=0.01") == 0
    monkeypatch.setattr(Trainer, "fit", look)
    assert train(shards60, out, "--max_steps", "4", "--zero_stage", str(then), "--train.weight_decay=0.2",
                 "--train.betas", "0.8,0.95", "--grad_clip", "0.5") == 0
    assert seen["betas"] == (0.8, 0.95) and seen["weight_decay"] == 0.2 and seen["clip"] in (0.5, None)


def test_the_background_checkpoint_writer_saves_what_the_step_had_and_publishes_it_a_step_later(
        shards60, tmp_path, launch_env, monkeypatch):
    """train.async_checkpoint (DeepSpeed's decoupled writer, ZeRO-3): the training goes on while the files are
    written, yet they hold exactly the saved step's state (a synchronous run's files), the checkpoint becomes
    complete (meta.json) only at the next optimizer step or the run's end, and it resumes like any other."""
    import torch

    from vlm.train.trainer import Trainer

    save, published_on_return = Trainer.save, []

    def save_and_look(trainer, data_state, wait=False):
        save(trainer, data_state, wait)
        published_on_return.append((trainer.step, (trainer.out_dir / "checkpoints" / f"step_{trainer.step:09d}" /
                                                   "meta.json").is_file()))

    monkeypatch.setattr(Trainer, "save", save_and_look)
    common = ("--max_steps", "4", "--save_interval", "2", "--zero_stage", "3", "--dtype", "float32")
    background, plain, resumed = tmp_path / "background", tmp_path / "plain", tmp_path / "resumed"
    assert train(shards60, background, *common, "--train.async_checkpoint") == 0
    assert published_on_return == [(2, False), (4, False)]  # step 2 at step 3, step 4 at the run's end
    assert train(shards60, plain, *common) == 0
    assert published_on_return[2:] == [(2, True), (4, True)]

    def states(checkpoint: Path) -> tuple:
        """(schedule, ZeRO-3 optimizer state: fp32 master partitions, Adam moments and step count)."""
        model = torch.load(next(checkpoint.glob("*model_states.pt")), map_location="cpu", weights_only=False)
        optim = torch.load(next(checkpoint.glob("*optim_states.pt")), map_location="cpu", weights_only=False)
        optim = optim["optimizer_state_dict"]
        assert optim["fp32_flat_groups"][0].numel() > 1000  # the master weights themselves
        return model["lr_scheduler"], optim["fp32_flat_groups"], optim["optimizer_state_dict"]

    for step in ("step_000000002", "step_000000004"):
        got, want = (states(out / "checkpoints" / step) for out in (background, plain))
        assert _same(got, want), step
        assert json.loads((background / "checkpoints" / step / "meta.json").read_text())["files"]
    assert train(shards60, resumed, *common, "--train.async_checkpoint", "--resume",
                 str(background / "checkpoints" / "step_000000002")) == 0
    assert _same(states(resumed / "checkpoints" / "step_000000004"),
                 states(plain / "checkpoints" / "step_000000004"))


def test_the_background_checkpoint_writer_outside_zero_3_is_refused_with_what_to_change(shards60, tmp_path,
                                                                                      launch_env, capsys):
    assert train(shards60, tmp_path / "o", "--train.async_checkpoint", "--zero_stage", "2") != 0
    err = capsys.readouterr().err
    assert "train.async_checkpoint needs train.zero_stage 3" in err and "Traceback" not in err


def test_a_rank_killed_with_sigkill_leaves_no_checkpoint_writer_behind(shards60, tmp_path):
    """DeepSpeed's background writer blocks on a queue it holds open itself; it dies with its rank."""
    import signal
    import subprocess
    import time

    import psutil

    from tests.launching import REPO, cpu_env

    trainer = subprocess.Popen(
        [sys.executable, "launch/train.py", "--config", "launch/configs/debug.yaml", "--train_shards", str(shards60),
         "--out_dir", str(tmp_path / "o"), "--epochs", "1000", "--max_steps", "null", "--zero_stage", "3",
         "--train.async_checkpoint", "--save_interval", "1"],
        cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, writers = time.time() + 120, []
        while not writers or not list((tmp_path / "o").glob("checkpoints/step_*/meta.json")):
            assert trainer.poll() is None and time.time() < deadline, "no checkpoint was written in background"
            writers = [p for p in psutil.Process(trainer.pid).children() if "multiprocessing" in " ".join(p.cmdline())]
            time.sleep(0.2)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    gone, alive = psutil.wait_procs(writers, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


@pytest.mark.parametrize("projector, shuffle, tokens", [("linear", 1, 16), ("mlp", 2, 4)])
def test_a_siglip_tower_trains_through_the_real_trainer(shards60, tmp_path, launch_env, tiny_siglip_dir, projector,
                                                        shuffle, tokens):
    """A frozen SigLIP tower (16 image tokens, no CLS) with its own preprocessing, with MiniMind-V HEAD's MLP
    projector after a 2 x 2 pixel shuffle too: the projector and the language model learn from its features,
    and the export carries the tower, its preprocessor config and the image-token count."""
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "4", "--model.vision_model", str(tiny_siglip_dir),
                 "--model.vision_trainable=false", "--train.trainable", "projector+lm", "--model.projector",
                 projector, "--model.pixel_shuffle", str(shuffle)) == 0
    losses = [r["loss"] for r in step_records(out).values()]
    assert len(losses) == 4 and all(isinstance(x, float) for x in losses) and losses[-1] < losses[0]
    exported = json.loads((out / "export" / "vision_model" / "config.json").read_text())
    assert exported["model_type"] == "siglip_vision_model"
    assert json.loads((out / "export" / "config.json").read_text())["image_token_len"] == tokens
    assert "Siglip" in json.loads((out / "export" / "vision_model" / "preprocessor_config.json").read_text())[
        "image_processor_type"]


@pytest.mark.parametrize("flags, message", [
    (("--model.vision_feature_layer", "5"), "model.vision_feature_layer 5 is not a layer of the vision tower"),
    (("--model.pixel_shuffle", "3"), "model.pixel_shuffle: pixel shuffle by 3 needs a square grid"),
    (("--model.pixel_shuffle", "2", "--model.vision_cls", "keep"), "keep model.vision_cls: drop"),
])
def test_vision_settings_the_tower_does_not_fit_stop_with_one_line(shards60, tmp_path, launch_env, capsys,
                                                                   tiny_vision_dir, flags, message):
    """The tiny CLIP tower (1 layer, a 4 x 4 patch grid, a CLS): what does not fit is named before anything runs."""
    assert train(shards60, tmp_path / "o", "--max_steps", "1", "--model.vision_model", str(tiny_vision_dir),
                 *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_background_writer_that_dies_stops_the_run_with_one_line_and_exit_74(shards60, tmp_path, launch_env,
                                                                                capsys, monkeypatch):
    """The writer is killed right after it was handed step 2's files: the checkpoint is never published, the
    run stops at the next step with the checkpoint-write exit code, naming the cause; nothing hangs."""
    import vlm.train.trainer as trainer_module

    start = trainer_module.start_checkpoint

    def start_then_kill_the_writer(engine, *args, **kwargs):
        pending = start(engine, *args, **kwargs)
        engine.checkpoint_engine.ckpt_process.kill()
        engine.checkpoint_engine.ckpt_process.join()
        return pending

    monkeypatch.setattr(trainer_module, "start_checkpoint", start_then_kill_the_writer)
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "4", "--save_interval", "2", "--zero_stage", "3",
                 "--train.async_checkpoint") == 74
    err = capsys.readouterr().err
    assert "background checkpoint writer process" in err and "Traceback" not in err
    assert not list(out.glob("checkpoints/step_*/meta.json"))  # step 2 was never declared complete


def test_another_transformers_tower_trains_and_its_export_chats(shards60, tmp_path, launch_env):
    """A ViT tower (neither CLIP nor SigLIP) with its own processor: trains, exports, and answers."""
    import torch
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    from tests.tiny_vlm import picture
    from vlm.inference import GenerationSettings, load_model

    vit = tmp_path / "vit"
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2)).save_pretrained(vit)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(vit)
    out = tmp_path / "o"
    assert train(shards60, out, "--max_steps", "2", "--model.vision_model", str(vit),
                 "--model.vision_trainable=false", "--train.trainable", "projector+lm") == 0
    assert json.loads((out / "export" / "config.json").read_text())["image_token_len"] == 16  # 4 x 4, CLS dropped
    loaded = load_model(out / "export")
    assert type(loaded.model.get_vision_encoder()).__name__ == "ViTModel"
    reply = loaded.generate([{"role": "user", "content": "<image>\nWhat is it?"}], [picture((200, 30, 30))],
                            GenerationSettings(max_new_tokens=3))
    assert isinstance(reply, str)

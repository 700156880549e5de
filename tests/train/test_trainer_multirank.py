"""The trainer through the real `deepspeed` launcher on two CPU ranks (gloo)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.launching import BIN, REPO, cpu_env, deepspeed_cmd, free_port, run, tail

pytestmark = pytest.mark.slow


def base_args(shards, out_dir, *extra):
    return ["--config", "launch/configs/debug.yaml", "--train_shards", str(shards), "--out_dir", str(out_dir),
            "--log_interval", "1", "--save_interval", "1000", *extra]


def losses(out_dir):
    by_step = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_step[record["step"]] = record["loss"]  # the last record of a step wins (resumed runs append)
    return by_step


@pytest.fixture(scope="module")
def zero_runs(synth_shards, tmp_path_factory):
    """The same 10 steps under ZeRO 0, 1, 2 and 3, in one launcher invocation: {stage: out_dir}."""
    root = tmp_path_factory.mktemp("zero")
    outs = {stage: root / f"zero{stage}" for stage in (0, 1, 2, 3)}
    runs = [base_args(synth_shards["pretrain"], outs[s], "--zero_stage", str(s)) for s in outs]
    (root / "runs.json").write_text(json.dumps(runs))
    result = run(deepspeed_cmd("tests/train/multi_run.py", [str(root / "runs.json")]), timeout=600)
    assert result.returncode == 0, tail(result)
    return outs


def test_zero_stages_give_the_same_losses(zero_runs):
    reference = losses(zero_runs[0])
    assert sorted(reference) == list(range(1, 11))
    assert reference[10] < reference[1]  # it learns
    for stage in (1, 2, 3):
        other = losses(zero_runs[stage])
        for step, loss in reference.items():
            assert abs(other[step] - loss) <= 1e-4 * abs(loss), (stage, step, other[step], loss)


def test_a_run_writes_checkpoint_metrics_plot_and_export(zero_runs):
    out = zero_runs[2]
    meta = json.loads((out / "checkpoints" / "step_000000010" / "meta.json").read_text())
    assert meta["step"] == 10 and meta["world_size"] == 2 and meta["config"]["train"]["zero_stage"] == 2
    assert (out / "checkpoints" / "latest").read_text() == "step_000000010"
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"} <= set(record)
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "export" / "model.safetensors").is_file() and (out / "export" / "vision_model").is_dir()


def _rank_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(launcher.pid).children(recursive=True)
    return [p for p in children if any("train.py" in part for part in p.cmdline())]


def _wait_for(predicate, timeout, proc):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_sigkill_mid_run_then_resume_reproduces_losses(synth_shards, tmp_path):
    """Uninterrupted vs killed with SIGKILL after a checkpoint, then resumed with --resume auto."""
    steps = ["--max_steps", "30", "--epochs", "2", "--data.num_workers", "1"]
    reference = tmp_path / "reference"
    result = run(deepspeed_cmd("launch/train.py", base_args(synth_shards["pretrain"], reference, *steps)))
    assert result.returncode == 0, tail(result)
    killed = tmp_path / "killed"
    args = base_args(synth_shards["pretrain"], killed, *steps, "--save_interval", "4")
    proc = subprocess.Popen(deepspeed_cmd("launch/train.py", args), cwd=REPO, env=cpu_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = killed / "checkpoints" / "step_000000008" / "meta.json"
    reached = _wait_for(marker.is_file, 240, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert reached, "the run ended before the kill"
    assert max(losses(killed)) < 30, "the kill came too late to interrupt the run"
    result = run(deepspeed_cmd("launch/train.py", args))
    assert result.returncode == 0, tail(result)
    assert "resume from" in result.stdout + result.stderr
    resumed, expected = losses(killed), losses(reference)
    assert sorted(resumed) == sorted(expected) == list(range(1, 31))
    assert [resumed[s] for s in range(9, 31)] == [expected[s] for s in range(9, 31)]


def test_sigterm_checkpoints_exits_75_and_resumes_on_one_rank(synth_shards, tmp_path):
    """SIGTERM to one rank: both agree, checkpoint and exit 75; the ZeRO-3 checkpoint then resumes on 1 rank
    (universal conversion) and every sample of the epoch is trained exactly once across the two runs."""
    out = tmp_path / "run"
    args = base_args(synth_shards["pretrain"], out, "--zero_stage", "3", "--max_steps", "1000", "--log_samples",
                     "--train.epochs=1", "--data.num_workers", "1")
    proc = subprocess.Popen(deepspeed_cmd("launch/train.py", args), cwd=REPO, env=cpu_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert _wait_for(lambda: (out / "metrics.jsonl").is_file() and max(losses(out), default=0) >= 3, 240, proc)
    rank1 = [p for p in _rank_processes(proc) if "--local_rank=1" in " ".join(p.cmdline())]
    rank1[0].send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 75, output[-3000:]
    meta = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / "meta.json").read_text())
    stopped_at = meta["step"]
    assert 3 <= stopped_at < 24  # 24 = one epoch of 192 samples at 2 ranks x 4
    result = run([str(BIN / "python"), "launch/train.py", *args])
    assert result.returncode == 0, tail(result)
    keys = []
    for path in sorted((out / "samples").glob("rank*.jsonl")):
        keys += [k for line in path.read_text().splitlines() for k in json.loads(line)["keys"]]
    assert len(keys) == len(set(keys)), "a sample was trained twice"
    assert len(keys) >= 192 - 8  # everything but a tail smaller than one global batch


@pytest.mark.parametrize("stage", [2, 3])
def test_exported_weights_reload_with_the_same_logits(zero_runs, tmp_path, stage):
    import torch

    from vlm.export import main as export_main
    from vlm.model.config import VLMConfig
    from vlm.model.vision_encoder import load_vision_encoder
    from vlm.model.vlm import MiniMindVLM
    from vlm.model.weights import load_minimind_weights

    out = zero_runs[stage]
    assert export_main(["--checkpoint", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert export_main(["--checkpoint", str(out), "--format", "minimind", "--out", str(tmp_path / "m.pth")]) == 0
    live = MiniMindVLM.from_pretrained(out / "export").eval()  # written by the trainer at the end
    exported = MiniMindVLM.from_pretrained(tmp_path / "hf").eval()
    minimind = MiniMindVLM(VLMConfig.from_pretrained(tmp_path / "hf"),
                           load_vision_encoder(tmp_path / "hf" / "vision_model")).eval()
    load_minimind_weights(minimind, tmp_path / "m.pth")
    cfg = live.config
    ids = torch.tensor([[1] + [cfg.image_token_id] * cfg.image_token_len + [40, 41, 42, 2]])
    pixels = torch.randn(1, 1, 3, 64, 64)
    with torch.no_grad():
        reference = live(input_ids=ids, pixel_values=pixels).logits
        assert torch.allclose(exported(input_ids=ids, pixel_values=pixels).logits, reference, atol=1e-5)
        assert torch.allclose(minimind(input_ids=ids, pixel_values=pixels).logits, reference, atol=2e-2)


def test_one_rank_with_accumulation_2_matches_two_ranks(zero_runs, synth_shards, tmp_path):
    """The plan deals global batches independently of the world size, so both see the same global batches."""
    out = tmp_path / "acc2"
    args = base_args(synth_shards["pretrain"], out, "--zero_stage", "2", "--accumulation_steps", "2")
    result = run([str(BIN / "python"), "launch/train.py", *args])
    assert result.returncode == 0, tail(result)
    two_ranks, one_rank = losses(zero_runs[2]), losses(out)
    assert sorted(one_rank) == sorted(two_ranks)
    for step, loss in two_ranks.items():
        assert abs(one_rank[step] - loss) <= 1e-4 * abs(loss), (step, one_rank[step], loss)


def test_repeated_nan_losses_stop_the_run_with_a_clear_message(synth_shards, tmp_path):
    args = base_args(synth_shards["pretrain"], tmp_path / "nan", "--learning_rate", "1e12", "--grad_clip", "0",
                     "--max_steps", "40")
    result = run([str(BIN / "python"), "launch/train.py", *args])
    assert result.returncode == 1
    assert "optimizer steps in a row had a NaN/Inf loss (train.max_bad_steps=5)" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["skipped_nonfinite"] for r in records)
    assert all(r["loss"] is None or r["loss"] == r["loss"] for r in records)  # no NaN written


def test_a_busy_rendezvous_port_is_one_line_naming_it(synth_shards, tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "launch/train.py",
               *base_args(synth_shards["pretrain"], tmp_path / "busy")]
        result = run(cmd, timeout=300)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"the rendezvous port 127.0.0.1:{port} is in use" in output and "--master_port" in output
    assert "DistNetworkError" not in output


def _audited(out: Path) -> list[str]:
    return [k for path in sorted((out / "samples").glob("rank*.jsonl"))
            for line in path.read_text().splitlines() for k in json.loads(line)["keys"]]


@pytest.mark.parametrize("before, after", [((0, 2), (0, 1)), ((1, 2), (1, 1)), ((2, 2), (2, 1)), ((0, 1), (0, 2)),
                                           ((1, 1), (1, 2)), ((2, 1), (2, 2)), ((3, 1), (3, 2)),
                                           ((2, 2), (3, 1)), ((3, 1), (0, 2))],
                         ids=lambda layout: f"zero{layout[0]}x{layout[1]}")  # ZeRO-3 2 -> 1: test_sigterm_..._on_one_rank
def test_every_zero_stage_resumes_on_another_number_of_ranks(synth_shards, tmp_path, before, after):
    """192 samples, batch 4: a run on some ranks under some ZeRO stage stops after 3 steps, the same command on
    another number of ranks (and maybe another stage) finishes the epoch; every sample of it is trained once
    (a tail under one global batch aside)."""
    out = tmp_path / "run"
    args = base_args(synth_shards["pretrain"], out, "--log_samples", "--train.epochs=1")

    def launch(layout: tuple[int, int], *extra: str):
        stage, ranks = layout
        extra = ("--zero_stage", str(stage), *extra)
        cmd = (deepspeed_cmd("launch/train.py", [*args, *extra], nproc=ranks) if ranks > 1
               else [str(BIN / "python"), "launch/train.py", *args, *extra])
        result = run(cmd, timeout=400)
        assert result.returncode == 0, tail(result)
        return result

    launch(before, "--max_steps", "3")
    launch(after, "--max_steps", "null")
    keys = _audited(out)
    assert len(keys) == len(set(keys)), "a sample was trained twice"
    assert len(keys) >= 192 - 8


def test_sigterm_to_the_deepspeed_launcher_checkpoints_and_leaves_nothing_running(synth_shards, tmp_path):
    """The launcher dies of SIGTERM without telling its ranks; they notice, checkpoint and exit 75."""
    out = tmp_path / "run"
    args = base_args(synth_shards["pretrain"], out, "--max_steps", "1000", "--train.epochs=50")
    proc = subprocess.Popen(deepspeed_cmd("launch/train.py", args), cwd=REPO, env=cpu_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert _wait_for(lambda: (out / "metrics.jsonl").is_file() and max(losses(out), default=0) >= 3, 240, proc)
        everything = psutil.Process(proc.pid).children(recursive=True)
        assert len([p for p in everything if "--local_rank=1" in " ".join(p.cmdline())]) == 1
        proc.send_signal(signal.SIGTERM)  # to the `deepspeed` command only
        output, _ = proc.communicate(timeout=240)  # returns once the ranks closed the shared output
        _, alive = psutil.wait_procs(everything, timeout=120)
        assert not alive, f"still running: {[p.cmdline() for p in alive]}"
        assert "stop signal received: checkpointed at step" in output, output[-3000:]
        meta = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / "meta.json")
                          .read_text())
        assert meta["step"] >= 3
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_torchrun_with_one_process_keeps_its_rendezvous_port(synth_shards, tmp_path):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "1", "--master_port", str(free_port()), "launch/train.py",
           *base_args(synth_shards["pretrain"], tmp_path / "one", "--max_steps", "1")]
    result = run(cmd, timeout=300)
    assert result.returncode == 0, tail(result)

"""launch/slurm/*.sbatch on a real local SLURM cluster (tests/slurm/cluster.py): CPU ranks on one and two nodes,
the pre-timeout signal -> checkpoint -> requeue -> resume cycle, preemption, scancel, and the sharding job array."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launching import REPO, cpu_env

pytestmark = pytest.mark.slow

STEPS = 24  # one epoch of the 192-sample corpus at 2 ranks x batch 4


def job_env(slurm) -> dict[str, str]:
    """The submitting shell's environment; the batch script must find the CPU mode by itself."""
    env = slurm.env(cpu_env(VLM_GPUS_PER_NODE="0", VLM_PYTHON=sys.executable))
    env.pop("DS_ACCELERATOR")
    return env


def slurm_cmd(slurm, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=REPO, env=job_env(slurm), capture_output=True, text=True, timeout=timeout)


def sbatch(slurm, options: list[str], script: str, args: list[str], log_dir: Path, timeout: float = 240):
    """Submit from the repository root (the scripts find it through SLURM_SUBMIT_DIR)."""
    cmd = ["sbatch", "--time=10", f"--output={log_dir}/%x-%j.out", *options, script, *args]
    return slurm_cmd(slurm, *cmd, timeout=timeout)


def train_args(shards, out_dir, *extra) -> list[str]:
    return ["launch/configs/debug.yaml", "--train_shards", str(shards), "--out_dir", str(out_dir),
            "--max_steps", str(STEPS), "--save_interval", "1000", *extra]


def logs(log_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("*.out")))


def final_loss(out_dir: Path) -> tuple[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    return last["step"], last["loss"]


def checkpoint_meta(out_dir: Path) -> dict:
    latest = (out_dir / "checkpoints" / "latest").read_text()
    return json.loads((out_dir / "checkpoints" / latest / "meta.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(slurm, synth_shards, tmp_path_factory):
    """`sbatch --wait --ntasks=2 train.sbatch debug.yaml ...`: two CPU ranks on one node, run to the end."""
    root = tmp_path_factory.mktemp("slurm_one_node")
    result = sbatch(slurm, ["--wait", "--ntasks=2"], "launch/slurm/train.sbatch",
                    train_args(synth_shards["pretrain"], root / "out"), root)
    assert result.returncode == 0, f"{result.stderr}\n{logs(root)[-4000:]}\n{slurm.logs()}"
    return root


def test_two_tasks_on_one_node_train_and_checkpoint(uninterrupted):
    meta = checkpoint_meta(uninterrupted / "out")
    assert meta["step"] == STEPS and meta["world_size"] == 2
    text = logs(uninterrupted)
    assert "1 node(s), CPU ranks (2 in all)" in text and "trainer exited with code 0" in text


def test_two_nodes_train_to_the_same_loss(slurm, synth_shards, uninterrupted, tmp_path):
    result = sbatch(slurm, ["--wait", "--nodes=2", "--ntasks-per-node=1"], "launch/slurm/train.sbatch",
                    train_args(synth_shards["pretrain"], tmp_path / "out"), tmp_path)
    assert result.returncode == 0, f"{result.stderr}\n{logs(tmp_path)[-4000:]}\n{slurm.logs()}"
    assert "on localhost,localhost-2: 2 node(s)" in logs(tmp_path)
    assert checkpoint_meta(tmp_path / "out")["world_size"] == 2
    assert final_loss(tmp_path / "out") == final_loss(uninterrupted / "out")


def test_srun_is_given_the_jobs_cpus_per_task(slurm, tmp_path):
    """srun (Slurm >= 22.05) does not inherit the job's --cpus-per-task: the script passes it on, caps it when it
    starts more tasks than the job asked for, and leaves it to VLM_SRUN_ARGS when that names one. A stand-in
    for python reports the CPUs of its step; `--exact` makes the step hold only the CPUs srun asked for (on
    this cluster, without task binding, that is where a missing --cpus-per-task shows)."""
    python = tmp_path / "python"
    python.write_text('#!/bin/bash\necho "task $SLURM_PROCID: step$(scontrol show step '
                      '"$SLURM_JOB_ID.$SLURM_STEP_ID" | grep -o " CPUs=[0-9]*")"\n')
    python.chmod(0o755)
    cases = [("given", {}, "CPUs=2", 1), ("capped", {"VLM_GPUS_PER_NODE": "2"}, "CPUs=2", 2),
             ("override", {"VLM_SRUN_ARGS": "--exact --cpus-per-task=1"}, "CPUs=1", 1)]
    for name, knobs, cpus, tasks in cases:
        env = {**job_env(slurm), "VLM_PYTHON": str(python), "VLM_SRUN_ARGS": "--exact", **knobs}
        # --signal: the script's own lead (300 s) exceeds this 2-minute limit, so USR1 could come at once.
        result = subprocess.run(["sbatch", "--wait", "--time=2", "--signal=B:USR1@10", f"--output={tmp_path}/{name}-%j.out",
                                 "--ntasks=1", "--cpus-per-task=2", "launch/slurm/train.sbatch", "unused.yaml"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        text = "".join(p.read_text() for p in tmp_path.glob(f"{name}-*.out"))
        assert result.returncode == 0, f"{name}: {result.stderr}\n{text}"
        assert text.count(f"step {cpus}") == tasks, f"{name}: {text}"


FINISHED = {"", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def job_state(slurm, job: str) -> str:
    """squeue's state of the job, '' once it has left the queue, 'UNKNOWN' when squeue did not answer."""
    result = slurm_cmd(slurm, "squeue", "-h", "-j", job, "-o", "%T")
    if result.returncode == 0:
        return result.stdout.strip()
    return "" if "Invalid job id" in result.stderr else "UNKNOWN"


def nodes_idle(slurm) -> bool:
    """Every node idle: the previous run of a requeued job has finished cleaning up on all of them."""
    result = slurm_cmd(slurm, "sinfo", "-h", "-N", "-o", "%N %t")
    states = {line.split()[1] for line in result.stdout.splitlines()}
    return result.returncode == 0 and states == {"idle"}


def wait_for(predicate, timeout: float, what: str, log_dir: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs(log_dir)[-4000:]}")
        time.sleep(0.2)


def submit_training(slurm, options: list[str], shards, out: Path, log_dir: Path) -> str:
    """Submit a training job and return its id once it has run two steps (so a signal finds it training)."""
    result = sbatch(slurm, ["--parsable", *options], "launch/slurm/train.sbatch",
                    train_args(shards, out, "--data.num_workers", "1"), log_dir)
    assert result.returncode == 0, result.stderr
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 180, "step 2", log_dir)
    return result.stdout.strip().split(";")[0]


def release_requeued_and_wait(slurm, job: str, log_dir: Path) -> str:
    """Start a requeued job now instead of after SLURM's ~2 minute hold; return the job's log when it ends."""
    # Only once its previous run is cleaned up, and a few seconds later: a restart in the same second as the
    # requeue was seen killed by slurmctld ("Killing non-startable batch JobId=N: Job credential revoked").
    wait_for(lambda: job_state(slurm, job) == "PENDING" and nodes_idle(slurm), 120, "the requeue", log_dir)
    time.sleep(3)
    assert slurm_cmd(slurm, "scontrol", "update", f"jobid={job}", "StartTime=now").returncode == 0
    wait_for(lambda: job_state(slurm, job) in FINISHED, 240, "the requeued job to finish", log_dir)
    return logs(log_dir)


def assert_resumed_to_the_same_end(text: str, out: Path, reference: Path) -> None:
    assert "(restart 1)" in text and text.rstrip().endswith("trainer exited with code 0"), text[-4000:]
    resumed_from = Path(text.split('"resume from": "')[-1].split('"')[0])
    assert resumed_from.parent == out / "checkpoints", text[-4000:]
    assert 2 <= int(resumed_from.name.removeprefix("step_")) < STEPS
    assert final_loss(out) == final_loss(reference)


def test_pre_timeout_signal_checkpoints_requeues_and_resumes_to_the_same_loss(
        slurm, synth_shards, uninterrupted, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@N sends before the time limit), on two nodes with a
    DataLoader worker per rank: the trainer checkpoints and exits 75, the script requeues the job, and the
    requeued job resumes from the checkpoint and ends exactly where the uninterrupted run ended."""
    out = tmp_path / "out"
    job = submit_training(slurm, ["--nodes=2", "--ntasks-per-node=1"], synth_shards["pretrain"], out, tmp_path)
    assert slurm_cmd(slurm, "scancel", "--signal=USR1", "--batch", job).returncode == 0
    text = release_requeued_and_wait(slurm, job, tmp_path)
    assert "got SIGUSR1" in text and f"requeueing job {job}" in text, f"{text[-4000:]}\n{slurm.logs()}"
    assert_resumed_to_the_same_end(text, out, uninterrupted / "out")


def test_preempted_job_checkpoints_is_requeued_by_slurm_and_resumes(slurm, synth_shards, uninterrupted, tmp_path):
    """A job of the high-priority partition takes every CPU: SLURM sends SIGTERM to the training job (partition
    PreemptMode=REQUEUE), the trainer checkpoints, SLURM requeues the job, and it resumes to the same end."""
    out = tmp_path / "out"
    job = submit_training(slurm, ["--ntasks=2"], synth_shards["pretrain"], out, tmp_path)
    urgent = sbatch(slurm, ["--parsable", "--partition=urgent", "--nodes=2", "--ntasks=4", "--output=/dev/null"],
                    "--wrap", ["true"], tmp_path)
    assert urgent.returncode == 0, urgent.stderr
    text = release_requeued_and_wait(slurm, job, tmp_path)
    assert "got SIGTERM" in text and "not requeueing" in text, f"{text[-4000:]}\n{slurm.logs()}"
    assert_resumed_to_the_same_end(text, out, uninterrupted / "out")


def test_scancel_checkpoints_and_the_job_stays_cancelled(slurm, synth_shards, tmp_path):
    out = tmp_path / "out"
    args = train_args(synth_shards["pretrain"], out, "--epochs", "3", "--max_steps", str(3 * STEPS),
                      "--data.num_workers", "1")
    result = sbatch(slurm, ["--parsable", "--ntasks=2"], "launch/slurm/train.sbatch", args, tmp_path)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    wait_for(lambda: (out / "metrics.jsonl").is_file(), 180, "step 1", tmp_path)
    assert slurm_cmd(slurm, "scancel", job).returncode == 0
    wait_for(lambda: job_state(slurm, job) in FINISHED, 120, "the cancelled job to end", tmp_path)
    text = logs(tmp_path)
    assert "got SIGTERM" in text and "not requeueing" in text and "(restart 1)" not in text, text[-4000:]
    assert 1 <= checkpoint_meta(out)["step"] < 3 * STEPS


def test_shard_job_array_makes_one_folder_per_input(slurm, synth_shards, tmp_path):
    """Two JSONL parts and a parquet part (pictures inside), one array task each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = (synth_shards["dataset"] / "pretrain_data.jsonl").read_text().splitlines()
    images = synth_shards["dataset"] / "pretrain_images"
    parts = [tmp_path / "part_a.jsonl", tmp_path / "part_b.jsonl", tmp_path / "part_c.parquet"]
    parts[0].write_text("\n".join(lines[:100]) + "\n")
    parts[1].write_text("\n".join(lines[100:150]) + "\n")
    records = [json.loads(line) for line in lines[150:]]
    pq.write_table(pa.table({
        "conversations": [json.dumps(r["conversations"]) for r in records],
        "image_bytes": [[(images / n.strip()).read_bytes() for n in r.get("image", "").split(",") if n.strip()]
                        for r in records],
    }), parts[2])
    result = sbatch(slurm, ["--wait", "--array=0-2"], "launch/slurm/shard.sbatch",
                    [str(tmp_path / "shards"), str(images), *map(str, parts)], tmp_path)
    assert result.returncode == 0, f"{result.stderr}\n{logs(tmp_path)}"
    counts = {}
    for name in ("part_a", "part_b", "part_c"):
        manifest = json.loads((tmp_path / "shards" / name / "manifest.json").read_text())
        counts[name] = (manifest["source"]["format"], sum(s["samples"] for s in manifest["shards"]))
    assert counts == {"part_a": ("jsonl", 100), "part_b": ("jsonl", 50), "part_c": ("parquet", len(lines) - 150)}


def test_a_trainer_started_by_the_batch_script_without_srun_says_so_at_once(slurm, synth_shards, tmp_path):
    """`sbatch --ntasks=2` with `python launch/train.py` in the script: rank 0 of 2, no rank 1 ever."""
    out = tmp_path / "out"
    flags = f"--config launch/configs/debug.yaml --train_shards {synth_shards['pretrain']} --out_dir {out}"
    script = (f"{sys.executable} -m vlm.doctor {flags} --quick; echo doctor=$?; "
              f"{sys.executable} launch/train.py {flags}; echo train=$?")
    started = time.time()
    result = slurm_cmd(slurm, "sbatch", "--time=10", f"--output={tmp_path}/%x-%j.out", "--wait", "--ntasks=2",
                       "--job-name=nosrun", f"--wrap={script}", timeout=240)
    text = logs(tmp_path)
    assert result.returncode == 0, result.stderr + text
    assert "doctor=1" in text and "train=1" in text and time.time() - started < 120
    assert text.count("not by srun") == 2 and "launch/slurm/train.sbatch" in text
    assert "Traceback" not in text


def test_a_one_task_srun_step_needs_no_free_default_port(slurm, synth_shards, tmp_path):
    """`srun -n1 python launch/train.py` with MASTER_PORT pointing at a port another process holds."""
    import socket

    out = tmp_path / "out"
    flags = (f"--config launch/configs/debug.yaml --train_shards {synth_shards['pretrain']} --out_dir {out} "
             "--max_steps 1")
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        script = f"MASTER_PORT={port} srun -n1 {sys.executable} launch/train.py {flags}; echo train=$?"
        result = slurm_cmd(slurm, "sbatch", "--time=10", f"--output={tmp_path}/%x-%j.out", "--wait",
                           "--ntasks=1", "--job-name=onetask", f"--wrap={script}", timeout=240)
    text = logs(tmp_path)
    assert result.returncode == 0 and "train=0" in text, result.stderr + text

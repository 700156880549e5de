"""The per-node launch mode: one `deepspeed --no_ssh --node_rank R` launcher per node form one job.

Both "nodes" are this machine; the hostfile needs two distinct names (DeepSpeed trims --num_nodes to the
hosts it lists), which need not resolve: every rank meets at --master_addr.
"""

import json
import subprocess

import pytest

from tests.launching import BIN, REPO, cpu_env, free_port

pytestmark = pytest.mark.slow


def test_two_no_ssh_launchers_form_one_two_node_job(synth_shards, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out = tmp_path / "out"
    port = str(free_port())
    launchers = []
    for node_rank in (0, 1):
        cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2",
               "--node_rank", str(node_rank), "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", port,
               "launch/train.py", "--config", "launch/configs/debug.yaml", "--train_shards",
               str(synth_shards["pretrain"]), "--out_dir", str(out), "--max_steps", "8", "--save_interval", "1000"]
        launchers.append(subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=300)[0] for p in launchers]
    finally:
        for p in launchers:
            p.kill()
    for node_rank, (p, output) in enumerate(zip(launchers, outputs)):
        assert p.returncode == 0, output[-4000:]
        assert f"nnodes=2, num_local_procs=1, node_rank={node_rank}" in output, output[-4000:]
    meta = json.loads((out / "checkpoints" / "step_000000008" / "meta.json").read_text())
    assert meta["world_size"] == 2
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0]

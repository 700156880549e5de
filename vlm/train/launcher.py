"""Rank variables from whichever launcher started this process, normalised before any process group exists.

Understood: the `deepspeed` launcher and torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
`MASTER_PORT`; the injected `--local_rank` flag too), SLURM's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`,
`SLURM_LOCALID`) and Open MPI's `mpirun` (`OMPI_COMM_WORLD_*`). A plain `python launch/train.py` is a world
of one. Nothing here imports DeepSpeed (the preflight uses it without starting anything).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


class LaunchError(RuntimeError):
    """The processes of a launch cannot find each other (a port in use, a task started without srun, ...);
    the message says what to change."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the launch: global rank, world size, local rank, and which launcher it was."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def normalize_launcher_env(env: dict[str, str] | None = None, local_rank_flag: int | None = None) -> DistEnv:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK (and MASTER_* for one process) from whichever launcher started us."""
    env = os.environ if env is None else env
    pid, _, seen = env.get("VLM_LAUNCHER", "").partition(":")
    if pid == str(os.getpid()):  # already normalised in this process (children inherit env, not this marker's pid)
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), seen)
    launcher = "deepspeed/torchrun"
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        launcher = "slurm"
    elif "RANK" not in env and "OMPI_COMM_WORLD_RANK" in env:
        env["RANK"], env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        launcher = "openmpi"
    elif "RANK" not in env:
        env["RANK"], env["WORLD_SIZE"] = "0", "1"
        launcher = "single process"
    if "LOCAL_RANK" not in env:
        env["LOCAL_RANK"] = str(local_rank_flag if local_rank_flag is not None else 0)
    if env["WORLD_SIZE"] == "1" and launcher != "deepspeed/torchrun":
        # Nobody has to find a world of one: a free port of its own, never a stale exported one. (A launcher
        # that set RANK keeps its port: torchrun's agent already serves its store there.)
        env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    elif launcher == "slurm" and env.get("SLURM_JOB_ID", "").isdigit():
        env.setdefault("MASTER_PORT", str(slurm_job_port(int(env["SLURM_JOB_ID"]))))  # as train.sbatch
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    nodes, node_rank = _node_layout(env)
    env.setdefault("CROSS_SIZE", str(nodes))  # what the `deepspeed` launcher sets and DeepSpeed's checkpoint
    env.setdefault("CROSS_RANK", str(node_rank))  # writer reads: the number of nodes and this node's index
    env["VLM_LAUNCHER"] = f"{os.getpid()}:{launcher}"
    return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), launcher)


def _node_layout(env: dict[str, str]) -> tuple[int, int]:
    """(number of nodes, this node's index) from SLURM's or torchrun's/Open MPI's per-node sizes; (1, 0) when
    the launcher does not tell."""
    if env.get("SLURM_NNODES", "").isdigit() and env.get("SLURM_NODEID", "").isdigit():
        return int(env["SLURM_NNODES"]), int(env["SLURM_NODEID"])
    per_node = env.get("LOCAL_WORLD_SIZE") or env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or ""
    if per_node.isdigit() and int(per_node) > 0:
        return max(int(env["WORLD_SIZE"]) // int(per_node), 1), int(env["RANK"]) // int(per_node)
    return 1, 0


def slurm_job_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job: 20000 + job id % 10000 (launch/slurm/train.sbatch uses the same),
    so concurrent jobs on one node do not collide on a fixed default."""
    return 20000 + job_id % 10000


def unlaunchable(env: dict[str, str]) -> str | None:
    """A launch whose other ranks can never arrive (so forming the group would wait until its timeout):
    several SLURM tasks allocated, but this process was started by the batch script itself, not by srun
    (srun sets SLURM_STEP_ID in each task it starts). None when nothing is wrong."""
    slurm_tasks = env.get("SLURM_NTASKS", "")
    started_by_slurm = env.get("VLM_LAUNCHER", "").endswith(":slurm") or (
        "RANK" not in env and "SLURM_PROCID" in env)
    if started_by_slurm and slurm_tasks.isdigit() and int(slurm_tasks) > 1 and "SLURM_STEP_ID" not in env:
        return (f"this process was started by the SLURM batch script itself, not by srun, so it would wait for the "
                f"other {int(slurm_tasks) - 1} of SLURM_NTASKS={slurm_tasks} ranks forever: start every rank with "
                "`srun python launch/train.py ...`, or submit launch/slurm/train.sbatch")
    return None


def launcher_problems(env: dict[str, str] | None = None) -> list[str]:
    """Inconsistent launcher variables, found before any process group is formed."""
    env = os.environ if env is None else env
    problems = [problem] if (problem := unlaunchable(env)) else []
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except (KeyError, ValueError) as err:
        return [f"launcher variables RANK/WORLD_SIZE/LOCAL_RANK are missing or not integers ({err})"]
    if not 0 <= rank < world:
        problems.append(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    if not 0 <= local <= rank:
        problems.append(f"LOCAL_RANK={local} must be in 0..RANK ({rank})")
    if world > 1 and not env.get("MASTER_ADDR"):
        problems.append("MASTER_ADDR is not set for a multi-process run")
    port = env.get("MASTER_PORT", "")
    if not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(f"MASTER_PORT={port!r} is not a valid port")
    return problems

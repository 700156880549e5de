"""Starting real multi-process jobs from tests: the deepspeed launcher on CPU ranks (gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def deepspeed_cmd(script: str, args: list[str], nproc: int = 2) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]


def run(cmd: list[str], timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=kwargs.pop("env", cpu_env()), capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    return result


def tail(result: subprocess.CompletedProcess, n: int = 4000) -> str:
    return (result.stdout + result.stderr)[-n:]

"""Installing Debian packages a test set-up needs (SLURM, Chromium), as root with apt-get, from CI's `.ci/run`."""

from __future__ import annotations

import os
import shutil
import subprocess


def apt_get_install(packages: tuple[str, ...] | list[str], what: str, timeout: int = 900) -> str | None:
    """`apt-get update` then install `packages` without recommends. None when both ran, else why not (not root,
    no apt-get, a failing step with its output's tail). `what` names what is missing, for the messages."""
    if os.geteuid() != 0:
        return f"{what} is missing and installing {list(packages)} needs root"
    if shutil.which("apt-get") is None:
        return f"{what} is missing and there is no apt-get to install {list(packages)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({result.returncode}): {(result.stdout + result.stderr)[-800:]}"
    return None

"""A real local SLURM cluster (two nodes) for the tests in this folder, started once per session.

The Debian packages are installed with apt-get when missing (root only). Where they cannot be, the tests
skip with the reason; VLM_REQUIRE_SLURM=1 (set by .ci/run) turns that skip into a failure.
"""

from __future__ import annotations

import os
import tempfile

import pytest

from tests.slurm.cluster import LocalSlurm, install_packages


@pytest.fixture(scope="session")
def slurm():
    reason = install_packages()
    if reason is not None:
        if os.environ.get("VLM_REQUIRE_SLURM") == "1":
            pytest.fail(f"VLM_REQUIRE_SLURM=1 but SLURM is not available: {reason}")
        pytest.skip(f"no local SLURM cluster: {reason}")
    # munged needs a world-executable path to its socket; pytest's tmp folders are 0700.
    cluster = LocalSlurm(tempfile.mkdtemp(prefix="vlm-slurm-"), nodes=2)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.purge()

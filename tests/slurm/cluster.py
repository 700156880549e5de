"""A real SLURM cluster on this machine, for tests: munge + slurmctld + one slurmd per node, one state folder.

    python -m tests.slurm.cluster install                      # apt-get the Debian packages if missing (root)
    python -m tests.slurm.cluster up --dir /tmp/slurm-x --nodes 2  # prints `export SLURM_CONF=...`
    python -m tests.slurm.cluster down --dir /tmp/slurm-x          # stops exactly the daemons it started

Everything lives in the state folder: our own munge key and socket (a system munged is never touched),
slurm.conf, spool, state, logs and pid files. Nodes are named `localhost`, `localhost-2`, ... with NodeAddr
127.0.0.N, so nothing depends on the machine's host name; slurmctld orders nodes by name, so rank 0 lands on
`localhost`, which `scontrol show hostnames` turns into a MASTER_ADDR that always resolves. No cgroups, no
accounting daemon. Daemons are stopped by the PIDs in their pid files, and only when that process's command
line names this state folder (a reused PID is never killed). Clients need SLURM_CONF from `env()`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.apt import apt_get_install

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


class ClusterError(RuntimeError):
    """The cluster could not be started; the message carries the daemons' log tails."""


def which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


def install_packages() -> str | None:
    """apt-get the SLURM packages when a binary is missing. Returns None when ready, else why not."""
    if not missing_binaries():
        return None
    problem = apt_get_install(PACKAGES, f"SLURM binaries {missing_binaries()}", timeout=600)
    if problem:
        return problem
    return None if not missing_binaries() else f"still missing after apt-get: {missing_binaries()}"


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (all sockets held open together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_names(nodes: int) -> list[str]:
    return ["localhost"] + [f"localhost-{i}" for i in range(2, nodes + 1)]


class LocalSlurm:
    """One local cluster: `up()`, then run sbatch/srun with `env()`, then `down()`."""

    def __init__(self, state_dir: str | Path, nodes: int = 2, cpus_per_node: int = 2):
        self.dir = Path(state_dir).resolve()
        self.nodes, self.cpus = nodes, cpus_per_node
        self.conf = self.dir / "etc" / "slurm.conf"
        self.socket = self.dir / "munge-run" / "munge.socket.2"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def _config(self) -> str:
        ctld_port, *node_ports = free_ports(1 + self.nodes)
        mem_mb = _mem_total_mb() * 8 // 10 // self.nodes
        d = self.dir
        lines = [
            "# written by tests/slurm/cluster.py: a single-machine test cluster",
            "ClusterName=vlmtest", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={d}/ctld", f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/run/slurmctld.pid", f"SlurmdPidFile={d}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            # plain process tracking: no cgroups, no task binding, no accounting daemon
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2,bf_interval=2",
            "PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE",
            "ReturnToService=2", "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0",
            # MinJobAge=4 keeps `sbatch --wait` polling every 2 s; KillWait is the grace between TERM and KILL.
            "MinJobAge=4", "KillWait=10", "Waittime=0", "JobRequeue=1",
            # Job ids (and the MASTER_PORT train.sbatch derives from them) differ between test clusters.
            f"FirstJobId={random.randrange(1000, 1_000_000)}",
        ]
        # slurmctld rejects a `localhost` node line followed by another node line, so localhost comes last.
        for name, port, i in reversed(list(zip(node_names(self.nodes), node_ports, range(1, self.nodes + 1)))):
            lines.append(f"NodeName={name} NodeHostname={name} NodeAddr=127.0.0.{i} Port={port} CPUs={self.cpus} "
                         f"Boards=1 SocketsPerBoard=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 "
                         f"RealMemory={mem_mb} State=UNKNOWN")
        lines += ["PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
                  "PreemptMode=REQUEUE GraceTime=0",
                  "PartitionName=urgent Nodes=ALL Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"]
        return "\n".join(lines) + "\n"

    def _prepare(self) -> None:
        # munged insists on a world-executable path to its socket and a private key folder.
        for sub, mode in (("", 0o755), ("munge-run", 0o755), ("munge-key", 0o700), ("etc", 0o755),
                          ("ctld", 0o755), ("run", 0o755), ("log", 0o755), ("spool", 0o755)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir / sub, mode)
        for name in node_names(self.nodes):
            (self.dir / "spool" / name).mkdir(exist_ok=True)
        key = self.dir / "munge-key" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        self.conf.write_text(self._config())

    def up(self, timeout: float = 60) -> LocalSlurm:
        if missing_binaries():
            raise ClusterError(f"SLURM binaries missing: {missing_binaries()} (run install_packages())")
        self.down()
        self._prepare()
        d = self.dir
        self._start([which("munged"), f"--socket={self.socket}", f"--key-file={d}/munge-key/munge.key",
                     f"--pid-file={d}/munge-run/munged.pid", f"--seed-file={d}/munge-key/munged.seed",
                     f"--log-file={d}/log/munged.log", "--origin=127.0.0.1"])
        self._start([which("slurmctld"), "-c", "-i", "-f", str(self.conf)])
        for name in node_names(self.nodes):
            self._start([which("slurmd"), "-N", name, "-f", str(self.conf)])
        self._wait_idle(timeout)
        return self

    def _start(self, cmd: list[str]) -> None:
        """Each daemon forks into the background itself; a non-zero exit means it failed at start-up."""
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=self.env())
        if result.returncode != 0:
            raise ClusterError(f"`{' '.join(cmd)}` exited {result.returncode}: {result.stderr[-1000:]}\n{self.logs()}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            result = subprocess.run([which("sinfo"), "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                                    env=self.env(), timeout=30)
            states = result.stdout.strip()
            by_node = dict(line.split() for line in states.splitlines())  # one line per node and partition
            if result.returncode == 0 and len(by_node) == self.nodes and set(by_node.values()) == {"idle"}:
                return
            time.sleep(0.2)
        raise ClusterError(f"nodes not idle after {timeout:.0f} s (sinfo: {states!r})\n{self.logs()}")

    def logs(self, chars: int = 1500) -> str:
        parts = []
        for path in sorted((self.dir / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def _pid_files(self) -> list[Path]:
        run = [*sorted((self.dir / "run").glob("slurmd-*.pid")), self.dir / "run" / "slurmctld.pid"]
        return run + [self.dir / "munge-run" / "munged.pid"]

    def down(self) -> None:
        """Cancel every job (slurmstepd outlives slurmd), then stop our daemons by PID."""
        if self.conf.is_file() and which("scancel") and (self.dir / "run" / "slurmctld.pid").is_file():
            subprocess.run([which("scancel"), "--quiet", "--full", "--user", str(os.getuid())], env=self.env(),
                           capture_output=True, timeout=30)
            _wait_no_steps(self.dir, timeout=15)
        pids = [pid for pid in map(_read_pid, self._pid_files()) if pid and _ours(pid, self.dir)]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid) and _ours(pid, self.dir):
                os.kill(pid, signal.SIGKILL)
        for path in self._pid_files():
            path.unlink(missing_ok=True)

    def purge(self) -> None:
        self.down()
        shutil.rmtree(self.dir, ignore_errors=True)


def _mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _ours(pid: int, state_dir: Path) -> bool:
    return f"{state_dir}/" in _cmdline(pid)


def _alive(pid: int) -> bool:
    """Running and not a zombie (daemons re-parent to PID 1, which may reap them late)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _wait_no_steps(state_dir: Path, timeout: float) -> None:
    """Wait until no slurmstepd of this cluster is left (they inherit our SLURM_CONF from slurmd)."""
    marker = f"SLURM_CONF={state_dir}/".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [p for p in os.listdir("/proc") if p.isdigit() and "slurmstepd" in _cmdline(int(p))
                 and marker in _environ(int(p)) and _alive(int(p))]
        if not steps:
            return
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.slurm.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("install", "up", "down", "purge"))
    parser.add_argument("--dir", default=os.environ.get("SLURM_LOCAL_DIR"), help="state folder (default: a new one)")
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    if args.action == "install":
        reason = install_packages()
        print(reason or "SLURM packages present")
        return 1 if reason else 0
    if args.dir is None and args.action != "up":
        parser.error("--dir is required")
    cluster = LocalSlurm(args.dir or tempfile.mkdtemp(prefix="slurm-local-"), nodes=args.nodes)
    if args.action == "up":
        cluster.up()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        getattr(cluster, args.action)()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Remote-shard benchmark: samples/s of `TrainLoader` reading a shard folder from local disk, over http and as
s3:// from a server on the loopback interface, with the same workers.

    OMP_NUM_THREADS=2 python tests/bench/remote_bench.py [--records 2048] [--repeats 3] [--batch-size 16]
        [--server auto|nginx|python]

The corpus and geometry are `loader_bench.py`'s (synthetic pretrain records, pictures 64-320 px, CLIP
ViT-B/16 at 224 px, max_seq_len 640, 128 samples per shard). The server, in a process of its own, is nginx
(Debian's `nginx-light`; `auto` takes it when `nginx` is on PATH) or `tests/object_server.py` (pure Python:
its ~0.2 ms of CPU per request comes out of the same two cores as the loader's). s3:// goes to the same server
through boto3's presigned URLs (path-style, `AWS_ENDPOINT_URL`). Configurations run interleaved, `--repeats`
times each; the table shows medians of whole passes over an epoch (loader set-up, worker start-up, index
fetches and per-process connections included) and each remote row's share of local disk's samples/s. The
last line counts the server's requests: one per sample, one per index per reading process, the manifests.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # loader_bench, beside this file (not a package)

import torch  # noqa: E402
from loader_bench import IMAGE_TOKEN_LEN, MAX_SEQ_LEN, timed_pass, write_clip_config  # noqa: E402

from data_tools import shard, synth  # noqa: E402
from vlm.data.image import ImagePreprocessConfig, PixelNormalizer  # noqa: E402
from vlm.data.pipeline import LoaderSettings, TrainLoader  # noqa: E402
from vlm.data.stages import SampleFormat  # noqa: E402
from vlm.tokenizer import image_placeholder_id, load_tokenizer  # noqa: E402

BUCKET = "bench-bucket"
WORKERS = (0, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/bench/remote_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=2048, help="synthetic pretrain records")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per configuration (medians reported)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--server", choices=("auto", "nginx", "python"), default="auto",
                   help="the loopback server (auto: nginx when installed)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="remote_bench_") as folder:
        run(Path(folder), args)
    return 0


def run(tmp: Path, args: argparse.Namespace) -> None:
    """Build the corpus and shards under `tmp`, serve them, then time and print."""
    shards = tmp / "root" / BUCKET / "pretrain"
    with contextlib.redirect_stdout(io.StringIO()):
        synth.write_corpus(tmp / "corpus", pretrain=args.records, sft=0, eval=0, progress=False)
        shard.main(["--jsonl", str(tmp / "corpus/pretrain_data.jsonl"), "--images", str(tmp / "corpus/pretrain_images"),
                    "--out", str(shards), "--prefix", "pretrain", "--samples-per-shard", "128"])
    image_config = ImagePreprocessConfig.from_folder(write_clip_config(tmp / "clip"))
    tokenizer = load_tokenizer()
    fmt = SampleFormat(tokenizer, image_config, image_placeholder_id(tokenizer), IMAGE_TOKEN_LEN, MAX_SEQ_LEN)
    kind = ("nginx" if shutil.which("nginx") else "python") if args.server == "auto" else args.server
    requests: Counter = Counter()
    with (nginx if kind == "nginx" else python_server)(tmp / "root", tmp / "server", requests) as endpoint:
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        sources = {"local": str(shards), "http": f"{endpoint}/{BUCKET}/pretrain", "s3": f"s3://{BUCKET}/pretrain"}
        rates, load = time_all(sources, fmt, image_config, args)
    report(rates, load, requests, kind, args)


@contextlib.contextmanager
def python_server(root: Path, work: Path, requests: Counter) -> Iterator[str]:
    """`python -m tests.object_server root`; yields its endpoint, then fills `requests` with its counts."""
    server = subprocess.Popen([sys.executable, "-m", "tests.object_server", str(root)], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield server.stdout.readline().strip()
    finally:
        out, _ = server.communicate("", timeout=60)
    requests.update(json.loads(out.strip().splitlines()[-1]))


@contextlib.contextmanager
def nginx(root: Path, work: Path, requests: Counter) -> Iterator[str]:
    """nginx serving `root` on 127.0.0.1 (ranges, keep-alive, sendfile); yields its endpoint, then fills
    `requests` from its access log (one path per line)."""
    work.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:  # a free port (nginx cannot report the one it was given)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read the root-owned temporary folder
    temp = " ".join(f"{name}_temp_path {work}/{name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (work / "nginx.conf").write_text(f"""{user} daemon off; worker_processes 1; pid {work}/nginx.pid;
        error_log {work}/error.log warn; events {{ worker_connections 256; }}
        http {{ log_format paths '$uri'; access_log {work}/access.log paths; {temp}
                sendfile on; tcp_nodelay on; keepalive_requests 1000000; keepalive_timeout 300s;
                server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }} }}""")
    server = subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-p", str(work)])
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):  # until it listens
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.05)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
    requests.update((work / "access.log").read_text().split())


def time_all(sources: dict[str, str], fmt: SampleFormat, image_config, args) -> tuple[dict, list[float]]:
    """{(source, workers): [samples/s per pass]}, and the 1-minute load average before and after."""
    def make(spec: str, workers: int):
        return lambda: TrainLoader([spec], fmt, LoaderSettings(batch_size=args.batch_size, num_workers=workers))

    configs = {(name, w): make(spec, w) for w in WORKERS for name, spec in sources.items()}
    rates: dict[tuple[str, int], list[float]] = {key: [] for key in configs}
    normalize = PixelNormalizer(image_config)
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for key, loader in configs.items():
            wall, _, samples = timed_pass(loader, normalize)
            rates[key].append(samples / wall)
    load.append(os.getloadavg()[0])
    return rates, load


def report(rates: dict, load: list[float], requests: Counter, kind: str, args) -> None:
    print(f"{args.records} pretrain records in shards of 128, batch {args.batch_size}, 224 px, max_seq_len "
          f"{MAX_SEQ_LEN}, torch threads {torch.get_num_threads()}, median of {args.repeats}, server {kind}; load "
          f"average {load[0]:.2f} before, {load[1]:.2f} after ({os.cpu_count()} CPUs)")
    print(f"{'workers':>8} {'local samples/s':>16} {'http samples/s':>15} {'http/local':>11}"
          f" {'s3 samples/s':>13} {'s3/local':>9}")
    for w in WORKERS:
        local, http, s3 = (statistics.median(rates[(name, w)]) for name in ("local", "http", "s3"))
        print(f"{w:>8} {local:>16.1f} {http:>15.1f} {http / local:>10.0%} {s3:>13.1f} {s3 / local:>8.0%}")
    tar = sum(n for path, n in requests.items() if path.endswith(".tar"))
    index = sum(n for path, n in requests.items() if path.endswith(".idx.json"))
    manifest = sum(n for path, n in requests.items() if path.endswith("manifest.json"))
    print(f"server: {tar} ranged GETs of samples, {index} index GETs, {manifest} manifest GETs over "
          f"{2 * len(WORKERS) * args.repeats} remote passes")


if __name__ == "__main__":
    raise SystemExit(main())

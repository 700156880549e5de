"""Wall time of `python -m data_tools.shard` against `tar cf` of the same files (the floor).

    OMP_NUM_THREADS=1 python tests/bench/shard_bench.py [--images 3000] [--repeats 3] [--keep DIR]

Generates a corpus of JPEG and PNG pictures (64-320 px, gradients plus noise so their sizes resemble
photos) and a JSONL with 1-image, 2-image and text-only records (and, when pyarrow is installed, the same
records as a MiniMind-V 3v parquet file with the pictures inside), then times, interleaved and repeated:
`tar cf` of the JSONL and images, the sharder at the default validation level with 1 and 2 workers, with
--full-decode, from the parquet file (1 and 2 workers), and the interpreter's start-up with the sharder's imports. Prints one
table: the fastest and the median run, both as ratios to tar's fastest and median, the goal and whether the
fastest run meets it (fastest runs: the machine is shared, the least disturbed run is the fairest), CPU
seconds, records and MiB of pictures per second, and every run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

GOALS = {"shard, 1 worker": 3.0, "shard, 2 workers": 2.0}
"""Most wall time allowed, as a multiple of `tar cf`'s, for the fastest run of these variants."""


def make_picture(rng: random.Random) -> Image.Image:
    """A picture of random size: a gradient, noise and a few filled circles."""
    size = (rng.randint(64, 320), rng.randint(64, 320))
    base = Image.linear_gradient("L").resize(size).convert("RGB")
    noise = Image.effect_noise(size, rng.uniform(20, 60)).convert("RGB")
    image = Image.blend(base, noise, 0.35)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        r = rng.randint(8, 40)
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return image


def make_corpus(root: Path, n_images: int, seed: int = 0) -> tuple[Path, Path, int]:
    """Write root/images/* and root/data.jsonl; returns (jsonl, images, total image bytes)."""
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True)
    names = []
    for i in range(n_images):
        name = f"{i:05d}.jpg" if i % 2 == 0 else f"{i:05d}.png"
        picture = make_picture(rng)
        if name.endswith(".jpg"):
            picture.save(images / name, "JPEG", quality=rng.randint(75, 95))
        else:
            picture.save(images / name, "PNG", compress_level=1)
        names.append(name)
    records, i = [], 0
    while i < len(names):
        take = 2 if rng.random() < 0.15 and i + 1 < len(names) else 1
        user = " ".join(["<image>"] * take) + "\nDescribe the picture."
        records.append({"conversations": [{"role": "user", "content": user},
                                          {"role": "assistant", "content": "Some circles on a gradient."}],
                        "image": ", ".join(names[i:i + take])})
        i += take
        if rng.random() < 0.05:
            records.append({"conversations": [{"role": "user", "content": "Name a colour."},
                                              {"role": "assistant", "content": "Red."}]})
    jsonl = root / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    return jsonl, images, sum(p.stat().st_size for p in images.iterdir())


def make_parquet(corpus: Path) -> Path | None:
    """corpus/data.parquet: the JSONL's records in MiniMind-V 3v's layout (`conversations` as a JSON string,
    `image_bytes` a list of pictures), or None without pyarrow."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    path = corpus / "data.parquet"
    if not path.exists():
        conversations, pictures = [], []
        for line in (corpus / "data.jsonl").read_text().splitlines():
            record = json.loads(line)
            names = [n.strip() for n in record.get("image", "").split(",") if n.strip()]
            conversations.append(json.dumps(record["conversations"], ensure_ascii=False))
            pictures.append([(corpus / "images" / n).read_bytes() for n in names])
        table = pa.table({"conversations": pa.array(conversations, pa.string()),
                          "image_bytes": pa.array(pictures, pa.list_(pa.binary()))})
        pq.write_table(table, path)
    return path


def timed(cmd: list[str], cwd: Path, out: Path | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and its children): CPU time is less hurt by a busy machine."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, make (or reuse, with --keep) the corpus, time the variants and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="number of pictures (default 3000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, interleaved (default 3)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="shard_bench_"))
    try:
        return run_bench(root, args.images, args.repeats)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


def variants(root: Path, corpus: Path) -> dict[str, tuple[list[str], Path | None]]:
    """name -> (command, output folder to empty before each run)."""
    py, out = sys.executable, root / "out"
    common = ["--out", str(out), "--samples-per-shard", "1000", "--prefix", "bench"]
    shard = [py, "-m", "data_tools.shard", "--input", str(corpus / "data.jsonl"), "--images",
             str(corpus / "images"), *common]
    found = {
        "tar cf (floor)": (["tar", "cf", str(root / "all.tar"), "-C", str(corpus), "data.jsonl", "images"], None),
        "shard, 1 worker": (shard + ["--workers", "1"], out),
        "shard, 2 workers": (shard + ["--workers", "2"], out),
        "shard --full-decode, 1 worker": (shard + ["--workers", "1", "--full-decode"], out),
    }
    parquet = make_parquet(corpus)
    if parquet is not None:
        for workers in (1, 2):
            found[f"shard parquet, {workers} worker{'s' * (workers > 1)}"] = (
                [py, "-m", "data_tools.shard", "--input", str(parquet), *common, "--workers", str(workers)], out)
    else:
        print("parquet input: not timed (pyarrow is not installed)")
    found["python start-up + imports"] = ([py, "-c", "import data_tools.shard"], None)
    return found


def run_bench(root: Path, n_images: int, repeats: int) -> int:
    """Time every variant `repeats` times, interleaved, after one untimed warm-up round; print the table."""
    corpus = root / "corpus"
    if not (corpus / "data.jsonl").exists():
        shutil.rmtree(corpus, ignore_errors=True)
        t0 = time.perf_counter()
        make_corpus(corpus, n_images)
        print(f"generated {n_images} pictures in {time.perf_counter() - t0:.1f} s")
    image_bytes = sum(p.stat().st_size for p in (corpus / "images").iterdir())
    records = sum(1 for _ in open(corpus / "data.jsonl"))
    print(f"corpus: {records} records, {n_images} images, {image_bytes / 2**20:.1f} MiB "
          f"(mean {image_bytes / n_images / 1024:.1f} KiB per image)")
    commands = variants(root, corpus)
    load_before = os.getloadavg()
    for cmd, dest in commands.values():  # warm the page cache and the interpreter's bytecode caches
        timed(cmd, root, dest)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, (cmd, dest) in commands.items():
            times[name].append(timed(cmd, root, dest))
    print_table(times, load_before, records, image_bytes)
    return 0


def print_table(times: dict[str, list[tuple[float, float]]], load_before: tuple[float, ...], records: int,
                image_bytes: int) -> None:
    """Ratios to tar: fastest over tar's fastest (least disturbed on a shared machine; the goals apply to
    it), median over tar's median beside it; records and MiB of pictures per second of the fastest run."""
    best = {name: min(w for w, _ in runs) for name, runs in times.items()}
    median = {name: statistics.median(w for w, _ in runs) for name, runs in times.items()}
    cpu = {name: min(c for _, c in runs) for name, runs in times.items()}
    tar, tar_median = best["tar cf (floor)"], median["tar cf (floor)"]
    print(f"\n{'variant':30} {'fastest s':>9} {'median s':>8} {'x tar':>6} {'x tar median':>12} {'goal':>5} "
          f"{'met?':>4} {'cpu s':>6} {'records/s':>9} {'MiB/s':>6}  wall of each run (s)")
    for name in times:
        goal = f"<={GOALS[name]:.0f}x" if name in GOALS else ""
        met = ("yes" if best[name] / tar <= GOALS[name] else "no") if name in GOALS else ""
        runs = " ".join(f"{w:.2f}" for w, _ in times[name])
        print(f"{name:30} {best[name]:9.2f} {median[name]:8.2f} {best[name] / tar:6.2f} "
              f"{median[name] / tar_median:12.2f} {goal:>5} {met:>4} {cpu[name]:6.2f} "
              f"{records / best[name]:9.0f} {image_bytes / 2**20 / best[name]:6.0f}  {runs}")
    loads = " -> ".join(", ".join(f"{x:.1f}" for x in load) for load in (load_before, os.getloadavg()))
    print(f"\nmachine: {os.cpu_count()} CPU(s), load average {loads} (1, 5, 15 min; before -> after); "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; cpu s = user + sys of the command "
          f"(fastest)")


if __name__ == "__main__":
    sys.exit(main())

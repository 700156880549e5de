"""Turn a corpus file (and its image folder) into validated WebDataset tar shards with a manifest.

    python -m data_tools.shard --input dataset/sft_data.jsonl --images dataset/sft_images \
        --out data/shards/sft --prefix sft [--samples-per-shard 1000] [--workers 2]
    python -m data_tools.shard --input dataset/sft_i2t.parquet --out data/shards/sft3v

Inputs (`data_tools.inputs`, detected from the content, `--format` forces one): MiniMind-V JSONL, LLaVA JSON
(an array) or JSONL, MiniMind-V 3v parquet (pictures inside; no `--images`). Every format gives the same
sample layout. The layout of the output (shard names, sample keys and members, index files, manifest.json) is specified
in `vlm.formats.manifest`; the checks applied to each record in `data_tools.validate`. Bad records are skipped
and listed in the manifest with their reason (`--strict` stops at the first one instead), so input records =
samples written + skipped, always. Blank lines are not records; they are counted in `blank_lines`.
Exit status: 0 when shards were written and at most `--max-skip-fraction` of the records were skipped; 1
when nothing usable came out of the input or more was skipped (the shards and manifest are still complete,
so the skips can be inspected); 2 for a command or input error, or a worker process that died; 130 after
Ctrl-C. After 2 or 130 the same command resumes.

Shards: the input's records are taken in runs of `--samples-per-shard` N (run k: records kN+1 .. (k+1)N,
counting JSONL lines, blank ones too, JSON array elements or parquet rows); each run's samples make one
shard, numbered in input order (a run with skipped records or blank lines holds fewer than N samples, a run
with none makes no shard, `--max-shard-bytes` splits a run into several shards). The boundaries depend only
on the input and the options, never on timing.

Workers: `--workers` processes each take whole runs and write their shards themselves (reading, checking, tar
writing and SHA-256 all in parallel), under temporary names; the main process numbers and renames the
finished shards in input order. For JSONL and JSON it only finds where each run starts and no picture passes
between processes; parquet rows are read once, in order, by the main process and go to the worker with their
run (a row is reached only by decoding its row group from the start), so memory then holds about two runs
of rows per worker. The bytes are the same for any worker count.

Restarts: `.shard-progress.json` records what is complete: the runs committed in input order. Re-running the
same command after an interruption removes unfinished files (and runs finished out of order) and resumes
after the last committed run: the result is byte-identical to an uninterrupted run. A folder holding output
of other options or another input is refused (`--overwrite` starts over), unless nothing of it was complete.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_tools import inputs
from data_tools.pool import WorkerDied, ordered_map, stop_requested
from data_tools.shard_folder import (
    PROGRESS_NAME,
    Progress,
    ShardError,
    prepare_outdir,
    remove_parts,
    save_progress,
)
from data_tools.shard_writer import ShardSink, commit
from data_tools.validate import check_image
from vlm.formats import manifest as mf
from vlm.formats.constants import DEFAULT_MAX_PIXELS
from vlm.formats.errors import BadSample
from vlm.formats.records import read_image

_SAMPLE_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
BOUNDARIES = "input_records"
"""What shard boundaries count (manifest args `boundaries`): N input records per shard, skips included."""


@dataclass(frozen=True)
class Options:
    """The command's settings, one field per flag of `python -m data_tools.shard`."""

    input: str
    images: str | None
    out: str
    prefix: str | None  # None: the input's file stem and the start of its SHA-256 (unique across corpora)
    samples_per_shard: int = 1000
    max_shard_bytes: int | None = None
    workers: int = 1
    resize_max: int | None = None
    strict: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    full_decode: bool = False
    overwrite: bool = False
    format: str = "auto"
    max_skip_fraction: float = 0.1

    def output_args(self, prefix: str, fmt: str) -> dict:
        """The options that shape the output bytes (not --workers, --overwrite or --max-skip-fraction), with
        the resolved prefix and format, as in manifest.json."""
        return {"prefix": prefix, "format": fmt, "samples_per_shard": self.samples_per_shard,
                "boundaries": BOUNDARIES,
                "max_shard_bytes": self.max_shard_bytes, "resize_max": self.resize_max, "strict": self.strict,
                "max_pixels": self.max_pixels, "full_decode": self.full_decode}


@dataclass(frozen=True)
class RecordConfig:
    """What a worker needs to turn one record into a sample (picklable, sent with every batch)."""

    images_root: str | None  # real path of --images (None: the input carries its pictures)
    file_name: str  # basename written into each sample's source
    format: str
    prefix: str
    max_pixels: int
    full_decode: bool
    resize_max: int | None


@dataclass(frozen=True)
class Result:
    """One input record after checking: a sample (members set), a skip (reason set), or a blank line."""

    line: int  # the record's number in the input (JSONL line, JSON array element, parquet row), from 1
    end_byte: int  # where reading continues after it (a byte offset; parquet: a row count)
    key: str = ""
    members: dict | None = None  # {"json": bytes, "0.jpg": bytes, ...}
    reason: str = ""
    detail: str = ""
    placeholder_dropped: bool = False  # a text-only parquet row's placeholder picture was left out


def process_record(cfg: RecordConfig, line: int, end_byte: int, payload) -> Result:
    """Check one input record and, if it passes, build the sample's members (runs in worker processes)."""
    if cfg.format == "jsonl" and not payload.strip():
        return Result(line, end_byte)
    try:
        decoded = inputs.decode(cfg.format, payload, line)
        record, names = decoded.record, decoded.names
        if decoded.pictures is None and names and cfg.images_root is None:
            raise BadSample("missing_image", f"{names[0]!r}: no --images folder was given")
        pictures = decoded.pictures if decoded.pictures is not None else \
            (read_image(cfg.images_root, name) for name in names)
        images = [check_image(data, name, cfg.max_pixels, cfg.full_decode, cfg.resize_max)
                  for data, name in zip(pictures, names)]
    except BadSample as e:
        return Result(line, end_byte, reason=e.reason, detail=e.detail)
    doc = {"conversations": record["conversations"], "source": {"file": cfg.file_name, "line": line},
           "images": names}
    doc.update((k, v) for k, v in record.items() if k not in ("conversations", "image"))
    members = {"json": _SAMPLE_JSON.encode(doc).encode("utf-8")}
    for i, image in enumerate(images):
        members[f"{i}.{image.ext}"] = image.data
    return Result(line, end_byte, key=mf.sample_key(cfg.prefix, line), members=members,
                  placeholder_dropped=decoded.placeholder_dropped)


@dataclass(frozen=True)
class RangeConfig:
    """What a worker needs to write the shards of one run of records (picklable, sent with every task)."""

    record: RecordConfig
    input: str
    outdir: str
    every: int  # records per run (--samples-per-shard)
    max_shard_bytes: int | None
    strict: bool
    owner: int  # the main process's pid, in part names


@dataclass
class RangeResult:
    """One run of records written: its closed shard files (not yet numbered) and its counts."""

    parts: list  # [(temporary file name, entry without name/index, index bytes)], in input order
    records: int = 0  # input records read (samples + skipped), blank lines not included
    blank_lines: int = 0
    skipped: list | None = None
    placeholder_images_dropped: int = 0
    end_line: int = 0  # the number of the last record (or blank line) read
    end_byte: int = 0  # where reading continues after it


def part_name(prefix: str, run: int, k: int, owner: int) -> str:
    """Temporary name of the k-th shard of run `run`, while its final number is unknown; the sink adds .tmp.
    `owner` (the main process's pid) keeps a worker left over from a killed run off the files of the next."""
    return f"{prefix}-{run:06d}.{owner}-{k}.part"


def write_range(cfg: RangeConfig, run: int, done: int, position: int, records: Iterable | None = None) -> RangeResult:
    """Check the records done+1 .. done+every and write their samples as closed shard files under
    `part_name`s; runs in worker processes. `records`: those records as `inputs.read_records` yields them
    (parquet), or None to read them here from `position`. Raises ShardError at a bad record with `strict`,
    and InputError for an input that breaks off; its unfinished files are removed then."""
    outdir = Path(cfg.outdir)
    result = RangeResult([], skipped=[], end_line=done, end_byte=position)
    sink: ShardSink | None = None
    if records is None:
        records = inputs.read_records(cfg.input, cfg.record.format, done, position, cfg.every)
    try:
        for number, end_byte, payload in records:
            if stop_requested():
                raise ShardError("stopped: the command is ending")  # the files of this run are removed below
            r = process_record(cfg.record, number, end_byte, payload)
            result.end_line, result.end_byte = number, end_byte
            if r.members is None and not r.reason:
                result.blank_lines += 1
                continue
            result.records += 1
            if r.reason:
                if cfg.strict:
                    raise ShardError(f"{cfg.input} {inputs.RECORD_UNIT[cfg.record.format]} {number}: {r.reason}: "
                                     f"{r.detail} (drop --strict to skip and count such records instead)")
                result.skipped.append({"line": number, "reason": r.reason, "detail": r.detail})
                continue
            result.placeholder_images_dropped += r.placeholder_dropped
            if sink is not None and cfg.max_shard_bytes is not None \
                    and sink.size_with(r.key, r.members) > cfg.max_shard_bytes:
                result.parts.append((sink.tmp.name, *sink.close(fsync=False)))  # synced when committed
                sink = None
            if sink is None:
                sink = ShardSink(outdir, part_name(cfg.record.prefix, run, len(result.parts), cfg.owner))
            sink.add(r.key, r.members, number)
        if sink is not None:
            result.parts.append((sink.tmp.name, *sink.close(fsync=False)))  # synced when committed
            sink = None
    except BaseException:
        if sink is not None:
            sink.abort()
        for tmp_name, _, _ in result.parts:
            (outdir / tmp_name).unlink(missing_ok=True)
        raise
    return result


def _write_ranges(cfg: RangeConfig, runs: list[tuple]) -> list[RangeResult]:
    return [write_range(cfg, *run) for run in runs]


def _runs(cfg: RangeConfig, done: int, position: int, lazy: bool) -> Iterator[tuple]:
    """`write_range` arguments (run, done, position[, records]) of every run of records after `done`.
    JSONL and JSON runs are read by their worker (this process only finds where each starts). Parquet rows
    are read here, once and in order (a row can only be reached by decoding its row group from the start),
    and go with their run: a list, or with `lazy` (one process) an iterator drawn as the run is written."""
    every, fmt = cfg.every, cfg.record.format
    if fmt != "parquet":
        yield from ((start // every, start, at) for start, at in inputs.range_starts(cfg.input, fmt, every, done,
                                                                                   position))
        return
    reader = inputs.read_records(cfg.input, fmt, done)
    while (first := next(reader, None)) is not None:
        rows = itertools.chain([first], itertools.islice(reader, every - 1))
        yield (first[0] - 1) // every, first[0] - 1, first[0] - 1, rows if lazy else list(rows)


def _commit(outdir: Path, prefix: str, progress: Progress, result: RangeResult) -> list[int]:
    """Number and rename the run's shards after those already complete, add its counts, save the progress;
    returns the numbers of its shards."""
    first = len(progress.shards)
    for tmp_name, entry, index in result.parts:
        progress.shards.append(commit(outdir, tmp_name, mf.shard_name(prefix, len(progress.shards)), entry, index))
    progress.next_line, progress.next_byte = result.end_line, result.end_byte
    progress.input_records += result.records
    progress.blank_lines += result.blank_lines
    progress.skipped += result.skipped
    progress.placeholder_images_dropped += result.placeholder_images_dropped
    save_progress(outdir, progress)
    return list(range(first, len(progress.shards)))


def shard_corpus(opts: Options, after_shard: Callable[[int], None] | None = None) -> dict:
    """Write (or finish) the shard set described by `opts`; returns the manifest.

    `after_shard(i)` is called once shard i is complete and recorded (tests use it to interrupt a run).
    Raises ShardError, and `inputs.InputError` for an input that cannot be read as a whole.
    """
    fmt = inputs.detect_format(opts.input) if opts.format == "auto" else opts.format
    if fmt != "parquet" and opts.images is None:
        raise ShardError(f"{opts.input} is {fmt}: its records name picture files, give the folder they are "
                         "relative to with --images")
    input_sha, input_bytes, total = inputs.scan(opts.input, fmt)
    prefix = opts.prefix or default_prefix(opts.input, input_sha)
    images_root = os.path.realpath(opts.images) if opts.images is not None and fmt != "parquet" else None
    fingerprint = {"args": opts.output_args(prefix, fmt), "input_sha256": input_sha, "images": images_root}
    progress = prepare_outdir(Path(opts.out), opts.overwrite, fingerprint)
    if progress is None:
        print(f"{opts.out} already holds the complete output of this command; nothing to do.")
        return mf.load_manifest(opts.out)
    record_cfg = RecordConfig(images_root, inputs.input_name(opts.input), fmt, prefix, opts.max_pixels,
                              opts.full_decode, opts.resize_max)
    cfg = RangeConfig(record_cfg, opts.input, opts.out, opts.samples_per_shard, opts.max_shard_bytes, opts.strict,
                      os.getpid())
    outdir = Path(opts.out)
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: a process with one thread forks its workers (ordered_map)
    bar = tqdm(total=total, initial=progress.next_line, unit="record", desc=prefix, disable=None)
    runs = _runs(cfg, progress.next_line, progress.next_byte, lazy=opts.workers == 1)
    # Parquet runs carry their rows: fewer of them wait, to bound memory.
    ahead = opts.workers if fmt == "parquet" else 2 * opts.workers
    written = ordered_map(_write_ranges, cfg, runs, opts.workers, batch=1, ahead=ahead)
    try:
        for result in written:
            bar.update(result.end_line - progress.next_line)
            for number in _commit(outdir, prefix, progress, result):
                if after_shard is not None:
                    after_shard(number)
    finally:
        written.close()  # stops the pool, after the runs in progress end
        remove_parts(outdir)  # runs written but not committed (an error, an interrupt): redone on resume
        bar.close()
    manifest = _build_manifest(opts, fingerprint["args"], fmt, progress, input_sha, input_bytes)
    mf.write_manifest(opts.out, manifest)
    (Path(opts.out) / PROGRESS_NAME).unlink(missing_ok=True)  # complete: nothing left to resume
    return manifest


def default_prefix(path: str, sha256: str) -> str:
    """`{file stem made safe}-{first 8 hex of the input's SHA-256}`: two corpora that share a file name
    (v1/sft_data.jsonl, v2/sft_data.jsonl) get different sample keys."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)[:55] or "shard"
    return f"{stem}-{sha256[:8]}"


def _build_manifest(opts: Options, args: dict, fmt: str, progress: Progress, sha: str, size: int) -> dict:
    by_reason: dict[str, int] = {}
    for skip in progress.skipped:
        by_reason[skip["reason"]] = by_reason.get(skip["reason"], 0) + 1
    return {
        "format": mf.FORMAT,
        "tool": {"name": "data_tools.shard", "version": __import__("vlm").__version__},
        "args": args,
        "source": {"input": opts.input, "format": fmt, "sha256": sha, "bytes": size, "images": opts.images},
        "input_records": progress.input_records,
        "blank_lines": progress.blank_lines,
        "placeholder_images_dropped": progress.placeholder_images_dropped,
        "total_samples": sum(entry["samples"] for entry in progress.shards),
        "shards": progress.shards,
        "skipped": progress.skipped,
        "skipped_by_reason": dict(sorted(by_reason.items())),
    }


def summary(manifest: dict, out: str) -> str:
    """The closing line: records in, samples and shards written, skips by reason, blank lines ignored."""
    reasons = ", ".join(f"{k}: {v}" for k, v in manifest["skipped_by_reason"].items())
    source = manifest.get("source") or {}
    dropped = manifest.get("placeholder_images_dropped", 0)
    return (f"{manifest['input_records']} records in ({source.get('format', '?')}), {manifest['total_samples']} "
            f"samples written to {len(manifest['shards'])} shard(s) in {out}, {len(manifest['skipped'])} skipped"
            + (f" ({reasons})" if reasons else "") + f", {manifest['blank_lines']} blank line(s) ignored"
            + (f", {dropped} text-only row(s) without their placeholder picture" if dropped else ""))


def verdict(manifest: dict, max_skip_fraction: float) -> str | None:
    """Why this output should not count as a success (exit 1), or None: nothing usable came out of the
    input, or more than `max_skip_fraction` of its records were skipped."""
    records, written = manifest["input_records"], manifest["total_samples"]
    reasons = sorted(manifest["skipped_by_reason"].items(), key=lambda kv: -kv[1])
    top = f"; most common reason: {reasons[0][0]} ({reasons[0][1]})" if reasons else ""
    if written == 0:
        return f"no sample was written: {records} record(s) in the input{top}"
    skipped = records - written
    if skipped > max_skip_fraction * records:
        return (f"{skipped} of {records} records skipped ({skipped / records:.1%}), more than --max-skip-fraction "
                f"{max_skip_fraction:g}{top}; see 'skipped' in manifest.json, or raise --max-skip-fraction")
    return None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def parse_args(argv: list[str] | None) -> Options:
    """Options from the command line (--prefix None: chosen from the input by `default_prefix`).

    An invalid prefix, an --input that is not a file or an --images that is not a folder exits through
    argparse's error (SystemExit 2).
    """
    p = argparse.ArgumentParser(prog="python -m data_tools.shard", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", "--jsonl", dest="input", required=True,
                   help="corpus file: MiniMind-V JSONL, LLaVA JSON/JSONL or MiniMind-V 3v parquet")
    p.add_argument("--format", choices=("auto", *inputs.FORMATS), default="auto",
                   help="input format (default: detected from the file's content)")
    p.add_argument("--images", help="folder the records' image names are relative to (not for parquet)")
    p.add_argument("--out", required=True, help="output folder for shards, indexes and manifest.json")
    p.add_argument("--prefix", help="shard and key prefix, [A-Za-z0-9_-] (default: the input's file stem and "
                                    "the start of its SHA-256, so keys differ across corpora)")
    p.add_argument("--samples-per-shard", type=_positive, default=1000,
                   help="input records per shard (default 1000); a shard holds the samples of its records")
    p.add_argument("--max-shard-bytes", type=_positive, help="also start a new shard before this size")
    p.add_argument("--workers", type=_positive, default=1, help="processes reading and checking records")
    p.add_argument("--resize-max", type=_positive, help="shrink images whose longer side exceeds this (px)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping")
    p.add_argument("--max-skip-fraction", type=_fraction, default=0.1,
                   help="exit 1 when more than this share of the records is skipped (default 0.1)")
    p.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS,
                   help=f"reject images with more pixels, without decoding them (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--full-decode", action="store_true", help="decode every image fully (slower, stricter)")
    p.add_argument("--overwrite", action="store_true", help="delete this tool's files in --out and start over")
    args = p.parse_args(argv)
    if args.prefix is not None and not _PREFIX.match(args.prefix):
        p.error(f"--prefix {args.prefix!r} must be 1-64 characters from [A-Za-z0-9_-] (no dots: keys split on "
                "them)")
    if not os.path.isfile(args.input):
        p.error(f"--input {args.input} is not a file")
    if args.images is not None and not os.path.isdir(args.images):
        p.error(f"--images {args.images} is not a folder")
    return Options(args.input, args.images, args.out, args.prefix, args.samples_per_shard, args.max_shard_bytes,
                   args.workers, args.resize_max, args.strict, args.max_pixels, args.full_decode, args.overwrite,
                   args.format, args.max_skip_fraction)


def main(argv: list[str] | None = None) -> int:
    """Write the shards the flags ask for and print the summary; returns 0, 1 (see `verdict`) or 2 on a
    command or input error (ShardError, InputError, ManifestError), with one line on stderr."""
    opts = parse_args(argv)
    try:
        manifest = shard_corpus(opts)
    except (ShardError, inputs.InputError, mf.ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerDied as e:
        print(f"error: {e}; run the same command again to resume (fewer --workers or a smaller "
              "--samples-per-shard need less memory)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to resume (complete shards in {opts.out} are kept)",
              file=sys.stderr)
        return 130
    print(summary(manifest, opts.out))
    problem = verdict(manifest, opts.max_skip_fraction)
    if problem:
        print(f"error: {opts.input}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

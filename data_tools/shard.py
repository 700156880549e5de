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
so the skips can be inspected); 2 for a command or input error.

Restarts: shards are written under `NAME.tmp` and renamed when complete, and `.shard-progress.json` records
what is complete. Re-running the same command after an interruption resumes after the last complete shard
(shard boundaries depend only on the input and the options, so the result is byte-identical to an
uninterrupted run); a folder holding output of other options or another input is refused (`--overwrite`
starts over). `--workers` only changes the speed: reading and checking run in a process pool, one writer
writes in input order, so the bytes are the same for any worker count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from data_tools import inputs
from data_tools.shard_writer import ShardSink
from data_tools.validate import check_image
from vlm.formats import manifest as mf
from vlm.formats.constants import DEFAULT_MAX_PIXELS
from vlm.formats.errors import BadSample
from vlm.formats.records import read_image

PROGRESS_NAME = ".shard-progress.json"
_SAMPLE_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Files this tool may delete in an output folder (on resume or --overwrite): its shards, indexes, temps.
_OWN_FILE = re.compile(r"^[A-Za-z0-9_-]+-\d{6}\.tar(\.idx\.json)?(\.tmp)?$")


class ShardError(Exception):
    """A problem the user must fix; the message names the flag or file to change."""


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


def _process_batch(cfg: RecordConfig, batch: list[tuple]) -> list[Result]:
    return [process_record(cfg, *item) for item in batch]


@dataclass
class Progress:
    """Everything needed to continue after the last complete shard; saved in PROGRESS_NAME."""

    fingerprint: dict
    next_line: int = 0  # records (JSONL: lines) consumed so far; the next one read is next_line + 1
    next_byte: int = 0  # where reading continues (a byte offset; parquet: a row count)
    input_records: int = 0
    blank_lines: int = 0
    skipped: list | None = None
    shards: list | None = None
    placeholder_images_dropped: int = 0

    def __post_init__(self):
        self.skipped = self.skipped or []
        self.shards = self.shards or []


def ordered_map(fn: Callable, cfg: RecordConfig, items: Iterable, workers: int, batch: int = 32) -> Iterator:
    """fn(cfg, batch) over batches of `items`, results flattened in input order.

    With workers > 1 a process pool runs the batches, at most 2 per worker in flight so memory stays
    bounded when the writer is the slower side. Workers are forked (no interpreter start, no re-imports) when
    that is safe: on Linux, from a process with one thread and without torch loaded (the command line; the
    pool starts every worker at its first task, before the writer's thread exists); else spawned. Neither
    imports webdataset or torch.
    """
    if workers == 1:
        for item in items:
            yield from fn(cfg, [item])
        return
    import multiprocessing  # only a pool needs these (about 10 ms to import)
    import threading
    from concurrent.futures import ProcessPoolExecutor

    forkable = sys.platform == "linux" and threading.active_count() == 1 and "torch" not in sys.modules
    context = multiprocessing.get_context("fork" if forkable else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: deque = deque()
        items = iter(items)
        try:
            while chunk := list(itertools.islice(items, batch)):
                pending.append(pool.submit(fn, cfg, chunk))
                if len(pending) >= 2 * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            pool.shutdown(cancel_futures=True)


def _refuse(outdir: Path, what: str) -> ShardError:
    return ShardError(f"{outdir} {what}; pass --overwrite to delete it and start over, or choose another --out")


def _differences(old: dict, new: dict) -> str:
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def _own_files(outdir: Path) -> list[Path]:
    names = {mf.MANIFEST_NAME, mf.MANIFEST_NAME + ".tmp", PROGRESS_NAME, PROGRESS_NAME + ".tmp"}
    return sorted(p for p in outdir.iterdir() if p.name in names or _OWN_FILE.match(p.name))


def prepare_outdir(opts: Options, fingerprint: dict) -> Progress | None:
    """Progress to continue from (fresh or resumed), or None when the folder already holds this exact output."""
    outdir = Path(opts.out)
    outdir.mkdir(parents=True, exist_ok=True)
    if opts.overwrite:
        for path in _own_files(outdir):
            path.unlink()
    if (outdir / mf.MANIFEST_NAME).exists():
        old = _read_own_json(outdir, mf.MANIFEST_NAME)
        source = old.get("source") if isinstance(old.get("source"), dict) else {}
        if old.get("args") != fingerprint["args"] or source.get("sha256") != fingerprint["input_sha256"]:
            diff = _differences(old.get("args") or {}, fingerprint["args"]) or "the input's content differs"
            raise _refuse(outdir, f"already holds a complete shard set made differently ({diff})")
        return None
    if not (outdir / PROGRESS_NAME).exists():
        if _own_files(outdir):
            raise _refuse(outdir, "holds shard files without a manifest or progress record")
        return Progress(fingerprint)
    return _resume(outdir, fingerprint)


def _read_own_json(outdir: Path, name: str) -> dict:
    try:
        data = json.loads((outdir / name).read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _refuse(outdir, f"has an unreadable {name} ({e})") from e
    if not isinstance(data, dict):
        raise _refuse(outdir, f"has a {name} that is not a JSON object")
    return data


def _resume(outdir: Path, fingerprint: dict) -> Progress:
    """The recorded progress of an interrupted run of the same command, with its unfinished files removed."""
    try:
        progress = Progress(**_read_own_json(outdir, PROGRESS_NAME))
    except TypeError as e:
        raise _refuse(outdir, f"has a {PROGRESS_NAME} from another version of this tool ({e})") from e
    if progress.fingerprint != fingerprint:
        diff = _differences(progress.fingerprint.get("args") or {}, fingerprint["args"]) or \
            "the input's content or the images folder differs"
        raise _refuse(outdir, f"holds an interrupted run made differently ({diff})")
    done = {entry["name"] for entry in progress.shards} | {entry["index"] for entry in progress.shards}
    for entry in progress.shards:
        path = outdir / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise _refuse(outdir, f"has lost or changed {entry['name']} since it was completed")
    for path in _own_files(outdir):
        if path.name not in done and path.name != PROGRESS_NAME:
            path.unlink()  # a shard that was being written when the run stopped; it is redone from its start
    return progress


def _save_progress(outdir: Path, progress: Progress) -> None:
    mf.write_bytes_atomic(outdir / PROGRESS_NAME, mf.dumps(asdict(progress)))


class _Writer:
    """Assigns samples to shards in input order and keeps `progress` at the last complete shard."""

    def __init__(self, opts: Options, prefix: str, progress: Progress, after_shard: Callable[[int], None] | None):
        self.opts, self.prefix, self.progress, self.after_shard = opts, prefix, progress, after_shard
        self.outdir = Path(opts.out)
        self.sink: ShardSink | None = None
        self.last_sample_state: tuple | None = None  # counters just after the open shard's last sample

    def add(self, result: Result) -> None:
        p = self.progress
        if self.sink is not None and self.opts.max_shard_bytes is not None \
                and self.sink.size_with(result.key, result.members) > self.opts.max_shard_bytes:
            self.close_shard()
        if self.sink is None:
            self.sink = ShardSink(self.outdir, mf.shard_name(self.prefix, len(p.shards)))
        self.sink.add(result.key, result.members, result.line)
        self.last_sample_state = (result.line, result.end_byte, p.input_records, p.blank_lines, len(p.skipped),
                                  p.placeholder_images_dropped)
        if self.sink.samples >= self.opts.samples_per_shard:
            self.close_shard()

    def close_shard(self) -> None:
        if self.sink is None:
            return
        entry = self.sink.finish()
        self.sink = None
        p = self.progress
        line, end_byte, records, blanks, n_skipped, dropped = self.last_sample_state
        # Save the state as of this shard's last sample: a resume re-reads whatever came after it.
        saved = Progress(p.fingerprint, line, end_byte, records, blanks, p.skipped[:n_skipped],
                         p.shards + [entry], dropped)
        _save_progress(self.outdir, saved)
        p.shards.append(entry)
        if self.after_shard is not None:
            self.after_shard(len(p.shards) - 1)

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()
            self.sink = None


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
    progress = prepare_outdir(opts, fingerprint)
    if progress is None:
        print(f"{opts.out} already holds the complete output of this command; nothing to do.")
        return mf.load_manifest(opts.out)
    cfg = RecordConfig(images_root, inputs.input_name(opts.input), fmt, prefix, opts.max_pixels,
                       opts.full_decode, opts.resize_max)
    writer = _Writer(opts, prefix, progress, after_shard)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=progress.next_line, unit="record", desc=prefix, disable=None)
    records = inputs.read_records(opts.input, fmt, progress.next_line, progress.next_byte)
    try:
        for result in ordered_map(_process_batch, cfg, records, opts.workers):
            bar.update(1)
            if result.members is not None:
                progress.input_records += 1
                progress.placeholder_images_dropped += result.placeholder_dropped
                writer.add(result)
            elif result.reason:
                if opts.strict:
                    raise ShardError(f"{opts.input} {inputs.RECORD_UNIT[fmt]} {result.line}: {result.reason}: {result.detail} "
                                     "(drop --strict to skip and count such records instead)")
                progress.input_records += 1
                progress.skipped.append({"line": result.line, "reason": result.reason, "detail": result.detail})
            else:
                progress.blank_lines += 1
        writer.close_shard()
    finally:
        writer.abort()
        bar.close()
    manifest = _build_manifest(opts, fingerprint["args"], fmt, progress, input_sha, input_bytes)
    mf.write_manifest(opts.out, manifest)
    (Path(opts.out) / PROGRESS_NAME).unlink(missing_ok=True)  # absent when no shard was needed
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
    p.add_argument("--samples-per-shard", type=_positive, default=1000, help="samples per shard (default 1000)")
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
    print(summary(manifest, opts.out))
    problem = verdict(manifest, opts.max_skip_fraction)
    if problem:
        print(f"error: {opts.input}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

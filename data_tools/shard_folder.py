"""The sharder's output folder: what it may delete, the progress record of an interrupted run, and the
checks that refuse a folder holding other output (`data_tools.shard` writes the shards themselves)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from vlm.formats import manifest as mf

PROGRESS_NAME = ".shard-progress.json"
OWN_FILE = re.compile(r"^[A-Za-z0-9_-]+-\d{6}(\.tar(\.idx\.json)?(\.tmp)?|\.\d+-\d+\.part\.tmp)$")
"""Names of the files this tool may delete in an output folder (on resume or --overwrite): its shards, indexes,
their temporary names and the workers' uncommitted shards (`shard.part_name`)."""


class ShardError(Exception):
    """A problem the user must fix; the message names the flag or file to change."""


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


def _refuse(outdir: Path, what: str) -> ShardError:
    return ShardError(f"{outdir} {what}; pass --overwrite to delete it and start over, or choose another --out")


def _differences(old: dict, new: dict) -> str:
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def _own_files(outdir: Path) -> list[Path]:
    names = {mf.MANIFEST_NAME, mf.MANIFEST_NAME + ".tmp", PROGRESS_NAME, PROGRESS_NAME + ".tmp"}
    return sorted(p for p in outdir.iterdir() if p.name in names or OWN_FILE.match(p.name))


def prepare_outdir(outdir: Path, overwrite: bool, fingerprint: dict) -> Progress | None:
    """Progress to continue from (fresh, saved at once, or resumed), or None when OUTDIR already holds this
    exact output. `fingerprint`: {"args": the output-shaping options, "input_sha256", "images"}. With
    `overwrite` this tool's files are deleted first. Raises ShardError for a folder holding other output."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in _own_files(outdir):
            path.unlink()
    if (outdir / mf.MANIFEST_NAME).exists():
        old = _read_own_json(outdir, mf.MANIFEST_NAME)
        source = old.get("source") if isinstance(old.get("source"), dict) else {}
        args = old.get("args") if isinstance(old.get("args"), dict) else {}
        earlier = "boundaries" not in args  # made by an earlier version: shards of N samples, equally valid
        same = {**args, "boundaries": fingerprint["args"]["boundaries"]} if earlier else args
        if same != fingerprint["args"] or source.get("sha256") != fingerprint["input_sha256"]:
            diff = _differences(args, fingerprint["args"]) or "the input's content differs"
            raise _refuse(outdir, f"already holds a complete shard set made differently ({diff})")
        if earlier:
            print(f"{outdir} was made by an earlier version of this tool (each shard holds N samples, not the "
                  "samples of N records); it is complete and valid as it is (--overwrite remakes it)")
        return None
    if not (outdir / PROGRESS_NAME).exists():
        if any(OWN_FILE.match(path.name) for path in _own_files(outdir)):
            raise _refuse(outdir, "holds shard files without a manifest or progress record")
        progress = Progress(fingerprint)
        save_progress(outdir, progress)  # from here on the folder is resumable: a kill leaves nothing to refuse
        return progress
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
        if not progress.shards:  # nothing was complete (an early error or interrupt): start afresh
            for path in _own_files(outdir):
                path.unlink()
            progress = Progress(fingerprint)
            save_progress(outdir, progress)
            return progress
        args = progress.fingerprint.get("args") or {}
        diff = _differences(args, fingerprint["args"]) or "the input's content or the images folder differs"
        version = " by an earlier version of this tool" if "boundaries" not in args else ""
        raise _refuse(outdir, f"holds an interrupted run made differently{version} ({diff})")
    done = {entry["name"] for entry in progress.shards} | {entry["index"] for entry in progress.shards}
    for entry in progress.shards:
        path = outdir / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise _refuse(outdir, f"has lost or changed {entry['name']} since it was completed")
    for path in _own_files(outdir):
        if path.name not in done and path.name != PROGRESS_NAME:
            path.unlink()  # a shard that was being written when the run stopped; it is redone from its start
    return progress


def save_progress(outdir: Path, progress: Progress) -> None:
    """Write `progress` to OUTDIR's PROGRESS_NAME atomically (fsynced)."""
    mf.write_bytes_atomic(outdir / PROGRESS_NAME, mf.dumps(asdict(progress)))


def remove_parts(outdir: Path) -> None:
    """Delete the shard files workers wrote and nobody committed (an error, an interrupt, a killed run)."""
    for path in outdir.glob("*.part.tmp"):
        if OWN_FILE.match(path.name):
            path.unlink(missing_ok=True)

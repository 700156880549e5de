"""Shard-set contracts: names, the per-shard index, the manifest, and helpers to read and write them.

A shard folder made by `python -m data_tools.shard --input F [--images D] --out OUTDIR --prefix P` holds:

Shards `{P}-{index:06d}.tar` (index from 0), each holding the samples of `samples_per_shard` N consecutive
input records (records kN+1 .. (k+1)N: fewer samples where records were skipped; `max_shard_bytes` splits a
run into several shards; args `boundaries` is "input_records"; older sets counted N samples), uncompressed tar archives with POSIX ustar headers (no pax
extended headers are needed for these short ASCII names), written by `data_tools.shard_writer` (the bytes `webdataset.TarWriter` writes) with fixed
mtime 0, uid/gid 0, uname/gname "vlm" and mode 0444, so the same input and arguments give the same bytes.
One sample per accepted record, key `{P}_{line:09d}` where line is the record's 1-based number in the input
(the line of a JSONL, the element of a JSON array, the row of a parquet file; prefixes are [A-Za-z0-9_-], so
keys contain no dots). The default prefix is the input's file stem and the first 8 hex digits of its
SHA-256, so corpora that share a file name get different keys. A sample's members, consecutive in the
archive, the same for every input format:

- `KEY.json`: UTF-8 JSON object `{"conversations": [{"role", "content"}, ...], "source": {"file": <input
  basename>, "line": N}, "images": [picture names, in placeholder order: relative paths, or
  `image_bytes[i]` for pictures a parquet row carries], ...extra fields of the record}`.
- `KEY.0.jpg`, `KEY.1.png`, ...: one member per `<image>` placeholder, in order; the extension comes from
  the decoded format (jpg, png, webp, gif, bmp, tif), the bytes are the original file's unless `--resize-max`
  shrank it. Text-only samples have no image members.

Sidecar index `{shard}.idx.json`: `{"keys": [...], "offsets": [...], "sizes": [...]}`, one entry per
sample in archive order: the byte offset of the sample's first tar header and the byte length of its member
group (headers, data and padding). `read_sample_at(shard, offset, size)` reads one sample back.

`OUTDIR/manifest.json` (written last, atomically):
`format` ("vlm-shards/1"), `tool` {name, version}, `args` (the options that shape the output; not
`--workers`; with the resolved `prefix` and input `format`), `source` {input, format (jsonl, json or
parquet), sha256, bytes, images}, `input_records`, `blank_lines`, `placeholder_images_dropped` (MiniMind-V
3v text-only parquet rows: their placeholder picture left out; absent in older manifests), `total_samples`,
`shards` [{name, samples, bytes, sha256, index, index_sha256, first_line, last_line}], `skipped`
[{line, reason, detail}], `skipped_by_reason` {reason: count}.
Invariant: `input_records == total_samples + len(skipped)` and `total_samples == sum(shard samples)`.
Blank (whitespace-only) lines are not records: they are counted in `blank_lines` only.

`load_manifest` / `load_index` read a local folder; `parse_manifest` / `parse_index` check the same bytes
fetched from anywhere else (`vlm.data.remote` fetches them from https:// and s3:// folders), so a manifest or
index read from a URL is held to the same contract. Both are parsed as JSON only: they are data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

FORMAT = "vlm-shards/1"
MANIFEST_NAME = "manifest.json"
INDEX_SUFFIX = ".idx.json"
_SHARD_KEYS = ("name", "samples", "bytes", "sha256", "index", "index_sha256", "first_line", "last_line")
_TOP_KEYS = ("format", "tool", "args", "source", "input_records", "total_samples", "shards", "skipped",
             "skipped_by_reason")


class ManifestError(ValueError):
    """A shard folder, manifest or index that does not follow the contract above."""


def shard_name(prefix: str, index: int) -> str:
    """Shard file name `{prefix}-{index:06d}.tar`, index counted from 0."""
    return f"{prefix}-{index:06d}.tar"


def sample_key(prefix: str, line: int) -> str:
    """Sample key `{prefix}_{line:09d}`, line being the record's 1-based line number in the JSONL."""
    return f"{prefix}_{line:09d}"


def index_name(shard: str) -> str:
    """Name of a shard's sidecar index: the shard's name + `.idx.json`."""
    return shard + INDEX_SUFFIX


def split_member_name(name: str) -> tuple[str, str]:
    """`KEY.0.jpg` -> (`KEY`, `0.jpg`), the way webdataset groups members (key = up to the first dot)."""
    key, dot, suffix = name.partition(".")
    if not dot or not key or not suffix:
        raise ManifestError(f"tar member {name!r} is not KEY.SUFFIX")
    return key, suffix


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dumps(obj: Any, compact: bool = False) -> bytes:
    """The one JSON encoding used for manifests and indexes (key order as built, UTF-8, newline at the end)."""
    if compact:
        return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    return (json.dumps(obj, ensure_ascii=False, indent=1) + "\n").encode("utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to `path.tmp`, fsync, then rename, so readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_manifest(manifest: dict) -> list[str]:
    """Every way `manifest` breaks the contract (empty list when it holds)."""
    if manifest.get("format") != FORMAT:
        return [f"format is {manifest.get('format')!r}, this reader understands {FORMAT!r}"]
    problems = [f"missing field {k!r}" for k in _TOP_KEYS if k not in manifest]
    if problems:
        return problems
    shards, skipped = manifest["shards"], manifest["skipped"]
    if not isinstance(shards, list) or not isinstance(skipped, list) \
            or not all(isinstance(x, dict) for x in shards + skipped):
        return ["'shards' and 'skipped' must be lists of objects"]
    if not all("line" in s and "reason" in s for s in skipped):
        return ["every 'skipped' entry needs 'line' and 'reason'"]
    for i, entry in enumerate(shards):
        missing = [k for k in _SHARD_KEYS if k not in entry]
        if missing:
            problems.append(f"shards[{i}] lacks {missing}")
    if not problems and sum(s["samples"] for s in shards) != manifest["total_samples"]:
        problems.append(f"shard sample counts add up to {sum(s['samples'] for s in shards)}, "
                        f"not total_samples={manifest['total_samples']}")
    if manifest["input_records"] != manifest["total_samples"] + len(skipped):
        problems.append(f"input_records={manifest['input_records']} != total_samples="
                        f"{manifest['total_samples']} + skipped={len(skipped)}")
    by_reason: dict[str, int] = {}
    for s in skipped:
        by_reason[s["reason"]] = by_reason.get(s["reason"], 0) + 1
    if by_reason != manifest["skipped_by_reason"]:
        problems.append(f"skipped_by_reason {manifest['skipped_by_reason']} does not match skipped {by_reason}")
    return problems


def write_manifest(outdir: str | os.PathLike, manifest: dict) -> Path:
    """Check the invariants, then write `outdir/manifest.json` atomically. Raises ManifestError."""
    problems = check_manifest(manifest)
    if problems:
        raise ManifestError("refusing to write an inconsistent manifest: " + "; ".join(problems))
    path = Path(outdir) / MANIFEST_NAME
    write_bytes_atomic(path, dumps(manifest))
    return path


def load_manifest(outdir: str | os.PathLike) -> dict:
    """Read and check `outdir/manifest.json`; raises ManifestError naming the problem."""
    path = Path(outdir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in {outdir}: make the shards with "
                            "`python -m data_tools.shard --jsonl FILE --images DIR --out DIR`")
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(data: bytes, where: str) -> dict:
    """Check the bytes of a manifest read from `where` (a path or URL) and return it; raises ManifestError.

    Only JSON is parsed: the manifest is data, whoever serves it.
    """
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where} does not hold a JSON object")
    problems = check_manifest(manifest)
    if problems:
        raise ManifestError(f"{where}: " + "; ".join(problems))
    return manifest


def load_index(path: str | os.PathLike) -> dict:
    """Read a `{shard}.idx.json` and check its three lists line up; raises ManifestError."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ManifestError(f"cannot read index {path}: {e}") from e
    return parse_index(data, str(path))


def parse_index(data: bytes, where: str) -> dict:
    """Check the bytes of a shard's index read from `where` (a path or URL): three lists of one length, keys
    strings, offsets and sizes non-negative integers. Raises ManifestError."""
    try:
        index = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read index {where}: {e}") from e
    if not isinstance(index, dict) or not all(isinstance(index.get(k), list)
                                              for k in ("keys", "offsets", "sizes")):
        raise ManifestError(f"index {where} must hold lists 'keys', 'offsets' and 'sizes'")
    if not len(index["keys"]) == len(index["offsets"]) == len(index["sizes"]):
        raise ManifestError(f"index {where}: keys, offsets and sizes differ in length")
    if not all(isinstance(k, str) for k in index["keys"]) or not all(
            type(n) is int and n >= 0 for n in index["offsets"] + index["sizes"]):
        raise ManifestError(f"index {where}: keys must be strings, offsets and sizes non-negative integers")
    return index


def read_sample_at(shard_path: str | os.PathLike, offset: int, size: int) -> dict[str, bytes]:
    """Members of the sample stored at `offset` (its first header) spanning `size` bytes: {name: bytes}.

    Raises ManifestError when the bytes there are not exactly one sample's complete member group.
    """
    with open(shard_path, "rb") as f:
        f.seek(offset)
        chunk = f.read(size)
    if len(chunk) != size:
        raise ManifestError(f"{shard_path}: {size} bytes at offset {offset} run past the end of the file")
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    raise ManifestError(f"{shard_path}@{offset}: member {info.name!r} is not a regular file")
                members[info.name] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError) as e:
        raise ManifestError(f"{shard_path}@{offset}: no complete tar member group there ({e})") from e
    keys = {split_member_name(name)[0] for name in members}
    if len(keys) != 1:
        raise ManifestError(f"{shard_path}@{offset}: expected one sample's members, found keys {sorted(keys)}")
    return members

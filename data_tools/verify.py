"""Check a shard folder against its manifest: checksums, sample counts and every index offset.

    python -m data_tools.verify data/shards/sft

Exit status 0 when everything matches, 1 with a list of mismatches, 2 when the manifest itself is missing
or broken. Reads every shard twice (hash, then one read per sample through its index offset).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlm.formats import manifest as mf

_END_OF_ARCHIVE = 1024  # two zero blocks


def verify_shard(outdir: Path, entry: dict, prefix: str) -> list[str]:
    """Problems with one shard entry of the manifest (empty when it matches)."""
    name = entry["name"]
    path, index_path = outdir / name, outdir / entry["index"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
    digest = mf.sha256_file(path)
    if digest != entry["sha256"]:
        problems.append(f"{name}: sha256 {digest}, manifest says {entry['sha256']}")
    if not index_path.is_file():
        return problems + [f"{entry['index']}: missing"]
    index_digest = mf.sha256_file(index_path)
    if index_digest != entry["index_sha256"]:
        problems.append(f"{entry['index']}: sha256 {index_digest}, manifest says {entry['index_sha256']}")
    try:
        index = mf.load_index(index_path)
    except mf.ManifestError as e:
        return problems + [str(e)]
    if len(index["keys"]) != entry["samples"]:
        problems.append(f"{entry['index']}: {len(index['keys'])} samples, manifest says {entry['samples']}")
    return problems + _verify_offsets(path, index, size, entry, prefix)


def _verify_offsets(path: Path, index: dict, size: int, entry: dict, prefix: str) -> list[str]:
    """Each index entry must start exactly where the previous ended and hold exactly its sample's members."""
    problems, expected_offset, lines = [], 0, []
    for key, offset, length in zip(index["keys"], index["offsets"], index["sizes"]):
        where = f"{path.name}: sample {key} at offset {offset}"
        if offset != expected_offset:
            problems.append(f"{where}: expected offset {expected_offset} (samples must be contiguous)")
        expected_offset = offset + length
        try:
            members = mf.read_sample_at(path, offset, length)
        except mf.ManifestError as e:
            problems.append(f"{where}: {e}")
            continue
        found = {mf.split_member_name(name)[0] for name in members}
        if found != {key}:
            problems.append(f"{where}: holds members of {sorted(found)}")
            continue
        try:
            line = json.loads(members[key + ".json"])["source"]["line"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{where}: no readable {key}.json with source.line")
            continue
        if key != mf.sample_key(prefix, line):
            problems.append(f"{where}: key does not match source line {line}")
        lines.append(line)
    if expected_offset + _END_OF_ARCHIVE > size:
        problems.append(f"{path.name}: index runs to byte {expected_offset}, past the archive's end")
    elif any(_tail(path, expected_offset)):
        problems.append(f"{path.name}: data after the last indexed sample (byte {expected_offset})")
    if lines and (lines[0], lines[-1]) != (entry["first_line"], entry["last_line"]):
        problems.append(f"{path.name}: lines {lines[0]}..{lines[-1]}, manifest says "
                        f"{entry['first_line']}..{entry['last_line']}")
    return problems


def _tail(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def verify(outdir: str | Path) -> list[str]:
    """Every mismatch between the folder and its manifest; raises ManifestError if the manifest is unusable."""
    outdir = Path(outdir)
    manifest = mf.load_manifest(outdir)
    prefix = manifest["args"]["prefix"]
    problems = []
    for i, entry in enumerate(manifest["shards"]):
        if entry["name"] != mf.shard_name(prefix, i):
            problems.append(f"shards[{i}] is named {entry['name']}, expected {mf.shard_name(prefix, i)}")
        problems += verify_shard(outdir, entry, prefix)
    return problems


def main(argv: list[str] | None = None) -> int:
    """Check a shard folder against its manifest and print the outcome.

    Returns 0 when everything matches, 1 when there are mismatches (listed on stderr), 2 when the manifest
    cannot be used.
    """
    parser = argparse.ArgumentParser(prog="python -m data_tools.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="folder holding manifest.json and the shards")
    args = parser.parse_args(argv)
    try:
        problems = verify(args.outdir)
    except mf.ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if problems:
        print(f"FAILED: {len(problems)} mismatch(es) in {args.outdir}:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    manifest = mf.load_manifest(args.outdir)
    print(f"OK: {len(manifest['shards'])} shard(s), {manifest['total_samples']} sample(s) in {args.outdir} "
          "match manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One WebDataset tar shard being written: members in order, offsets and sizes for the index, a running hash.

The shard layout (names, keys, members, index files) is specified in `vlm.formats.manifest`; this module only
writes the bytes. Output is deterministic: fixed owner, mode and mtime, so identical samples give identical
shards whatever process wrote them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vlm.formats import manifest as mf

_TAR_BLOCK, _TAR_RECORD = 512, 20 * 512  # tarfile pads the closed archive to whole records


class _HashingFile:
    """Write-through file wrapper counting bytes and hashing them, so a shard is never read back to hash."""

    def __init__(self, f):
        self.f, self.digest, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self.f.write(data)


class ShardSink:
    """One shard being written under NAME.tmp; `finish` renames it and writes its index."""

    def __init__(self, outdir: Path, name: str):
        # webdataset imports torch (about a second); only the writing process needs it.
        from webdataset import TarWriter

        self.outdir, self.name = outdir, name
        self.tmp = outdir / (name + ".tmp")
        self.file = open(self.tmp, "wb", buffering=1 << 20)  # tarfile writes 10 KiB records; batch them
        self.hashing = _HashingFile(self.file)
        # Fixed owner, mode and mtime: identical input and options give identical bytes.
        self.tar = TarWriter(self.hashing, encoder=False, user="vlm", group="vlm", mode=0o444, mtime=0)
        self.keys: list[str] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.lines: list[int] = []

    @property
    def samples(self) -> int:
        """Samples added to this shard so far."""
        return len(self.keys)

    def size_with(self, key: str, members: dict) -> int:
        """Final file size if this sample were added and the shard then closed."""
        tail = sum(_TAR_BLOCK + -(-len(v) // _TAR_BLOCK) * _TAR_BLOCK for v in members.values())
        end = self.tar.tarstream.offset + tail + 2 * _TAR_BLOCK  # two zero blocks end the archive
        return -(-end // _TAR_RECORD) * _TAR_RECORD

    def add(self, key: str, members: dict, line: int) -> None:
        """Append one sample's members to the tar; record its key, offset and size (bytes) and JSONL line."""
        start = self.tar.tarstream.offset
        self.tar.write({"__key__": key, **members})
        self.keys.append(key)
        self.offsets.append(start)
        self.sizes.append(self.tar.tarstream.offset - start)
        self.lines.append(line)

    def finish(self) -> dict:
        """Close, fsync and rename the shard, write its index; returns the manifest's shard entry."""
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.outdir / self.name)
        index = mf.dumps({"keys": self.keys, "offsets": self.offsets, "sizes": self.sizes}, compact=True)
        mf.write_bytes_atomic(self.outdir / mf.index_name(self.name), index)
        return {"name": self.name, "samples": self.samples, "bytes": self.hashing.bytes,
                "sha256": self.hashing.digest.hexdigest(), "index": mf.index_name(self.name),
                "index_sha256": hashlib.sha256(index).hexdigest(),
                "first_line": self.lines[0] if self.lines else None, "last_line": self.lines[-1] if self.lines else None}

    def abort(self) -> None:
        """Close and delete the unfinished NAME.tmp; no index is written."""
        self.tar.close()  # otherwise its stream flushes into the closed file when garbage-collected
        self.file.close()
        self.tmp.unlink(missing_ok=True)

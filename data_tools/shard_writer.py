"""One WebDataset tar shard being written: members in order, offsets and sizes for the index, a running hash.

The shard layout (names, keys, members, index files) is specified in `vlm.formats.manifest`; this module only
writes the bytes. Output is deterministic: fixed owner, mode and mtime, so identical samples give identical
shards whatever process wrote them.

The tar bytes are built here with the standard library alone, so the sharder never imports webdataset (which
imports torch: about a second per process). They are the bytes `webdataset.TarWriter(encoder=False, user="vlm",
group="vlm", mode=0o444, mtime=0)` writes through `tarfile` (POSIX.1-2001 format): a sample's members sorted
by suffix, each a 512-byte ustar header, its data and zero padding to 512 bytes; a name that is not ASCII or is
longer than 100 characters gets a pax extended header (`path=`) first, as tarfile writes it; two zero blocks
end the archive, which is padded to a whole 10 KiB record. The layout is fixed here rather than taken from
the running `tarfile`; `tests/data_tools/test_shard_writer.py` compares it with tarfile's and webdataset's.
A thread hashes and writes the bytes while the caller prepares the next samples (`_BackgroundFile`).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from pathlib import Path

from vlm.formats import manifest as mf

_BLOCK, _RECORD = 512, 20 * 512  # tar block; tarfile pads the closed archive to whole 10 KiB records
_NAME_FIELD = 100  # bytes of the ustar name field
_MAX_SIZE = 8**11  # sizes from here on do not fit the 11 octal digits of the size field
_USER = b"vlm"  # uname and gname; uid, gid and mtime are 0
_MODE = 0o444


def _ustar_header(name: bytes, size: int, typeflag: bytes = b"0", mode: int = _MODE, owner: bytes = _USER) -> bytes:
    """One 512-byte ustar header block, field for field as tarfile writes it (devmajor/devminor empty)."""
    head = (name[:_NAME_FIELD].ljust(_NAME_FIELD, b"\0") + b"%07o\0" % mode + b"0000000\0" * 2
            + b"%011o\0" % size + b"00000000000\0")
    tail = typeflag + bytes(100) + b"ustar\x0000" + owner.ljust(32, b"\0") * 2 + bytes(16 + 155 + 12)
    # The checksum is the byte sum of the header with its own 8-byte field counted as spaces (8 * 32).
    return head + b"%06o\0 " % (sum(head) + sum(tail) + 8 * 32) + tail


_FILE_MODE_IDS = b"%07o\0" % _MODE + b"0000000\0" * 2  # mode, uid, gid of every member
_FILE_TAIL = _ustar_header(b"", 0)[156:]  # everything after the checksum field of a member's header
_FILE_TAIL_SUM = sum(_FILE_TAIL) + 8 * 32


def _pax_header(name: str) -> bytes:
    """The pax extended header (header block plus padded `path` record) tarfile puts before a long name."""
    value = name.encode("utf-8")
    length = len(value) + len(" path=\n")
    digits = len(str(length))
    digits = len(str(length + digits))  # the record's length counts its own decimal digits
    record = b"%d path=%s\n" % (length + digits, value)
    padded = record + bytes(-len(record) % _BLOCK)
    return _ustar_header(b"././@PaxHeader", len(record), typeflag=b"x", mode=0, owner=b"") + padded


def member_header(name: str, size: int) -> bytes:
    """Header bytes of one regular file member NAME of SIZE bytes: one block, or pax header + block."""
    if size >= _MAX_SIZE or size < 0:
        raise ValueError(f"tar member {name!r} has {size} bytes; a shard member must be under 8 GiB")
    if name.isascii() and len(name) <= _NAME_FIELD:
        raw = name.encode("ascii")
        fields = _FILE_MODE_IDS + b"%011o\0" % size + b"00000000000\0"
        return raw.ljust(_NAME_FIELD, b"\0") + fields + b"%06o\0 " % (sum(raw) + sum(fields) + _FILE_TAIL_SUM) \
            + _FILE_TAIL
    # tarfile's ustar field for such a name: ASCII with "?" for other characters, cut at 100 bytes.
    return _pax_header(name) + _ustar_header(name.encode("ascii", "replace"), size)


def _member_bytes(name: str, size: int) -> int:
    return (_BLOCK if name.isascii() and len(name) <= _NAME_FIELD else len(member_header(name, 0))) \
        + -(-size // _BLOCK) * _BLOCK


class _BackgroundFile:
    """Hashes and writes chunks, in order, on one thread, so the copy into the page cache and SHA-256 (both
    release the GIL) overlap with reading and checking the next samples. Chunks go over in batches of about
    1 MiB (a hand-over per sample would cost more than it saves), at most `_IN_FLIGHT` batches waiting."""

    _BATCH, _IN_FLIGHT = 1 << 20, 4

    def __init__(self, path: Path):
        self.file = open(path, "wb")  # chunks above the 8 KiB buffer go straight to the OS, not copied
        self.digest, self.bytes = hashlib.sha256(), 0
        self.batch: list[bytes] = []
        self.batch_bytes = 0
        self.error: BaseException | None = None  # the writing thread's first failure, raised in the caller's
        self.todo: queue.Queue[list[bytes] | None] = queue.Queue(self._IN_FLIGHT)  # None ends the thread
        # A daemon: a sink left open (a crash) must not keep the interpreter from exiting.
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()
        self.closed = False

    def write(self, chunk: bytes) -> None:
        """Queue CHUNK; it reaches the file after every chunk written before it."""
        self.bytes += len(chunk)
        self.batch.append(chunk)
        self.batch_bytes += len(chunk)
        if self.batch_bytes >= self._BATCH:
            self._hand_over()

    def _hand_over(self) -> None:
        if self.error is not None:
            raise self.error
        if self.batch:
            self.todo.put(self.batch)  # waits while _IN_FLIGHT batches are queued: memory stays bounded
            self.batch, self.batch_bytes = [], 0

    def _run(self) -> None:
        while (batch := self.todo.get()) is not None:
            if self.error is not None:
                continue  # after a failure only drain: the caller raises it at its next hand-over or at close
            try:
                data = b"".join(batch)  # one hash update and one write per batch: each needs the GIL back
                self.digest.update(data)
                self.file.write(data)
            except BaseException as e:  # handed to the caller's thread
                self.error = e

    def close(self, sync: bool, fsync: bool = True) -> None:
        """Close the file once everything queued is written. With SYNC, fsync it first (unless not FSYNC: the
        caller makes it durable later) and raise the first failed write; without (a shard being aborted),
        failures are ignored. A second call does nothing."""
        if self.closed:
            return
        self.closed = True
        try:
            if sync:
                self._hand_over()
        finally:
            self.todo.put(None)
            self.thread.join()
            try:
                if sync and self.error is not None:
                    raise self.error
                if sync:
                    self.file.flush()
                    if fsync:
                        os.fsync(self.file.fileno())
            finally:
                try:
                    self.file.close()  # flushes the last bytes of the buffer
                except OSError:
                    if sync:
                        raise


class ShardSink:
    """One shard being written under NAME.tmp; `finish` renames it and writes its index (or `close` now and
    `commit` later, under another name: the sharder's workers write shards whose final number is not yet known)."""

    def __init__(self, outdir: Path, name: str):
        self.outdir, self.name = Path(outdir), name
        self.tmp = self.outdir / (name + ".tmp")
        self.out = _BackgroundFile(self.tmp)
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
        tail = sum(_member_bytes(f"{key}.{suffix}", len(data)) for suffix, data in members.items())
        end = self.out.bytes + tail + 2 * _BLOCK  # two zero blocks end the archive
        return -(-end // _RECORD) * _RECORD

    def add(self, key: str, members: dict, line: int) -> None:
        """Append one sample's members (suffix -> bytes, written sorted by suffix as webdataset does) to the
        tar; record its key, offset and size (bytes) and JSONL line."""
        parts = []
        for suffix in sorted(members):
            data = members[suffix]
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError(f"member {key}.{suffix} is {type(data).__name__}, not bytes")
            parts += (member_header(f"{key}.{suffix}", len(data)), data, bytes(-len(data) % _BLOCK))
        chunk = b"".join(parts)  # one hash update and one write per sample, on the writing thread
        self.keys.append(key)
        self.offsets.append(self.out.bytes)
        self.sizes.append(len(chunk))
        self.lines.append(line)
        self.out.write(chunk)

    def close(self, fsync: bool = True) -> tuple[dict, bytes]:
        """End the archive, close and (with FSYNC) fsync the file, still under its temporary name (`tmp`);
        returns the manifest's shard entry without `name` and `index`, and the index file's bytes (see
        `commit`, which fsyncs a file closed without)."""
        end = self.out.bytes + 2 * _BLOCK
        self.out.write(bytes(2 * _BLOCK + -end % _RECORD))
        self.out.close(sync=True, fsync=fsync)
        index = mf.dumps({"keys": self.keys, "offsets": self.offsets, "sizes": self.sizes}, compact=True)
        entry = {"samples": self.samples, "bytes": self.out.bytes, "sha256": self.out.digest.hexdigest(),
                 "index_sha256": hashlib.sha256(index).hexdigest(),
                 "first_line": self.lines[0] if self.lines else None,
                 "last_line": self.lines[-1] if self.lines else None}
        return entry, index

    def finish(self) -> dict:
        """Close, fsync and rename the shard, write its index; returns the manifest's shard entry."""
        entry, index = self.close(fsync=False)  # commit syncs it
        return commit(self.outdir, self.tmp.name, self.name, entry, index)

    def abort(self) -> None:
        """Close and delete the unfinished NAME.tmp; no index is written."""
        self.out.close(sync=False)
        self.tmp.unlink(missing_ok=True)


def commit(outdir: Path, tmp_name: str, name: str, entry: dict, index: bytes) -> dict:
    """Rename the closed shard file `tmp_name` in OUTDIR to NAME and write its index beside it (atomically);
    returns `entry` with `name` and `index` set, in the manifest's key order. The bytes of a shard and of
    its index do not contain its name, so a shard written under a temporary name is final once renamed."""
    outdir = Path(outdir)
    fd = os.open(outdir / tmp_name, os.O_RDONLY)
    try:
        os.fsync(fd)  # once more costs nothing for a file already synced; a worker's shard is synced here
    finally:
        os.close(fd)
    os.replace(outdir / tmp_name, outdir / name)
    mf.write_bytes_atomic(outdir / mf.index_name(name), index)
    return {"name": name, "samples": entry["samples"], "bytes": entry["bytes"], "sha256": entry["sha256"],
            "index": mf.index_name(name), **{k: entry[k] for k in ("index_sha256", "first_line", "last_line")}}

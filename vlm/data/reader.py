"""Reading samples out of tar shards, and the allow-list decoder that turns their members into a record.

    from vlm.data.reader import ShardReader, decode_members
    reader = ShardReader(sources.shards)             # global sample id -> bytes, by seeking into the tar
    key, members = reader.read(17)                   # {"json": b"...", "0.jpg": b"..."}
    record = decode_members(key, members)            # {"__key__", "conversations", "images": [bytes, ...]}

Safety. Only the `json` member is decoded (UTF-8, `json.loads`; `txt` is allowed but unused), and image members
(jpg, jpeg, png, webp, bmp, gif, tif, tiff) are kept as bytes for `vlm.data.image`, which checks the pixel
limit from the header before decoding. Every other member (`.pyd`, `.pickle`, `.pth`, `.npy`, ...) is
ignored: nothing here unpickles, and webdataset's own decoders (which do) are never used. Streams without a
manifest go through webdataset only to iterate and group tar members (`iter_stream`), then the same decoder.

Remote shards. A shard folder at an `https://` or `s3://` URL (`vlm.data.sources`) is read the same way, through
`vlm.data.remote`: a shard's index is fetched whole on first use (and checked against the manifest's
`index_sha256`), then each sample by one ranged GET of its bytes. A read that still fails after the last retry
is a `BadSample("remote_read_failed")`: skipped and counted like any bad sample, under data.max_bad_fraction.

Failures that concern one sample (a corrupt tar member group, broken JSON, misnumbered images) raise
`BadSample`, so the pipeline skips and counts them; a missing or inconsistent index is a broken shard folder
and raises `ManifestError`. Indexes are cached per process, at most `max_indexes` of them (least recently
used out first), so a worker's memory does not grow with the number of shards it has touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from vlm.data.remote import RemoteError, RemoteSettings, RemoteStore, is_remote
from vlm.data.sources import ShardInfo
from vlm.formats.constants import IMAGE_EXTENSIONS
from vlm.formats.errors import BadSample
from vlm.formats.manifest import ManifestError, parse_index


def split_tar_members(data: bytes, where: str) -> dict[str, bytes]:
    """{member name: bytes} of one sample's member group (tar headers + data); BadSample if corrupt."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if info.isfile():  # links, devices and folders are never followed or extracted
                    members[info.name] = tar.extractfile(info).read()
            # tarfile stops quietly at a damaged header after the first: the group must be read to its end.
            if tar.offset != len(data):
                raise BadSample("tar_corrupt", f"{where}: members end at byte {tar.offset} of {len(data)}")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BadSample("tar_corrupt", f"{where}: {err}") from err
    if not members:
        raise BadSample("tar_corrupt", f"{where}: no member found")
    return members


class ShardReader:
    """Picklable: global sample id -> (key, {suffix: bytes}) for the shards of manifest sources.

    Ids number the samples of `shards` in order. Indexes load on first use (at most `max_indexes` kept) and
    file handles stay open (at most `max_open`), so a worker touches only the shards of its own chunks.
    Shards at URLs are read through a `RemoteStore` with `remote`'s timeout and retries.
    """

    def __init__(self, shards: Sequence[ShardInfo], max_open: int = 16, max_indexes: int = 64,
                 remote: RemoteSettings | None = None):
        self.shards = tuple(shards)
        self.max_open, self.max_indexes, self.remote = max_open, max(1, max_indexes), remote
        self._first = np.cumsum([0] + [s.samples for s in self.shards])
        self._indexes: OrderedDict[int, dict] = OrderedDict()
        self._files: OrderedDict[int, int] = OrderedDict()
        self._store = RemoteStore(remote) if any(is_remote(s.path) for s in self.shards) else None

    def __getstate__(self) -> dict:
        # Open descriptors, connections and loaded indexes stay in the process that made them.
        return {"shards": self.shards, "max_open": self.max_open, "max_indexes": self.max_indexes,
                "remote": self.remote}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["shards"], state["max_open"], state["max_indexes"], state["remote"])

    def __len__(self) -> int:
        return int(self._first[-1])

    def locate(self, sample_id: int) -> tuple[int, int]:
        """(shard number, sample number in that shard)."""
        if not 0 <= sample_id < len(self):
            raise IndexError(f"sample id {sample_id} outside 0..{len(self) - 1}")
        shard = int(np.searchsorted(self._first, sample_id, side="right")) - 1
        return shard, int(sample_id - self._first[shard])

    def key(self, sample_id: int) -> str:
        """The key of sample `sample_id`, from its shard's index (the tar is not read).

        Raises IndexError for an id out of range, ManifestError for an index that disagrees with the manifest,
        and BadSample("remote_read_failed") for a remote index that could not be fetched.
        """
        shard, i = self.locate(sample_id)
        return self._index(shard)["keys"][i]

    def read(self, sample_id: int) -> tuple[str, dict[str, bytes]]:
        """(key, {suffix: bytes}): read only the sample's member group (a seek, or one ranged GET)."""
        shard, i = self.locate(sample_id)
        index = self._index(shard)
        key, offset, size = index["keys"][i], index["offsets"][i], index["sizes"][i]
        where = f"{self.shards[shard].name}@{offset} ({key})"
        if self._store is not None and is_remote(self.shards[shard].path):
            try:
                data = self._store.get_range(self.shards[shard].path, offset, size)
            except RemoteError as err:
                raise BadSample("remote_read_failed", f"{where}: {err}") from None
        else:
            data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise BadSample("tar_corrupt", f"{where}: {size} bytes wanted, the file ends after {len(data)}")
        members = {}
        for name, value in split_tar_members(data, where).items():
            member_key, dot, suffix = name.partition(".")
            if member_key != key or not dot:
                raise BadSample("tar_corrupt", f"{where}: member {name!r} does not belong to sample {key}")
            members[suffix] = value
        return key, members

    def cached_indexes(self) -> int:
        """Shard indexes held in memory by this process (at most `max_indexes`)."""
        return len(self._indexes)

    def _index(self, shard: int) -> dict:
        index = self._indexes.get(shard)
        if index is not None:
            self._indexes.move_to_end(shard)
            return index
        info = self.shards[shard]
        index = parse_index(self._index_bytes(info), info.index_path)
        if len(index["keys"]) != info.samples:
            raise ManifestError(f"{info.index_path} lists {len(index['keys'])} samples, the manifest says "
                                f"{info.samples}; check the folder with `python -m data_tools.verify`")
        if len(self._indexes) >= self.max_indexes:
            self._indexes.popitem(last=False)
        self._indexes[shard] = index
        return index

    def _index_bytes(self, info: ShardInfo) -> bytes:
        """The index file's bytes, checked against the manifest's index_sha256 when it lists one."""
        if self._store is not None and is_remote(info.index_path):
            try:
                data = self._store.get(info.index_path)
            except RemoteError as err:  # not cached: the next sample of this shard tries again
                raise BadSample("remote_read_failed", f"index of {info.name}: {err}") from None
        else:
            try:
                with open(info.index_path, "rb") as f:
                    data = f.read()
            except OSError as err:
                raise ManifestError(f"cannot read index {info.index_path}: {err}") from err
        if info.index_sha256 and hashlib.sha256(data).hexdigest() != info.index_sha256:
            raise ManifestError(f"{info.index_path}: its sha256 differs from the manifest's index_sha256; check "
                                "the folder with `python -m data_tools.verify`")
        return data

    def _fd(self, shard: int) -> int:
        fd = self._files.get(shard)
        if fd is not None:
            self._files.move_to_end(shard)
            return fd
        if len(self._files) >= self.max_open:
            os.close(self._files.popitem(last=False)[1])
        fd = self._files[shard] = os.open(self.shards[shard].path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        """Close every open shard file and connection; a later read opens them again."""
        while self._files:
            os.close(self._files.popitem()[1])
        if self._store is not None:
            self._store.close()


def decode_members(key: str, members: dict[str, bytes]) -> dict[str, Any]:
    """Allow-list decoding: {suffix: bytes} -> {"__key__", "conversations", "images": [bytes, ...], "record"}.

    Images are `0.jpg`, `1.png`, ... in placeholder order (a lone `jpg` counts as image 0). Members of any
    other type are ignored without being decoded.
    """
    record, images = None, {}
    for suffix, data in members.items():
        lower = suffix.lower()
        stem, _, ext = lower.rpartition(".")
        if lower == "json":
            record = _json(key, data)
        elif ext in IMAGE_EXTENSIONS:
            index = stem or "0"
            if not index.isdigit() or int(index) in images:
                raise BadSample("image_members", f"{key}: image member {suffix!r} is not N.ext or repeats N")
            images[int(index)] = data
        # Every other member (txt included, which this trainer does not use) is left undecoded.
    if record is None:
        raise BadSample("missing_json", f"{key}: no .json member with the conversations")
    if sorted(images) != list(range(len(images))):
        raise BadSample("image_members", f"{key}: image members numbered {sorted(images)}, expected 0..n-1")
    listed = record.get("images")
    if isinstance(listed, list) and len(listed) != len(images):
        raise BadSample("image_members", f"{key}: json lists {len(listed)} images, the sample has {len(images)}")
    return {"__key__": key, "conversations": record.get("conversations"),
            "images": [images[i] for i in range(len(images))], "record": record}


def _json(key: str, data: bytes) -> dict:
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadSample("bad_json", f"{key}: {err}") from err
    if not isinstance(record, dict):
        raise BadSample("bad_json", f"{key}: the json member is a {type(record).__name__}, not an object")
    return record


def iter_stream(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for every sample of one tar stream (local path, URL or pipe:), in tar order.

    webdataset opens the stream and groups members by key; nothing is decoded here. A broken stream raises
    whatever the tar reader raises (tarfile.TarError, OSError, ValueError); the caller counts it.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    files = tar_file_expander(url_opener([{"url": url}]))
    for sample in group_by_keys(files):
        key = sample.pop("__key__")
        members = {k: v for k, v in sample.items() if not (k.startswith("__") and k.endswith("__"))}
        yield key, members


class StreamError(RuntimeError):
    """Resampled mode found nothing readable; the message names the last shard tried."""


def resampled_stream(urls: Sequence[str], probs: np.ndarray, rng: np.random.Generator,
                     max_empty: int = 20) -> Iterator[dict | BadSample]:
    """Endless samples from shards drawn at random with probabilities `probs` (resampled mode).

    Yields {"__key__", "members"} per sample, or a `BadSample("stream_error")` when a shard breaks off
    (counted like any bad sample; the next shard is drawn). `max_empty` shards in a row without a sample
    raise StreamError: the sources are wrong, not merely damaged.
    """
    empty = 0
    while True:
        url = urls[int(rng.choice(len(urls), p=probs))]
        got = 0
        try:
            for key, members in iter_stream(url):
                got += 1
                yield {"__key__": key, "members": members}
        except (tarfile.TarError, OSError, ValueError, EOFError) as err:
            yield BadSample("stream_error", f"{url}: {err!r}")
        empty = 0 if got else empty + 1
        if empty >= max_empty:
            raise StreamError(f"{max_empty} shards in a row gave no sample (last: {url}); check data.train_shards")

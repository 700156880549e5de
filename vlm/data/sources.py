"""Training sources: shard folders with a manifest, or tar streams webdataset can open, mixed with weights.

    from vlm.data.sources import resolve_sources
    sources = resolve_sources(["data/shards/pretrain", "data/shards/sft"], weights=[1.0, 0.5])
    sources.exact           # True: every source has a manifest; the epoch is planned sample by sample

A source string is one of:
- a folder holding `manifest.json` (made by `python -m data_tools.shard`): sample counts and byte offsets
  are known, so epochs are planned exactly (every sample once, seekable reads; see `vlm.data.plan`);
- the same folder in object storage, `https://host/path/sft` or `s3://bucket/prefix/sft` (a URL without a
  brace pattern that does not end in .tar): its `manifest.json` is fetched from there, and the reader fetches
  each shard's index on first use and each sample by a ranged GET (`vlm.data.remote`, `vlm.data.reader`);
- a brace pattern or path of local tar files (`data/shards/x/x-{000000..000009}.tar`), an `http(s)://`
  URL pattern or .tar URL, or a `pipe:` command, as webdataset understands them: no counts are known, so the
  run uses the resampled mode (see `vlm.data.pipeline`): shards drawn at random, `data.samples_per_epoch`.

Scale. Opening sources reads each `manifest.json` only (per-shard counts and sizes: O(shards)); the
per-sample offsets stay in the shards' index files, which only the reader of a shard loads. Local shard
and index files are checked to exist (a stat each); remote ones are not probed (a request per shard).

Weights. With manifests, a source's weight multiplies its samples per epoch: 1 = each sample once,
0.5 = a fresh random half each epoch, 2 = every sample twice; the mixed epoch is then chunk-shuffled as one.
In the resampled mode a shard of a source with weight w is drawn w times as often as one of weight 1.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.shardlists import expand_urls

from vlm.data.remote import RemoteError, RemoteSettings, RemoteStore, is_remote, join_url, require_s3_client
from vlm.formats.manifest import MANIFEST_NAME, ManifestError, load_manifest, parse_manifest

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # what data_tools.shard writes: {prefix}-{n:06d}.tar
_STREAM_SCHEMES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://", "hf://", "sftp://", "scp://")


class SourceError(ValueError):
    """A training or eval source that cannot be used; the message names the source and the setting."""


@dataclass(frozen=True)
class ShardInfo:
    """One tar of a manifest source: where it and its index are, how many samples it holds."""

    path: str
    index_path: str
    samples: int
    name: str
    sha256: str
    index_sha256: str = ""  # checked when the index is loaded; "" = not checked


@dataclass(frozen=True)
class Source:
    """One entry of data.train_shards: a manifest folder (`shards` set) or a stream pattern (`urls` set)."""

    spec: str
    weight: float
    shards: tuple[ShardInfo, ...] = ()
    urls: tuple[str, ...] = ()
    key_prefix: str = ""  # a manifest source's sample-key prefix (manifest args.prefix)

    @property
    def exact(self) -> bool:
        """True for a manifest source (sample counts known), False for a stream pattern."""
        return bool(self.shards)

    @property
    def samples(self) -> int | None:
        """Samples in a manifest source's shards; None for a stream (unknown)."""
        return sum(s.samples for s in self.shards) if self.exact else None


@dataclass(frozen=True)
class SourceSet:
    """All training sources of a run, with their weights."""

    sources: tuple[Source, ...]

    @property
    def exact(self) -> bool:
        """True when every source has a manifest (exactly-once planning); False means resampled mode."""
        return all(s.exact for s in self.sources)

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        """Every manifest shard, in source order: the numbering of global sample ids."""
        return tuple(shard for s in self.sources for shard in s.shards)

    @property
    def shard_counts(self) -> list[list[int]]:
        """Samples of each shard, one list per source, in source order."""
        return [[shard.samples for shard in s.shards] for s in self.sources]

    @property
    def weights(self) -> list[float]:
        """Each source's weight, in source order."""
        return [s.weight for s in self.sources]

    def digest(self) -> str:
        """Identity of the data (shard names, sizes, checksums, weights), not of where it is mounted."""
        h = hashlib.sha256()
        for s in self.sources:
            h.update(f"source {s.weight!r}\n".encode())
            for shard in s.shards:
                h.update(f"{shard.name} {shard.samples} {shard.sha256}\n".encode())
            for url in s.urls:
                h.update(f"{url}\n".encode())
        return h.hexdigest()[:16]

    def stream_urls(self) -> tuple[list[str], np.ndarray]:
        """(every tar to draw from, probability of each) for the resampled mode."""
        urls, weights = [], []
        for s in self.sources:
            members = list(s.urls) or [shard.path for shard in s.shards]
            urls += members
            weights += [s.weight] * len(members)
        p = np.asarray(weights, dtype=np.float64)
        return urls, p / p.sum()


_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_remote_folder(spec: str) -> bool:
    """True for a shard folder in object storage: an http(s):// or s3:// URL, not a pattern nor a .tar."""
    return is_remote(spec) and "{" not in spec and not spec.rstrip("/").endswith(_TAR_SUFFIXES)


def is_stream(spec: str) -> bool:
    """True for sources read through webdataset without a manifest: pipe:, brace patterns, tar paths and URLs."""
    if is_remote_folder(spec):
        return False
    return spec.startswith(_STREAM_SCHEMES) or "{" in spec or spec.endswith(_TAR_SUFFIXES)


def open_manifest_source(spec: str, weight: float = 1.0) -> Source:
    """A shard folder with manifest.json; raises SourceError naming the folder."""
    folder = Path(spec)
    if not (folder / MANIFEST_NAME).is_file():
        raise SourceError(
            f"{spec}: no {MANIFEST_NAME} there. Make shards with `python -m data_tools.shard --jsonl F "
            f"--images D --out {spec}` (or `make shard-data`), or list tar files as a brace pattern "
            "(dir/name-{000000..000009}.tar) together with data.samples_per_epoch to stream them without one")
    try:
        manifest = load_manifest(folder)
    except ManifestError as err:
        raise SourceError(f"{spec}: {err}") from err
    shards = _shard_infos(spec, manifest, lambda name: os.path.abspath(folder / name))
    missing = [s.name for s in shards if not os.path.isfile(s.path) or not os.path.isfile(s.index_path)]
    if missing:
        raise SourceError(f"{spec}: shard or index files listed in {MANIFEST_NAME} are missing: {missing[:5]}; "
                          f"check the folder with `python -m data_tools.verify {spec}`")
    return _source(spec, weight, manifest, shards)


def open_remote_source(spec: str, weight: float = 1.0, store: RemoteStore | None = None) -> Source:
    """A shard folder at an http(s):// or s3:// URL: only its manifest.json is fetched (the shards and their
    indexes are read later, by the workers that need them). Raises SourceError naming the URL."""
    url = join_url(spec, MANIFEST_NAME)
    try:
        if spec.startswith("s3://"):
            require_s3_client()
    except RemoteError as err:
        raise SourceError(f"{spec}: {err}") from None
    try:
        data = (store or RemoteStore()).get(url)
    except RemoteError as err:
        raise SourceError(f"{spec}: cannot fetch its {MANIFEST_NAME}: {err}. A shard folder in object storage "
                          f"needs the {MANIFEST_NAME} made by data_tools.shard next to its shards; to stream tar "
                          "files without one, give a brace pattern (URL/name-{000000..000009}.tar) together with "
                          "data.samples_per_epoch") from None
    try:
        manifest = parse_manifest(data, url)
    except ManifestError as err:
        raise SourceError(str(err)) from None
    return _source(spec, weight, manifest, _shard_infos(spec, manifest, lambda name: join_url(spec, name)))


def _shard_infos(spec: str, manifest: dict, locate) -> tuple[ShardInfo, ...]:
    """The manifest's shards with samples, `locate(name)` giving where a file of the folder is. The names come
    from the manifest, so they must be plain file names: a path or URL there could point outside the folder."""
    infos = []
    for e in manifest["shards"]:
        bad = [n for n in (e["name"], e["index"]) if not isinstance(n, str) or not _PLAIN_NAME.fullmatch(n)]
        if bad or type(e["samples"]) is not int or e["samples"] < 0:
            raise SourceError(f"{spec}: {MANIFEST_NAME} lists a shard with name {e['name']!r}, index "
                              f"{e['index']!r} and samples {e['samples']!r}: names must be plain file names "
                              "and samples a count")
        if e["samples"] > 0:
            infos.append(ShardInfo(locate(e["name"]), locate(e["index"]), e["samples"], e["name"], str(e["sha256"]),
                                   str(e.get("index_sha256") or "")))
    return tuple(infos)


def _source(spec: str, weight: float, manifest: dict, shards: tuple[ShardInfo, ...]) -> Source:
    if not shards:
        raise SourceError(f"{spec}: the manifest lists no samples")
    prefix = manifest.get("args", {}).get("prefix") if isinstance(manifest.get("args"), dict) else None
    return Source(spec, weight, shards=shards, key_prefix=str(prefix or ""))


def open_stream_source(spec: str, weight: float = 1.0) -> Source:
    """A brace pattern, tar path, URL or pipe: command; local tar files must exist."""
    urls = tuple(expand_urls(spec))
    if not urls:
        raise SourceError(f"{spec}: the pattern expands to no shard")
    local = [u for u in urls if not u.startswith(_STREAM_SCHEMES)]
    missing = [u for u in local if not os.path.isfile(u.removeprefix("file:"))]
    if missing:
        raise SourceError(f"{spec}: {len(missing)} of {len(urls)} tar files do not exist, e.g. {missing[0]}")
    return Source(spec, weight, urls=urls)


def resolve_sources(specs: Sequence[str], weights: Sequence[float] | None = None,
                    label: str = "data.train_shards", remote: RemoteSettings | None = None) -> SourceSet:
    """Open every source. `weights` None means 1.0 each (every sample once per epoch); `remote` sets the
    timeout and retries of fetching the manifests of folders in object storage."""
    if not specs:
        raise SourceError(f"{label} is empty: give shard folders made by `python -m data_tools.shard`")
    weights = [1.0] * len(specs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(specs):
        raise SourceError(f"data.train_weights has {len(weights)} entries for {len(specs)} sources in {label}")
    bad = [w for w in weights if not (w > 0 and np.isfinite(w))]
    if bad:
        raise SourceError(f"data.train_weights must be positive numbers, got {bad}")
    sources, store = [], None
    for spec, weight in zip(specs, weights):
        spec = str(spec)
        if is_remote_folder(spec):
            store = store or RemoteStore(remote)
            sources.append(open_remote_source(spec, weight, store))
        elif is_stream(spec):
            sources.append(open_stream_source(spec, weight))
        elif os.path.isdir(spec):
            sources.append(open_manifest_source(spec, weight))
        else:
            raise SourceError(f"{label}: {spec} is neither a shard folder nor a tar pattern/URL "
                              "(run `make shard-data` first?)")
    _check_distinct_keys(sources, label)
    return SourceSet(tuple(sources))


def _check_distinct_keys(sources: list[Source], label: str) -> None:
    """Two manifest sources sharded with one key prefix have colliding sample keys (`{prefix}_{line}`), so the
    sample audit could not tell their samples apart: refused, naming both."""
    seen: dict[str, str] = {}
    for source in sources:
        if not source.key_prefix:
            continue
        other = seen.setdefault(source.key_prefix, source.spec)
        if other != source.spec:
            raise SourceError(
                f"{label}: {other} and {source.spec} were sharded with the same key prefix "
                f"{source.key_prefix!r}, so their sample keys collide; shard one again with another --prefix "
                "(the default prefix adds the input's checksum), or give a folder once and weight it with "
                "data.train_weights")
        if other == source.spec and sum(s.spec == source.spec for s in sources) > 1:
            raise SourceError(f"{label} lists {source.spec} twice; give it once and weight it with "
                              "data.train_weights")

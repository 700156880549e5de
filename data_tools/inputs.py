"""Corpus files the sharder reads: format detection, a resumable record stream, and one record's decoding.

Three containers, detected from the content (`detect_format`; the sharder's `--format` forces one):

    jsonl     one JSON object per line: MiniMind-V 623a130's `*_data.jsonl`, or LLaVA records line by line
    json      one JSON array of records: LLaVA's `llava_v1_5_mix665k.json`, `blip_laion_cc_sbu_558k.json`
    parquet   MiniMind-V 3v's `pretrain_i2t.parquet` / `sft_i2t.parquet`: column `conversations` (a JSON
              string or a list of {role, content}) and `image_bytes` (one binary, or a list, one per `<image>`)

Records in `jsonl` and `json` may be in either style of `vlm.formats.records` (MiniMind-V or LLaVA); their
pictures are files under the images folder. Parquet rows carry their pictures. MiniMind-V 3v's text-only
rows carry one tiny placeholder picture and no `<image>` tag: they become text-only samples, and the
dropped pictures are counted (`Decoded.placeholder_dropped`).

`read_records` yields `(number, position, payload)`: `number` is the record's 1-based number in the file (the
line of a JSONL, the element of a JSON array, the row of a parquet file), `position` where reading continues
after it (a byte offset; for parquet, a row count), so a resumed run starts exactly after a complete shard.
Memory is bounded by one record (JSON array: by the largest element; parquet: by a batch of rows).
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vlm.formats.errors import BadSample
from vlm.formats.records import check_record

FORMATS = ("jsonl", "json", "parquet")
RECORD_UNIT = {"jsonl": "line", "json": "element", "parquet": "row"}
"""What a record's number counts in each format, for messages ("line 12", "row 12")."""
PARQUET_MAGIC = b"PAR1"
PARQUET_COLUMNS = ("conversations", "image_bytes")
PARQUET_BATCH_ROWS = 256
_CHUNK = 1 << 20
_NUMBER_GOES_ON = frozenset("0123456789.eE+-")
_TOKEN_MARGIN = 64  # characters before a chunk's end where a parse error may be the cut (a number, an escape)


class InputError(ValueError):
    """A corpus file that cannot be read as a whole (wrong format, broken JSON array, missing column)."""


@dataclass(frozen=True)
class Decoded:
    """One record, checked: MiniMind-V-style record, picture names and, for parquet, the pictures' bytes."""

    record: dict
    names: list[str]
    pictures: list[bytes] | None = None  # None: read `names` from the images folder
    placeholder_dropped: bool = False


def detect_format(path: str) -> str:
    """'jsonl', 'json' or 'parquet' from the file's first bytes; raises InputError when it is none of them
    (naming what it looks like instead). An empty file is 'jsonl' (no records)."""
    with open(path, "rb") as f:
        head = f.read(4)
        if head == PARQUET_MAGIC:
            return "parquet"
        f.seek(0)
        first = f.readline(64 << 20)
        while first and not first.strip():
            first = f.readline(64 << 20)
    text = first.decode("utf-8", errors="replace").lstrip("\ufeff").strip()
    if not text:
        return "jsonl"
    if text.startswith("["):
        return "json"
    if text.startswith("{"):
        try:
            json.loads(text)
        except json.JSONDecodeError:
            raise InputError(f"{path} looks like one JSON document spread over lines (its first line "
                             f"{text[:40]!r} is not a whole JSON object), not JSONL with one record per line; "
                             "give a JSON array of records, or JSONL") from None
        return "jsonl"
    if head.startswith((b"PK", b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
        raise InputError(f"{path} is a compressed archive (starts with {head!r}); unpack it first")
    raise InputError(f"{path} is not JSONL, a JSON array or parquet (it starts with {text[:40]!r})")


def scan(path: str, fmt: str) -> tuple[str, int, int | None]:
    """(sha256, bytes, records or None when unknown without parsing) of a corpus file, in one pass."""
    digest, size, lines, last = hashlib.sha256(), 0, 0, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
            if fmt == "jsonl":
                lines += chunk.count(b"\n")
            last = chunk[-1:]
    records = {"jsonl": lines + (last != b"\n"), "json": None, "parquet": None}[fmt]
    if fmt == "parquet":
        records = _parquet_file(path).metadata.num_rows
    return digest.hexdigest(), size, records


def read_records(path: str, fmt: str, done: int = 0, position: int = 0,
                 limit: int | None = None) -> Iterator[tuple[int, int, Any]]:
    """(number, position after it, payload) for the records after the first `done` (at most `limit` of them),
    reading from `position`. Payloads: a JSONL line's bytes, a JSON array's element, a parquet row as a dict.
    Raises InputError for a JSON array that breaks off or a parquet file without the columns."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    records = {"jsonl": _jsonl, "json": _json_array}[fmt](path, done, position) if fmt != "parquet" \
        else _parquet(path, done)
    return records if limit is None else itertools.islice(records, limit)


def range_starts(path: str, fmt: str, every: int, done: int = 0, position: int = 0) -> Iterator[tuple[int, int]]:
    """(done, position) where each run of `every` records starts, from the record after `done` (read from
    `position`) to the end: the `read_records` arguments of each run. Reads the file through once, lazily
    (a JSON array is parsed). Not for parquet, whose rows can only be reached by decoding their row group from
    its start: read those once, in order."""
    if fmt == "parquet":
        raise ValueError("range_starts reads JSONL and JSON; read parquet rows in order with read_records")
    before = position
    for number, after, _ in read_records(path, fmt, done, position):
        if (number - 1 - done) % every == 0:
            yield number - 1, before
        before = after


def decode(fmt: str, payload: Any, number: int) -> Decoded:
    """Check one record of any format (every rule of `vlm.formats.records`); raises BadSample."""
    if fmt == "jsonl":
        from vlm.formats.records import parse_record

        record, names = parse_record(payload, first_line=number == 1)
        return Decoded(record, names)
    if fmt == "json":
        record, names = check_record(payload)
        return Decoded(record, names)
    return _decode_row(payload)


def _decode_row(row: dict) -> Decoded:
    conversations = row.get("conversations")
    if isinstance(conversations, (str, bytes)):
        try:
            conversations = json.loads(conversations)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadSample("bad_json", f"column 'conversations' is not JSON: {e}") from e
    pictures = row.get("image_bytes")
    pictures = [] if pictures is None else pictures if isinstance(pictures, list) else [pictures]
    if not all(isinstance(p, bytes) for p in pictures):
        raise BadSample("bad_image_field", "column 'image_bytes' holds something other than binary pictures")
    names = [f"image_bytes[{i}]" for i in range(len(pictures))]
    record = {"conversations": conversations, "image": names}
    try:
        record, names = check_record(record)
    except BadSample as e:
        # MiniMind-V 3v's text-only rows: one placeholder picture and no <image> tag -> a text-only sample.
        if e.reason != "image_count_mismatch" or len(pictures) != 1 or _tags(conversations):
            raise
        record, names = check_record({"conversations": conversations})
        return Decoded(record, names, [], placeholder_dropped=True)
    return Decoded(record, names, pictures)


def _tags(conversations: Any) -> int:
    from vlm.formats.constants import IMAGE_TAG

    return sum(str(t.get("content", "")).count(IMAGE_TAG) for t in conversations if isinstance(t, dict))


def _jsonl(path: str, done: int, position: int) -> Iterator[tuple[int, int, bytes]]:
    with open(path, "rb") as f:
        f.seek(position)
        for raw in f:
            done += 1
            position += len(raw)
            yield done, position, raw


def _json_array(path: str, done: int, position: int) -> Iterator[tuple[int, int, Any]]:
    """Stream the elements of a top-level JSON array; `position` is 0 or just after a ',' or the ']'."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        f.seek(position)
        text, at, eof = "", 0, False

        def more() -> None:
            nonlocal text, at, eof
            chunk = f.read(_CHUNK)
            try:
                text = text[at:] + utf8.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise InputError(f"{path} is not UTF-8 (near byte {position})") from e
            at, eof = 0, not chunk

        def skip_space() -> str:
            """The next non-space character ('' at the end of the file), consumed spaces counted in bytes."""
            nonlocal at, position
            while True:
                start = at
                while at < len(text) and text[at] in " \t\r\n\ufeff":
                    at += 1
                position += len(text[start:at].encode("utf-8"))
                if at < len(text) or eof:
                    return text[at:at + 1]
                more()

        def broken(what: str) -> InputError:
            return InputError(f"{path}: the JSON array breaks off after element {done} (byte {position}): "
                              f"{what}")

        more()
        if position == 0:
            if skip_space() != "[":
                raise broken("it does not start with '['")
            at, position = at + 1, position + 1
            if skip_space() == "]":
                return
        elif skip_space() == "":
            return  # resumed after the closing ']'
        while True:
            if skip_space() == "":
                raise broken("the file ends inside the array")
            while True:
                try:
                    element, end = decoder.raw_decode(text, at)
                except json.JSONDecodeError as e:
                    # An element cut by the chunk's end fails near that end (an unfinished string names where it
                    # started); an error well before the end is the file's own, reported without reading further.
                    cut = e.pos >= len(text) - _TOKEN_MARGIN or e.msg.startswith("Unterminated string")
                    if eof or not cut:
                        raise broken(e.msg) from None
                    more()
                    continue
                # A number could go on in the next chunk ("0." + "5"): decide only on the text after it.
                if eof or end < len(text) and text[end] not in _NUMBER_GOES_ON:
                    break
                if end < len(text) - _TOKEN_MARGIN:
                    break
                more()
            position += len(text[at:end].encode("utf-8"))
            at = end
            separator = skip_space()
            if separator not in (",", "]"):
                raise broken(f"expected ',' or ']', found {separator!r}" if separator else "no closing ']'")
            at, position, done = at + 1, position + 1, done + 1
            if separator == "]":
                if skip_space() != "":
                    raise broken("text after the closing ']'")
                yield done, position, element
                return
            yield done, position, element


def _parquet_file(path: str):
    import pyarrow.parquet as pq  # imported here: only parquet input needs it

    try:
        # Buffered page reads: memory bounded by the buffer and a batch, not by a row group (unbuffered reads
        # take a whole column chunk), and without pre_buffer's coalesced reads, which are for remote stores
        # and about 5x slower here for a local file.
        return pq.ParquetFile(path, buffer_size=_CHUNK, pre_buffer=False)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise InputError(f"{path} is not a readable parquet file: {e}") from e


def _parquet(path: str, done: int) -> Iterator[tuple[int, int, dict]]:
    parquet = _parquet_file(path)
    names = parquet.schema_arrow.names
    if "conversations" not in names:
        raise InputError(f"{path} has no 'conversations' column (columns: {', '.join(names)}); MiniMind-V's "
                         "parquet files have 'conversations' and 'image_bytes'")
    columns = [c for c in PARQUET_COLUMNS if c in names]
    number, groups = 0, []  # rows before the first group read; the groups read
    for g in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(g).num_rows
        if number + rows <= done and not groups:
            number += rows  # wholly before the first row wanted: not read
        else:
            groups.append(g)
    if not groups:
        return
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=columns):
        first = max(done - number, 0)  # rows of the batch already done: not turned into Python objects
        if first < batch.num_rows:
            part = batch.slice(first)
            values = {c: part.column(c).to_pylist() for c in columns}
            for i in range(part.num_rows):
                yield number + first + i + 1, number + first + i + 1, {c: values[c][i] for c in columns}
        number += batch.num_rows


def input_name(path: str) -> str:
    """The file's base name, as written into each sample's `source.file`."""
    return os.path.basename(path)

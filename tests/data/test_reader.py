"""Reading and safe decoding: hostile members stay undecoded, corrupt samples are skipped, counted, and abort."""

import json
import logging
import pickle
import struct
import zlib

import pytest

from tests.data.shard_fixtures import (
    make_loader,
    members,
    write_shards,
)
from vlm.data.pipeline import DataQualityError
from vlm.data.reader import ShardReader, decode_members, iter_stream
from vlm.data.sources import resolve_sources
from vlm.formats.errors import BadSample
from vlm.tokenizer import load_tokenizer


class _CreatesFile:
    """Unpickling this opens (and so creates) `path`: the classic pickle payload, made harmless."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def loader(folder, tokenizer, **kw):
    return make_loader([folder], tokenizer, **{"batch_size": 2, "num_workers": 0, "seed": 0, "chunk_size": 4, **kw})


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose pixel data is garbage: decoding it would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = b"\x00" * 64
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", len(idat)) + b"IDAT" + idat + b"\x00" * 4


def test_pickled_members_are_never_unpickled(tmp_path, tokenizer):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(marker))
    pickle.loads(pickle.dumps(_CreatesFile(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()  # the payload is live: unpickling it does create a file
    hostile = {**members(0), "pyd": payload, "pickle": payload, "pth": payload, "0.pyd": payload}
    folder = write_shards(tmp_path / "shards", [3], special={1: hostile})

    key, raw = ShardReader(resolve_sources([str(folder)]).shards).read(1)
    record = decode_members(key, raw)
    assert record["conversations"][0]["role"] == "user" and len(record["images"]) == 1
    for url_key, stream_members in iter_stream(str(folder / "c-000000.tar")):
        decode_members(url_key, stream_members)
    batches = list(loader(folder, tokenizer, batch_size=3))
    assert batches[0]["num_samples"] == 3 and batches[0]["stats"]["bad"] == 0
    assert not marker.exists()


def test_corrupt_image_is_skipped_and_counted(tmp_path, tokenizer):
    broken = {**members(2), "0.jpg": b"\xff\xd8\xff\xe0 not really a jpeg"}
    folder = write_shards(tmp_path / "shards", [6], special={2: broken}, images_of=lambda i: 1)
    batches = list(loader(folder, tokenizer, batch_size=3))
    assert len(batches) == 2  # the count of micro-batches does not change
    assert sum(b["num_samples"] for b in batches) == 5
    skipped = [s for b in batches for s in b["skipped"]]
    assert skipped == [["c_000000003", "image_decode"]]
    assert sum(b["stats"]["bad_by_reason"].get("image_decode", 0) for b in batches) == 1


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path, tokenizer):
    huge = {**members(1), "0.png": png_header_only(5000, 5000)}
    del huge["0.jpg"]
    folder = write_shards(tmp_path / "shards", [4], special={1: huge}, images_of=lambda i: 1)
    batches = list(loader(folder, tokenizer, max_pixels=100_000, batch_size=4))
    # image_too_large, not image_decode: the garbage pixel data was never decoded.
    assert batches[0]["skipped"] == [["c_000000002", "image_too_large"]]
    assert batches[0]["num_samples"] == 3


def test_corrupt_tar_header_is_a_counted_bad_sample(tmp_path, tokenizer):
    folder = write_shards(tmp_path / "shards", [5])
    index = json.loads((folder / "c-000000.tar.idx.json").read_text())
    with open(folder / "c-000000.tar", "r+b") as f:
        f.seek(index["offsets"][3])
        f.write(b"\x07" * 512)  # wipe the header of sample 3's first member (checksum fails)
    reader = ShardReader(resolve_sources([str(folder)]).shards)
    with pytest.raises(BadSample) as err:
        reader.read(3)
    assert err.value.reason == "tar_corrupt"
    last = index["offsets"][1] + index["sizes"][1] - 1024  # header of sample 1's json, its last member
    with open(folder / "c-000000.tar", "r+b") as f:
        f.seek(last - last % 512)
        f.write(b"\x07" * 512)
    with pytest.raises(BadSample, match="tar_corrupt"):
        reader.read(1)
    batches = list(loader(folder, tokenizer, batch_size=5))
    assert sorted(batches[0]["skipped"]) == [["c_000000002", "tar_corrupt"], ["c_000000004", "tar_corrupt"]]


def test_too_many_bad_samples_abort_with_a_message_naming_the_setting(tmp_path, tokenizer, caplog):
    broken = {i: {**members(i), "0.jpg": b"garbage"} for i in range(0, 30, 3)}  # a third of the samples
    folder = write_shards(tmp_path / "shards", [30], special=broken, images_of=lambda i: 1)
    with pytest.raises(DataQualityError, match=r"data\.max_bad_fraction=0\.1.*") as err:
        list(loader(folder, tokenizer, batch_size=2, max_bad_fraction=0.1, min_seen=10))
    assert "image_decode" in str(err.value)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlm.data.pipeline"):
        kept = list(loader(folder, tokenizer, batch_size=2, max_bad_fraction=0.5, min_seen=10))
    assert sum(b["stats"]["bad"] for b in kept) == 10
    assert len(caplog.records) == 5  # rate limit: the first five, then only every 100th


def test_decoder_allow_list_and_image_numbering():
    raw = members(4, images=2)
    record = decode_members("k", {**raw, "txt": b"\xff\xfe not utf-8", "npy": b"\x93NUMPY"})
    assert record["images"] == [raw["0.jpg"], raw["1.jpg"]]
    with pytest.raises(BadSample, match="image_members"):
        decode_members("k", {"json": raw["json"], "0.jpg": raw["0.jpg"], "2.jpg": raw["1.jpg"]})
    with pytest.raises(BadSample, match="missing_json"):
        decode_members("k", {"0.jpg": raw["0.jpg"]})
    with pytest.raises(BadSample, match="bad_json"):
        decode_members("k", {"json": b"{not json"})
    lone = decode_members("k", {"json": members(1)["json"], "jpg": raw["0.jpg"]})
    assert lone["images"] == [raw["0.jpg"]]

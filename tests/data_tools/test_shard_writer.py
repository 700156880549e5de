"""data_tools.shard_writer: the tar bytes it writes by hand are the ones webdataset and tarfile write and read."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_tools import shard_writer
from data_tools.shard_writer import ShardSink, member_header
from vlm.formats import manifest as mf

REPO = Path(__file__).resolve().parents[2]


def sample(i: int, images: int = 1, key: str | None = None) -> tuple[str, dict[str, bytes]]:
    """(key, members): a JSON member and `images` picture members of varied sizes (0, 1, 511, 512, 513... bytes)."""
    members = {"json": json.dumps({"i": i, "text": "x" * (i * 37 % 900)}).encode()}
    for k in range(images):
        members[f"{k}.jpg" if k % 2 == 0 else f"{k}.png"] = bytes([i % 251, k]) * ((i * 131 + k * 255) % 700)
    return key or mf.sample_key("t", i + 1), members


SAMPLES = [
    sample(0, 0),  # text only
    sample(1, 1),
    sample(2, 12),  # members "10.jpg", "11.png" sort before "2.jpg", as webdataset orders them
    sample(3, 2, key="k" * 99),  # "k"*99 + ".json" is 104 characters: a pax header for its name
    sample(4, 1, key="k" * 300),
    sample(5, 1, key="Bild_é_" + "x" * 20),  # not ASCII: a pax header whatever the length
    ("size_edges", {"json": b"", "0.jpg": b"\1" * 511, "1.jpg": b"\2" * 512, "2.jpg": b"\3" * 513}),
    *(sample(i, i % 3) for i in range(6, 40)),
]


def write_shard(folder: Path, samples, name: str = "t-000000.tar") -> tuple[bytes, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    sink = ShardSink(folder, name)
    for line, (key, members) in enumerate(samples, 1):
        sink.add(key, members, line)
    entry = sink.finish()
    return (folder / name).read_bytes(), entry


def tarwriter_bytes(samples) -> bytes:
    """What the sharder wrote before it had its own writer: webdataset.TarWriter with the same options."""
    out = io.BytesIO()
    with wds.TarWriter(out, encoder=False, user="vlm", group="vlm", mode=0o444, mtime=0) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    return out.getvalue()


@pytest.mark.parametrize("count", [0, 1, 7, len(SAMPLES)])
def test_bytes_are_those_of_webdataset_tarwriter(tmp_path, count):
    data, entry = write_shard(tmp_path, SAMPLES[:count])
    assert data == tarwriter_bytes(SAMPLES[:count])
    assert entry["bytes"] == len(data) and len(data) % (20 * 512) == 0
    assert entry["samples"] == count


@pytest.mark.parametrize("name", ["a.json", "k" * 99 + ".0", "k" * 100, "k" * 101, "k" * 93 + "é.json",
                                  "é", "k" * 600 + ".jpg", "日本語_" * 40])
@pytest.mark.parametrize("size", [0, 1, 512, 123456789])
def test_member_header_is_tarfiles_pax_format_header(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "vlm", "vlm"
    assert member_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_pax_record_length_counts_its_own_digits():
    # A pax record "LEN path=NAME\n" includes LEN's digits: names where LEN gains a digit (99 -> 100, 999 -> 1000).
    for length in [*range(85, 100), *range(985, 1000)]:
        name = "é" + "k" * (length - 2)  # not ASCII, so it gets a pax header at any length
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = 3, 0, 0o444, "vlm", "vlm"
        assert member_header(name, 3) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), length


def test_reads_back_with_tarfile_webdataset_and_the_index(tmp_path):
    data, entry = write_shard(tmp_path, SAMPLES)
    shard = tmp_path / entry["name"]
    with tarfile.open(shard) as tar:
        names = [info.name for info in tar]
        read = {info.name: tar.extractfile(info).read() for info in tar}
        assert all(info.uname == "vlm" and info.mode == 0o444 and info.mtime == 0 for info in tar)
    expected = {f"{key}.{suffix}": value for key, members in SAMPLES for suffix, value in members.items()}
    assert read == expected and len(names) == len(expected)
    with open(shard, "rb") as stream:  # webdataset's own tar iteration and grouping, as vlm.data.reader uses it
        grouped = group_by_keys(tar_file_expander([{"url": str(shard), "stream": stream}]))
        by_key = {s["__key__"]: s for s in grouped}
    assert list(by_key) == [key for key, _ in SAMPLES]
    for key, members in SAMPLES:
        assert {k: v for k, v in by_key[key].items() if not k.startswith("__")} == members
    index = mf.load_index(tmp_path / entry["index"])
    assert index["keys"] == [key for key, _ in SAMPLES]
    assert index["offsets"][0] == 0
    for key, offset, size, (_, members) in zip(index["keys"], index["offsets"], index["sizes"], SAMPLES):
        assert mf.read_sample_at(shard, offset, size) == {f"{key}.{s}": v for s, v in members.items()}
    ends = [o + s for o, s in zip(index["offsets"], index["sizes"])]
    assert ends[:-1] == index["offsets"][1:]  # member groups are back to back
    assert data[ends[-1]:] == bytes(len(data) - ends[-1])  # then only the end-of-archive zeros


def test_size_with_predicts_the_closed_size(tmp_path):
    for n in range(len(SAMPLES)):
        sink = ShardSink(tmp_path, f"t-{n:06d}.tar")
        for line, (key, members) in enumerate(SAMPLES[:n], 1):
            sink.add(key, members, line)
        predicted = sink.size_with(*SAMPLES[n])
        sink.add(*SAMPLES[n], n + 1)
        assert sink.finish()["bytes"] == predicted == (tmp_path / f"t-{n:06d}.tar").stat().st_size


def test_same_samples_give_the_same_bytes_and_index(tmp_path):
    first, entry_a = write_shard(tmp_path / "a", SAMPLES)
    second, entry_b = write_shard(tmp_path / "b", SAMPLES)
    assert first == second and entry_a == entry_b
    assert (tmp_path / "a" / entry_a["index"]).read_bytes() == (tmp_path / "b" / entry_b["index"]).read_bytes()
    assert entry_a["sha256"] == mf.sha256_file(tmp_path / "a" / entry_a["name"])


def test_large_shard_goes_through_the_writing_thread_in_order(tmp_path):
    # About 6 MiB: several 1 MiB hand-overs to the writing thread, some of them waiting for a free slot.
    samples = [(mf.sample_key("big", i), {"json": b"{}", "0.png": bytes([i]) * 200_003}) for i in range(30)]
    data, entry = write_shard(tmp_path, samples)
    assert data == tarwriter_bytes(samples) and entry["sha256"] == mf.sha256_file(tmp_path / entry["name"])


def test_abort_leaves_no_file_and_a_failed_write_is_raised(tmp_path, monkeypatch):
    sink = ShardSink(tmp_path, "t-000000.tar")
    sink.add(*SAMPLES[1], 1)
    sink.abort()
    sink.abort()  # a second abort (the sharder's cleanup after a failed finish) is harmless
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="not bytes"):
        ShardSink(tmp_path, "t-000001.tar").add("k", {"txt": "a str"}, 1)

    class Full(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(shard_writer, "open", lambda path, mode: io.BufferedWriter(Full()), raising=False)
    for size in (100, 3 << 20):  # fails when the file is flushed; fails on the writing thread
        sink = ShardSink(tmp_path, "t-000002.tar")
        sink.add("t_000000001", {"json": b"{}", "0.png": b"x" * size}, 1)
        with pytest.raises(OSError, match="No space left"):
            sink.add("t_000000002", {"json": b"{}"}, 2)
            sink.finish()
        sink.abort()


def test_the_sharder_never_imports_torch_or_webdataset(tmp_path):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import data_tools.shard\n"
        "from data_tools.shard_writer import ShardSink\n"
        f"sink = ShardSink(Path({str(tmp_path)!r}), 't-000000.tar')\n"
        "sink.add('t_000000001', {'json': b'{}', '0.jpg': b'x' * 1000}, 1)\n"
        "sink.finish()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'webdataset')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "t-000000.tar").is_file()

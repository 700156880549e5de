"""python -m data_tools.shard: samples, skips with reasons, determinism, resume and refusal."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_tools import shard, shard_writer
from tests.fixtures.make_tiny_corpus import picture, save_picture, turn, write_corpus
from vlm.formats import manifest as mf

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_shards"


def write_jsonl(path: Path, lines: list) -> Path:
    """Lines given as dicts (JSON-encoded), str or raw bytes; one per line."""
    encoded = [ln if isinstance(ln, bytes) else (json.dumps(ln) if isinstance(ln, dict) else ln).encode()
               for ln in lines]
    path.write_bytes(b"\n".join(encoded) + b"\n")
    return path


def cli(jsonl: Path, images: Path, out: Path, *flags: str) -> list[str]:
    """The sharder's arguments. These small corpora skip many records on purpose, so the skip share does not
    fail the run unless a test sets --max-skip-fraction; --prefix is the file stem unless a test sets one
    (readable names; the default prefix adds the input's checksum)."""
    share = () if "--max-skip-fraction" in flags else ("--max-skip-fraction", "1")
    prefix = () if "--prefix" in flags else ("--prefix", jsonl.stem)
    return ["--jsonl", str(jsonl), "--images", str(images), "--out", str(out), *share, *prefix, *flags]


def run(jsonl: Path, images: Path, out: Path, *flags: str) -> int:
    """The sharder's exit status for `cli(...)`."""
    return shard.main(cli(jsonl, images, out, *flags))


def image_bytes(fmt: str, size=(96, 64), colour="red") -> bytes:
    """A picture with a gradient, so JPEG scans are long enough to cut in the middle."""
    image = picture(size, colour)
    band = (size[0] // 3, size[1])
    image.paste(Image.linear_gradient("L").resize(band).convert("RGB"), (0, 0))
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height with almost no data: a decompression-bomb stand-in."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def one_image(name: str) -> dict:
    return {"conversations": turn("<image>\nWhat is it?", "A red square."), "image": name}


def _put(root: Path, name: str, data: bytes) -> None:
    path = root / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _flip_idat(data: bytes) -> bytes:
    at = data.index(b"IDAT") + 8
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _truncated_jpeg(root: Path) -> dict:
    data = image_bytes("JPEG")[:-100]
    assert b"\xff\xda" in data  # cut inside the scan, after the header
    _put(root, "cut.jpg", data)
    return one_image("cut.jpg")


def _outside(root: Path) -> Path:
    (root / "outside.jpg").write_bytes(image_bytes("JPEG"))
    return root / "outside.jpg"


def _symlink_out(root: Path) -> dict:
    (root / "images").mkdir(exist_ok=True)
    os.symlink(_outside(root), root / "images" / "link.jpg")
    return one_image("link.jpg")


def _symlinked_folder_out(root: Path) -> dict:
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "x.jpg").write_bytes(image_bytes("JPEG"))
    (root / "images").mkdir(exist_ok=True)
    os.symlink(root / "elsewhere", root / "images" / "linked")
    return one_image("linked/x.jpg")


def _truncated_jpeg_with_thumbnail(root: Path) -> dict:
    """An APP1 segment holding a small complete JPEG (like an EXIF thumbnail) must not hide the cut."""
    thumb = image_bytes("JPEG", size=(16, 16))
    main = image_bytes("JPEG")
    app1 = b"\xff\xe1" + (len(thumb) + 2).to_bytes(2, "big") + thumb
    _put(root, "thumb.jpg", main[:2] + app1 + main[2:-100])
    return one_image("thumb.jpg")


def _directory(root: Path) -> dict:
    (root / "images" / "folder.jpg").mkdir(parents=True)
    return one_image("folder.jpg")


def _with(name: str, data: bytes, record: dict | None = None):
    def build(root: Path) -> dict:
        _put(root, name, data)
        return record or one_image(name)
    return build


BAD_CASES = {
    "malformed_json": ("bad_json", lambda root: b'{"conversations": [{"role": "user",'),
    "json_not_object": ("bad_json", lambda root: b"[1, 2]"),
    "not_utf8": ("not_utf8", lambda root: b'{"conversations": "\xff\xfe"}'),
    "no_conversations": ("no_conversations", lambda root: {"image": ""}),
    "empty_conversations": ("no_conversations", lambda root: {"conversations": []}),
    "turn_without_content": ("bad_turn", lambda root: {"conversations": [{"role": "user"}]}),
    "assistant_first": ("bad_roles", lambda root: {"conversations": turn("a", "b")[::-1]}),
    "user_twice": ("bad_roles", lambda root: {"conversations": [turn("a", "b")[0]] * 2}),
    "ends_with_user": ("bad_roles", lambda root: {"conversations": turn("a", "b") + turn("c", "d")[:1]}),
    "empty_content": ("empty_content", lambda root: {"conversations": turn("hi", "  \n")}),
    "reserved_field": ("reserved_field", lambda root: {"conversations": turn("a", "b"), "source": "x"}),
    "image_field_list_of_numbers": ("bad_image_field", lambda root: {**one_image("a.jpg"), "image": [3]}),
    "image_field_number": ("bad_image_field", lambda root: {**one_image("a.jpg"), "image": 3}),
    "image_field_empty_name": ("bad_image_field", lambda root: {**one_image("a.jpg"), "image": "a.jpg, ,b.jpg"}),
    "more_images_than_placeholders": ("image_count_mismatch", _with("a.jpg", image_bytes("JPEG"),
                                                                   {**one_image("a.jpg"), "image": "a.jpg,a.jpg"})),
    "placeholder_without_image": ("image_count_mismatch", lambda root: {**one_image(""), "image": ""}),
    "missing_image": ("missing_image", lambda root: one_image("nowhere.jpg")),
    "dot_dot_escape": ("unsafe_image_path", lambda root: one_image("../" + _outside(root).name)),
    "absolute_path": ("unsafe_image_path", lambda root: one_image(str(_outside(root)))),
    "symlink_out": ("unsafe_image_path", _symlink_out),
    "symlinked_folder_out": ("unsafe_image_path", _symlinked_folder_out),
    "directory_not_file": ("missing_image", _directory),
    "zero_byte": ("empty_image", _with("empty.jpg", b"")),
    "corrupt_jpeg_header": ("bad_image", _with("hdr.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 40)),
    "truncated_jpeg_with_thumbnail": ("truncated_image", _truncated_jpeg_with_thumbnail),
    "garbage_bytes": ("bad_image", _with("junk.jpg", b"this is not an image " * 20)),
    "truncated_jpeg": ("truncated_image", _truncated_jpeg),
    "truncated_png": ("truncated_image", _with("cut.png", image_bytes("PNG")[:-20])),
    "png_bad_crc": ("bad_image", _with("flip.png", _flip_idat(image_bytes("PNG")))),
    "bomb_over_pil_limit": ("too_many_pixels", _with("bomb.png", png_header(30000, 30000))),
    "bomb_over_max_pixels": ("too_many_pixels", _with("big.png", png_header(9000, 9000))),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_is_skipped_with_its_reason_or_fatal_with_strict(tmp_path, case, capsys):
    reason, build = BAD_CASES[case]
    _put(tmp_path, "good.jpg", image_bytes("JPEG"))
    jsonl = write_jsonl(tmp_path / "data.jsonl", [one_image("good.jpg"), build(tmp_path), one_image("good.jpg")])
    assert run(jsonl, tmp_path / "images", tmp_path / "out") == 0
    manifest = mf.load_manifest(tmp_path / "out")
    assert [(s["line"], s["reason"]) for s in manifest["skipped"]] == [(2, reason)]
    assert (manifest["input_records"], manifest["total_samples"]) == (3, 2)
    assert manifest["skipped_by_reason"] == {reason: 1}

    assert run(jsonl, tmp_path / "images", tmp_path / "strict", "--strict") == 2
    err = capsys.readouterr().err
    assert "line 2" in err and reason in err and "--strict" in err
    assert not (tmp_path / "strict" / mf.MANIFEST_NAME).exists()


def test_other_formats_and_links_inside_the_folder_are_accepted(tmp_path):
    images = tmp_path / "images"
    for name, fmt in (("a.gif", "GIF"), ("b.webp", "WEBP"), ("c.bmp", "BMP")):
        _put(tmp_path, name, image_bytes(fmt, size=(30, 20)))
    _put(tmp_path, "real/d.jpg", image_bytes("JPEG"))
    os.symlink(images / "real" / "d.jpg", images / "link.jpg")
    os.symlink(images / "real", images / "alias")
    names = ["a.gif", "b.webp", "c.bmp", "link.jpg", "alias/d.jpg", "real/../real/d.jpg"]
    jsonl = write_jsonl(tmp_path / "d.jsonl", [one_image(name) for name in names])
    assert run(jsonl, images, tmp_path / "out") == 0
    members = read_tar(tmp_path / "out" / "d-000000.tar")
    assert sorted(name for name in members if not name.endswith("json")) == [
        "d_000000001.0.gif", "d_000000002.0.webp", "d_000000003.0.bmp", "d_000000004.0.jpg",
        "d_000000005.0.jpg", "d_000000006.0.jpg"]
    assert members["d_000000004.0.jpg"] == (images / "real" / "d.jpg").read_bytes()


def test_max_pixels_is_checked_from_the_header(tmp_path):
    _put(tmp_path, "a.png", image_bytes("PNG", size=(40, 30)))
    jsonl = write_jsonl(tmp_path / "data.jsonl", [one_image("a.png")])
    assert run(jsonl, tmp_path / "images", tmp_path / "out", "--max-pixels", str(40 * 30 - 1)) == 1  # none left
    assert mf.load_manifest(tmp_path / "out")["skipped_by_reason"] == {"too_many_pixels": 1}
    assert run(jsonl, tmp_path / "images", tmp_path / "ok", "--max-pixels", str(40 * 30)) == 0
    assert mf.load_manifest(tmp_path / "ok")["total_samples"] == 1


def good_corpus(root: Path) -> tuple[Path, Path]:
    images = root / "images"
    save_picture(picture((40, 30), "red"), images / "red.jpg")
    save_picture(picture((24, 24), "blue", "circle", "RGBA"), images / "blue.png")
    save_picture(picture((30, 20), "green", mode="L"), images / "sub" / "green.png")
    records = [
        {"conversations": turn("<image>\nDescribe it.", "A red square."), "image": "red.jpg", "truth": [1, 2]},
        {"conversations": turn("<image> vs <image>?", "Blue, then red.") + turn("Sure?", "Yes."),
         "image": " blue.png ,red.jpg"},
        {"conversations": turn("Name a colour.", "Green.")},
        "   ",
        {"conversations": turn("<image>", "Green."), "image": "sub/green.png", "image_extra": None},
    ]
    return write_jsonl(root / "data.jsonl", records), images


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {info.name: tar.extractfile(info).read() for info in tar}


def test_samples_keep_conversations_images_in_order_and_extra_fields(tmp_path):
    jsonl, images = good_corpus(tmp_path)
    assert run(jsonl, images, tmp_path / "out") == 0
    manifest = mf.load_manifest(tmp_path / "out")
    assert (manifest["input_records"], manifest["total_samples"], manifest["blank_lines"]) == (4, 4, 1)
    members = read_tar(tmp_path / "out" / "data-000000.tar")
    assert sorted(members) == ["data_000000001.0.jpg", "data_000000001.json", "data_000000002.0.png",
                               "data_000000002.1.jpg", "data_000000002.json", "data_000000003.json",
                               "data_000000005.0.png", "data_000000005.json"]
    assert members["data_000000002.0.png"] == (images / "blue.png").read_bytes()
    assert members["data_000000002.1.jpg"] == (images / "red.jpg").read_bytes()
    two = json.loads(members["data_000000002.json"])
    assert two["images"] == ["blue.png", "red.jpg"]
    assert two["source"] == {"file": "data.jsonl", "line": 2}
    assert [t["content"] for t in two["conversations"]] == ["<image> vs <image>?", "Blue, then red.", "Sure?", "Yes."]
    assert json.loads(members["data_000000001.json"])["truth"] == [1, 2]
    text_only = json.loads(members["data_000000003.json"])
    assert text_only["images"] == [] and text_only["conversations"][0]["content"] == "Name a colour."
    assert "data_000000005.json" in members and json.loads(members["data_000000005.json"])["image_extra"] is None


def test_shards_open_with_webdataset_and_match_the_index(tmp_path):
    jsonl, images = good_corpus(tmp_path)
    assert run(jsonl, images, tmp_path / "out", "--samples-per-shard", "3") == 0
    out = tmp_path / "out"
    manifest = mf.load_manifest(out)
    urls = [str(out / entry["name"]) for entry in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["data_000000001", "data_000000002", "data_000000003",
                                               "data_000000005"]
    assert sorted(k for k in samples[1] if not k.startswith("__")) == ["0.png", "1.jpg", "json"]
    for entry in manifest["shards"]:
        index = mf.load_index(out / entry["index"])
        assert len(index["keys"]) == entry["samples"]
        for key, offset, size in zip(index["keys"], index["offsets"], index["sizes"]):
            by_wds = next(s for s in samples if s["__key__"] == key)
            members = mf.read_sample_at(out / entry["name"], offset, size)
            assert {name.split(".", 1)[1]: data for name, data in members.items()} == \
                {k: v for k, v in by_wds.items() if not k.startswith("__")}
    assert [(e["samples"], e["first_line"], e["last_line"]) for e in manifest["shards"]] == [(3, 1, 3), (1, 5, 5)]


def test_read_sample_at_rejects_a_wrong_offset(tmp_path):
    index = mf.load_index(FIXTURE / "tiny-000000.tar.idx.json")
    shard_path = FIXTURE / "tiny-000000.tar"
    with pytest.raises(mf.ManifestError, match="no complete tar member group"):
        mf.read_sample_at(shard_path, index["offsets"][1] + 512, index["sizes"][1])
    with pytest.raises(mf.ManifestError, match="one sample"):
        mf.read_sample_at(shard_path, 0, index["offsets"][2])


def bulk_corpus(root: Path, n: int = 40) -> tuple[Path, Path]:
    """n records mixing 0-2 images, JPEG and PNG, with a few bad records and blank lines."""
    images = root / "images"
    for i in range(6):
        save_picture(picture((20 + 4 * i, 16 + 2 * i), ["red", "green", "blue"][i % 3]), images / f"{i}.jpg")
        save_picture(picture((16 + 2 * i, 20), "yellow", "circle", "RGBA" if i % 2 else "L"), images / f"{i}.png")
    lines: list = []
    for i in range(n):
        if i % 9 == 4:
            lines.append(one_image("missing.jpg"))
        names = [f"{i % 6}.jpg", f"{(i + 1) % 6}.png"][: i % 3]
        lines.append({"conversations": turn(" ".join(["<image>"] * len(names)) + f" q{i}", f"a{i}"),
                      "image": ", ".join(names)})
        if i % 13 == 6:
            lines.append("")
    return write_jsonl(root / "bulk.jsonl", lines), images


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_output_bytes_do_not_depend_on_worker_count(tmp_path):
    jsonl, images = bulk_corpus(tmp_path)
    assert run(jsonl, images, tmp_path / "w1", "--samples-per-shard", "7", "--workers", "1") == 0
    assert run(jsonl, images, tmp_path / "w3", "--samples-per-shard", "7", "--workers", "3") == 0
    one, three = folder_bytes(tmp_path / "w1"), folder_bytes(tmp_path / "w3")
    assert len(one) == 2 * 7 + 1 and one == three  # 47 lines in runs of 7: seven shards + indexes + manifest
    manifest = mf.load_manifest(tmp_path / "w1")
    # Shard k holds the samples of lines 7k+1 .. 7k+7, whatever was skipped before it.
    assert [(e["first_line"] - 1) // 7 for e in manifest["shards"]] == list(range(7))
    assert [(e["last_line"] - 1) // 7 for e in manifest["shards"]] == list(range(7))
    assert sum(e["samples"] for e in manifest["shards"]) == 40
    assert manifest["input_records"] == 44 and manifest["total_samples"] == 40
    assert manifest["skipped_by_reason"] == {"missing_image": 4} and manifest["blank_lines"] == 3
    # The command line (one thread, no torch) forks its workers: the same bytes again.
    result = subprocess.run([sys.executable, "-m", "data_tools.shard", *cli(jsonl, images, tmp_path / "cli", "--samples-per-shard",
                                                                           "7", "--workers", "2")],
                            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert folder_bytes(tmp_path / "cli") == {**one, mf.MANIFEST_NAME: folder_bytes(tmp_path / "cli")[mf.MANIFEST_NAME]}


def test_max_shard_bytes_starts_new_shards_before_the_limit(tmp_path):
    jsonl, images = bulk_corpus(tmp_path, n=30)
    assert run(jsonl, images, tmp_path / "out", "--max-shard-bytes", "20480") == 0
    manifest = mf.load_manifest(tmp_path / "out")
    assert len(manifest["shards"]) > 2
    for entry in manifest["shards"]:
        assert entry["bytes"] == (tmp_path / "out" / entry["name"]).stat().st_size <= 20480


class Interrupt(Exception):
    pass


def interrupt_after(k: int):
    def hook(index: int) -> None:
        if index == k - 1:
            raise Interrupt
    return hook


BY_BYTES = ["--max-shard-bytes", "12288", "--samples-per-shard", "10"]  # runs of 10 lines, split by size


@pytest.mark.parametrize("workers, limit, k", [(1, ["--samples-per-shard", "6"], 3),
                                              (2, ["--samples-per-shard", "6"], 3),
                                              (1, BY_BYTES, 1), (2, BY_BYTES, 3)])
def test_interrupted_run_resumes_without_duplicates_or_losses(tmp_path, workers, limit, k):
    """Stopped once k shards are complete (with a byte limit, a run of records may make several shards and
    is recorded as a whole); the resumed run must count skips and blank lines once and give the same bytes."""
    jsonl, images = bulk_corpus(tmp_path)
    flags = [*limit, "--workers", str(workers)]
    assert run(jsonl, images, tmp_path / "clean", *flags) == 0
    assert len(mf.load_manifest(tmp_path / "clean")["shards"]) > 4
    opts = shard.parse_args(cli(jsonl, images, tmp_path / "out", *flags))
    with pytest.raises(Interrupt):
        shard.shard_corpus(opts, after_shard=interrupt_after(k))
    out = tmp_path / "out"
    recorded = [e["name"] for e in json.loads((out / shard.PROGRESS_NAME).read_text())["shards"]]
    assert len(recorded) >= k and recorded == [f"bulk-{i:06d}.tar" for i in range(len(recorded))]
    assert sorted(p.name for p in out.iterdir()) == sorted([shard.PROGRESS_NAME, *recorded,
                                                            *(mf.index_name(n) for n in recorded)])
    # What a hard kill leaves behind: a half-written next shard, and a worker's unfinished run.
    (out / f"bulk-{len(recorded):06d}.tar.tmp").write_bytes(b"partial")
    (out / (shard.part_name("bulk", 4, 0, 12345) + ".tmp")).write_bytes(b"partial")
    assert run(jsonl, images, out, *flags) == 0
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")


def test_strict_with_workers_stops_at_the_first_bad_record_and_keeps_the_runs_before_it(tmp_path, capsys):
    """bulk_corpus's first bad record is line 5 (then 15, 26, 37): with runs of 3 lines and 3 workers, runs
    after it may already be written when it is found; they are removed, the run before it is kept."""
    jsonl, images = bulk_corpus(tmp_path)
    out = tmp_path / "out"
    assert run(jsonl, images, out, "--samples-per-shard", "3", "--workers", "3", "--strict") == 2
    err = capsys.readouterr().err
    assert "line 5: missing_image" in err and "--strict" in err
    assert sorted(p.name for p in out.iterdir()) == [shard.PROGRESS_NAME, "bulk-000000.tar",
                                                      "bulk-000000.tar.idx.json"]
    # The same command again resumes after the kept run and stops at the same record.
    assert run(jsonl, images, out, "--samples-per-shard", "3", "--workers", "3", "--strict") == 2
    assert "line 5: missing_image" in capsys.readouterr().err


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; whoever adopted it may not reap it at once


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_kill_9_with_workers_leaves_no_worker_running_and_resumes_to_the_same_bytes(tmp_path):
    """SIGKILL of the command once its second shard is recorded: its pool workers end by themselves
    (they would otherwise wait for tasks forever) and the same command then finishes the same bytes."""
    jsonl, images = bulk_corpus(tmp_path)
    flags = ["--samples-per-shard", "4", "--workers", "2"]
    assert run(jsonl, images, tmp_path / "clean", *flags) == 0
    pids = tmp_path / "pids"
    driver = (
        "import multiprocessing, os, signal, sys\n"
        "from data_tools import shard\n"
        "def hook(i):\n"
        "    if i == 1:\n"
        f"        open({str(pids)!r}, 'w').write(' '.join(str(p.pid) for p in multiprocessing.active_children()))\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "shard.shard_corpus(shard.parse_args(sys.argv[1:]), after_shard=hook)\n")
    result = subprocess.run([sys.executable, "-c", driver, *cli(jsonl, images, tmp_path / "out", *flags)],
                            cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert result.returncode == -9
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 10
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, workers)), "pool workers outlived the killed command"
    assert run(jsonl, images, tmp_path / "out", *flags) == 0
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "clean")


def test_ctrl_c_with_workers_ends_promptly_without_tracebacks_and_resumes(tmp_path):
    """Ctrl-C reaches the whole process group: the workers ignore it, the command stops them, removes their
    unfinished shards and exits 130 with one line (it could hang in a worker's queue read before)."""
    jsonl, images = bulk_corpus(tmp_path)
    flags = ["--samples-per-shard", "4", "--workers", "2"]
    assert run(jsonl, images, tmp_path / "clean", *flags) == 0
    driver = (
        "import functools, os, signal, sys\n"
        # As at a terminal: a background job of a non-interactive shell (CI) inherits SIGINT ignored.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from data_tools import shard\n"
        "def hook(i):\n"
        "    if i == 1:\n"
        "        os.killpg(os.getpgid(0), signal.SIGINT)\n"
        "shard.shard_corpus = functools.partial(shard.shard_corpus, after_shard=hook)\n"
        "sys.exit(shard.main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", driver, *cli(jsonl, images, out, *flags)], start_new_session=True,
                            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert "interrupted; run the same command again to resume" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(out.glob("*.part.tmp"))
    assert run(jsonl, images, out, *flags) == 0
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")


def test_a_folder_where_nothing_was_complete_takes_a_corrected_command(tmp_path, capsys):
    """A run that failed before its first shard leaves only its progress record; the corrected input (or other
    options) must not be refused as 'an interrupted run made differently'."""
    jsonl, images = bulk_corpus(tmp_path)
    out = tmp_path / "out"
    assert run(jsonl, images, out, "--strict") == 2  # line 5 names a missing picture
    lines = jsonl.read_text().splitlines(keepends=True)
    jsonl.write_text("".join(line for line in lines if "missing.jpg" not in line))
    assert run(jsonl, images, out, "--strict") == 0
    assert mf.load_manifest(out)["total_samples"] == 40


def test_a_complete_folder_of_the_earlier_boundaries_is_kept_as_it_is(tmp_path, capsys):
    jsonl, images = bulk_corpus(tmp_path)
    out = tmp_path / "out"
    assert run(jsonl, images, out, "--samples-per-shard", "5") == 0
    manifest = json.loads((out / mf.MANIFEST_NAME).read_text())
    del manifest["args"]["boundaries"]  # what the earlier version wrote
    (out / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
    before = folder_bytes(out)
    capsys.readouterr()
    assert run(jsonl, images, out, "--samples-per-shard", "5") == 0
    assert "made by an earlier version" in capsys.readouterr().out and folder_bytes(out) == before
    assert run(jsonl, images, out, "--samples-per-shard", "6") == 2


def test_crash_inside_a_shard_leaves_no_partial_file_and_resumes(tmp_path, monkeypatch):
    jsonl, images = bulk_corpus(tmp_path)
    assert run(jsonl, images, tmp_path / "clean", "--samples-per-shard", "8") == 0
    calls = {"n": 0}
    real_add = shard_writer.ShardSink.add

    def failing_add(self, key, members, line):
        calls["n"] += 1
        if calls["n"] == 12:
            raise Interrupt
        real_add(self, key, members, line)

    monkeypatch.setattr(shard_writer.ShardSink, "add", failing_add)
    with pytest.raises(Interrupt):
        run(jsonl, images, tmp_path / "out", "--samples-per-shard", "8")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        shard.PROGRESS_NAME, "bulk-000000.tar", "bulk-000000.tar.idx.json"]
    assert run(jsonl, images, tmp_path / "out", "--samples-per-shard", "8") == 0
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "clean")


def test_complete_folder_rerun_is_a_no_op_and_other_args_are_refused(tmp_path, capsys):
    jsonl, images = good_corpus(tmp_path)
    out = tmp_path / "out"
    assert run(jsonl, images, out, "--samples-per-shard", "2") == 0
    before = folder_bytes(out)
    capsys.readouterr()
    assert run(jsonl, images, out, "--samples-per-shard", "2", "--workers", "2") == 0
    assert "already holds the complete output" in capsys.readouterr().out
    assert run(jsonl, images, out, "--samples-per-shard", "3") == 2
    err = capsys.readouterr().err
    assert "samples_per_shard: 2 there, 3 now" in err and "--overwrite" in err
    assert folder_bytes(out) == before
    write_jsonl(jsonl, [{"conversations": turn("a", "b")}])
    assert run(jsonl, images, out, "--samples-per-shard", "2") == 2
    assert "the input's content differs" in capsys.readouterr().err
    assert run(jsonl, images, out, "--samples-per-shard", "2", "--overwrite") == 0
    assert mf.load_manifest(out)["total_samples"] == 1 and len(list(out.glob("*.tar"))) == 1


def test_interrupted_folder_with_other_args_is_refused(tmp_path, capsys):
    jsonl, images = bulk_corpus(tmp_path)
    opts = shard.parse_args(cli(jsonl, images, tmp_path / "out", "--samples-per-shard", "5"))
    with pytest.raises(Interrupt):
        shard.shard_corpus(opts, after_shard=interrupt_after(1))
    assert run(jsonl, images, tmp_path / "out", "--samples-per-shard", "5", "--resize-max", "16") == 2
    err = capsys.readouterr().err
    assert "interrupted run made differently" in err and "resize_max" in err and "--overwrite" in err


def test_foreign_shards_are_refused(tmp_path, capsys):
    jsonl, images = good_corpus(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "other-000000.tar").write_bytes(b"x")
    assert run(jsonl, images, tmp_path / "out") == 2
    assert "without a manifest" in capsys.readouterr().err


def test_resize_max_shrinks_only_large_images(tmp_path):
    images = tmp_path / "images"
    save_picture(picture((200, 100), "red"), images / "big.jpg")
    save_picture(picture((200, 100), "blue", mode="RGBA"), images / "big.png")
    save_picture(picture((40, 30), "green"), images / "small.jpg")
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"conversations": turn("<image><image><image>", "x"),
                                                "image": "big.jpg,big.png,small.jpg"}])
    assert run(jsonl, images, tmp_path / "out", "--resize-max", "64") == 0
    members = read_tar(tmp_path / "out" / "d-000000.tar")
    sizes = {name: Image.open(io.BytesIO(data)).size for name, data in members.items() if not name.endswith("json")}
    assert sizes == {"d_000000001.0.jpg": (64, 32), "d_000000001.1.png": (64, 32), "d_000000001.2.jpg": (40, 30)}
    assert members["d_000000001.2.jpg"] == (images / "small.jpg").read_bytes()


def test_full_decode_accepts_good_images_and_writes_the_same_shards(tmp_path):
    jsonl, images = good_corpus(tmp_path)
    assert run(jsonl, images, tmp_path / "a") == 0
    assert run(jsonl, images, tmp_path / "b", "--full-decode") == 0
    a, b = mf.load_manifest(tmp_path / "a"), mf.load_manifest(tmp_path / "b")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert b["args"]["full_decode"] is True


def test_bom_and_crlf_lines_are_read(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    record = json.dumps({"conversations": turn("hi", "hello")}).encode()
    jsonl.write_bytes(b"\xef\xbb\xbf" + record + b"\r\n" + record + b"\r\n")
    (tmp_path / "images").mkdir()
    assert run(jsonl, tmp_path / "images", tmp_path / "out") == 0
    assert mf.load_manifest(tmp_path / "out")["total_samples"] == 2


def test_manifest_helpers_refuse_inconsistent_manifests(tmp_path):
    manifest = mf.load_manifest(FIXTURE)
    broken = {**manifest, "input_records": manifest["input_records"] + 1}
    with pytest.raises(mf.ManifestError, match="input_records=8 != total_samples=6 \\+ skipped=1"):
        mf.write_manifest(tmp_path, broken)
    (tmp_path / mf.MANIFEST_NAME).write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(mf.ManifestError, match="vlm-shards/1"):
        mf.load_manifest(tmp_path)
    with pytest.raises(mf.ManifestError, match="no manifest.json"):
        mf.load_manifest(tmp_path / "nowhere")


def test_committed_fixture_is_what_its_documented_command_makes(tmp_path):
    jsonl = write_corpus(tmp_path / "corpus")
    assert run(jsonl, tmp_path / "corpus" / "images", tmp_path / "out", "--prefix", "tiny",
               "--samples-per-shard", "4") == 0
    made, committed = folder_bytes(tmp_path / "out"), folder_bytes(FIXTURE)
    assert sorted(made) == sorted(committed)
    stale = [name for name in made if name != mf.MANIFEST_NAME and made[name] != committed[name]]
    assert not stale, f"{stale} differ: regenerate with the commands in tests/fixtures/README.md"
    ours, theirs = json.loads(made[mf.MANIFEST_NAME]), json.loads(committed[mf.MANIFEST_NAME])
    assert {**ours, "source": None} == {**theirs, "source": None}
    manifest = mf.load_manifest(FIXTURE)
    assert (manifest["total_samples"], len(manifest["shards"]), manifest["skipped_by_reason"]) == \
        (6, 2, {"missing_image": 1})

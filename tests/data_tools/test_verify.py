"""python -m data_tools.verify: a clean folder passes; corruption, wrong offsets and losses are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_tools import verify
from vlm.formats import manifest as mf

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_shards"


@pytest.fixture
def shards(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "shards"))


def rewrite_index(folder: Path, shard: int, change) -> None:
    """Edit one shard's index and record its new sha256, so only the offset checks can notice."""
    manifest = mf.load_manifest(folder)
    entry = manifest["shards"][shard]
    index = mf.load_index(folder / entry["index"])
    change(index)
    (folder / entry["index"]).write_bytes(mf.dumps(index, compact=True))
    entry["index_sha256"] = mf.sha256_file(folder / entry["index"])
    mf.write_manifest(folder, manifest)


def test_clean_folder_passes(shards, capsys):
    assert verify.main([str(shards)]) == 0
    assert "OK: 2 shard(s), 6 sample(s)" in capsys.readouterr().out


def test_flipped_byte_in_a_shard_is_caught(shards, capsys):
    index = mf.load_index(shards / "tiny-000000.tar.idx.json")
    data = bytearray((shards / "tiny-000000.tar").read_bytes())
    data[index["offsets"][1] + 512 + 100] ^= 0x01  # inside sample 2's first image, past its header
    (shards / "tiny-000000.tar").write_bytes(bytes(data))
    assert verify.main([str(shards)]) == 1
    err = capsys.readouterr().err
    assert "FAILED: 1 mismatch(es)" in err and "tiny-000000.tar: sha256" in err


def test_wrong_offset_is_caught(shards, capsys):
    rewrite_index(shards, 0, lambda index: index["offsets"].__setitem__(1, index["offsets"][1] + 512))
    assert verify.main([str(shards)]) == 1
    err = capsys.readouterr().err
    assert "sample tiny_000000002 at offset" in err and "sha256" not in err


def test_swapped_index_entries_are_caught(shards, capsys):
    def swap(index):
        for name in ("offsets", "sizes"):
            index[name][0], index[name][1] = index[name][1], index[name][0]
    rewrite_index(shards, 0, swap)
    assert verify.main([str(shards)]) == 1
    assert "holds members of ['tiny_000000002']" in capsys.readouterr().err


def test_unindexed_sample_and_count_mismatch_are_caught(shards, capsys):
    rewrite_index(shards, 1, lambda index: [index[k].pop() for k in ("keys", "offsets", "sizes")])
    assert verify.main([str(shards)]) == 1
    err = capsys.readouterr().err
    assert "1 samples, manifest says 2" in err and "data after the last indexed sample" in err


def test_missing_shard_is_caught(shards, capsys):
    (shards / "tiny-000001.tar").unlink()
    assert verify.main([str(shards)]) == 1
    assert "tiny-000001.tar: missing" in capsys.readouterr().err


def test_broken_manifest_exits_2(shards, capsys):
    manifest = json.loads((shards / mf.MANIFEST_NAME).read_text())
    manifest["total_samples"] += 1
    (shards / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert verify.main([str(shards)]) == 2
    assert "input_records=7 != total_samples=7 + skipped=1" in capsys.readouterr().err

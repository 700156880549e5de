"""The synthetic corpus's eval_sft split (one scored SFT question per record), the other splits unchanged by
it, and the same bytes for any number of picture-drawing workers."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_tools.synth import build_record, iter_corpus_text, write_corpus
from data_tools.synth_text import QUESTION_TYPES, parse_answer

N_TYPES = len(QUESTION_TYPES)

# Taken before eval_sft existed: the records (and scenes) of the older splits must not move.
RECORD_HASHES = {
    "pretrain/en": "5414c5628598c57d", "sft/en": "90aebb1aba0adec4", "eval/en": "9851d0fd41e0abdf",
    "pretrain/zh": "15606175c288acdf", "sft/zh": "cef75d868d764b8a", "eval/zh": "d02d287611059f26",
}
JSONL_HASHES = {"pretrain": "9707a7c9199aec50", "sft": "118ffa1d2c83f2d7", "eval": "993cb0dc1e86aef6"}
TOKENIZER_TEXT_HASHES = {"en": "fcebf7ffe81eb03e", "zh": "9c2c828319ed5662"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _records(out: Path, split: str) -> list[dict]:
    with open(out / f"{split}_data.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_the_older_splits_are_the_records_they_were():
    for key, expected in RECORD_HASHES.items():
        split, lang = key.split("/")
        h = hashlib.sha256()
        for index in range(200):
            record, pictures = build_record(split, index, 0, lang)
            h.update(json.dumps(record, ensure_ascii=False).encode())
            h.update(repr(pictures).encode())  # the scenes: what the pictures are drawn from
        assert h.hexdigest()[:16] == expected, key
    for lang, expected in TOKENIZER_TEXT_HASHES.items():  # the built-in tokenizer's training text
        assert _sha("\n".join(iter_corpus_text(lang, 100)).encode()) == expected


def test_the_older_files_are_the_bytes_they_were(tmp_path):
    write_corpus(tmp_path, pretrain=10, sft=24, eval=6, eval_sft=17, seed=2, lang="zh", progress=False, workers=1)
    for split, expected in JSONL_HASHES.items():
        assert _sha((tmp_path / f"{split}_data.jsonl").read_bytes()) == expected, split
    info = json.loads((tmp_path / "synth_info.json").read_text())
    assert info["records"] == {"pretrain": 10, "sft": 24, "eval": 6, "eval_sft": 17}


def test_any_number_of_workers_writes_the_same_bytes(tmp_path):
    counts = {"pretrain": 40, "sft": 40, "eval": 10, "eval_sft": 34}  # 124 records: two chunks of 64
    for workers in (1, 2, 3):
        write_corpus(tmp_path / str(workers), **counts, seed=5, progress=False, workers=workers)
    one = _files(tmp_path / "1")
    assert _files(tmp_path / "2") == one and _files(tmp_path / "3") == one
    assert len([n for n in one if n.startswith("eval_sft_images/")]) == 14 + 2 * 8  # 34 = 14 single, 8 pair, 12 text
    with pytest.raises(ValueError, match="workers"):
        write_corpus(tmp_path / "none", **counts, progress=False, workers=0)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_every_type_is_asked_evenly_with_its_truth(lang):
    records = [build_record("eval_sft", index, seed=3, lang=lang) for index in range(6 * N_TYPES)]
    types, turns = Counter(), Counter()
    for index, (record, pictures) in enumerate(records):
        truth, messages = record["truth"], record["conversations"]
        assert truth["type"] == QUESTION_TYPES[index % N_TYPES] and truth["lang"] == lang
        types[truth["type"]] += 1
        turns[truth["turn"]] += 1
        # cut after the scored reply; the earlier turns are other questions of the same group
        assert len(messages) == 2 * truth["turn"] and messages[-1]["content"] == truth["answer"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * truth["turn"]
        group = truth["type"].split("/")[0]
        assert len(pictures) == {"single": 1, "pair": 2, "text": 0}[group]
        assert ("image" in record) == bool(pictures)
        assert all(not scene.grayscale for _, scene in pictures)
        tags = messages[0]["content"].count("<image>")
        assert tags == len(pictures) and all("<image>" not in m["content"] for m in messages[1:])
        # the attribute is what the generator's own grammar reads out of the expected reply
        got = parse_answer(truth["type"], truth["answer"], lang)
        if group == "text":
            assert truth["attribute"] == truth["answer"]
        else:
            assert got == truth["attribute"], truth
    assert set(types.values()) == {6} and len(types) == N_TYPES
    assert turns[2] + turns[3] > turns[1] > 0  # multi-turn history is exercised


def test_written_split_pictures_and_attributes(tmp_path):
    write_corpus(tmp_path, pretrain=0, sft=0, eval=0, eval_sft=N_TYPES, seed=1, progress=False, workers=1)
    records = _records(tmp_path, "eval_sft")
    assert [r["truth"]["type"] for r in records] == list(QUESTION_TYPES)
    names = {n for r in records if "image" in r for n in r["image"].split(", ")}
    assert names == {p.name for p in (tmp_path / "eval_sft_images").iterdir()}
    for name in names:
        with Image.open(tmp_path / "eval_sft_images" / name) as im:
            assert im.mode in ("RGB", "RGBA")
    by_type = {r["truth"]["type"]: r["truth"]["attribute"] for r in records}
    assert isinstance(by_type["single/count"], int) and by_type["single/exists"] in ("yes", "no")
    assert by_type["pair/more"] in ("first", "second", "same") and len(by_type["pair/counts"]) == 2
    assert by_type["pair/both"] in ("both", "first", "second", "neither")
    assert {"kind", "colour", "position", "size"} == set(by_type["single/describe"][0])
    assert by_type["single/kind_at"] == "none" or set(by_type["single/kind_at"]) == {"kind", "colour", "size"}

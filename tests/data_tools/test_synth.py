"""The built-in synthetic corpus: layout, determinism, picture formats, record contracts and truth."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from data_tools.shapes import BACKGROUNDS, COLOURS, KINDS, render, sample_scene
from data_tools.synth import (
    EVAL_PROMPT,
    INFO_FILE,
    SPLITS,
    build_record,
    iter_corpus_text,
    main,
    parse_description,
)
from data_tools.synth_text import WORDS

COUNTS = {"pretrain": 60, "sft": 60, "eval": 12, "eval_sft": 34}


def _make(out: Path, seed: int = 0, lang: str = "en", counts: dict | None = None) -> Path:
    counts = {"eval_sft": 0, **(counts or COUNTS)}
    argv = ["--out", str(out), "--seed", str(seed), "--lang", lang]
    for split, n in counts.items():
        argv += [f"--{split}", str(n)]
    assert main(argv) == 0
    return out


def _records(out: Path, split: str) -> list[dict]:
    with open(out / f"{split}_data.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _images(record: dict) -> list[str]:
    return record["image"].split(", ") if "image" in record else []


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _make(tmp_path_factory.mktemp("synth") / "dataset")


@pytest.fixture(scope="module")
def corpus_zh(tmp_path_factory) -> Path:
    return _make(tmp_path_factory.mktemp("synth_zh") / "dataset", lang="zh",
                 counts={"pretrain": 8, "sft": 30, "eval": 6, "eval_sft": 17})


def test_layout_and_counts(corpus):
    for split in SPLITS:
        assert (corpus / f"{split}_data.jsonl").is_file()
        assert len(_records(corpus, split)) == COUNTS[split]
        listed = {name for r in _records(corpus, split) for name in _images(r)}
        on_disk = {p.name for p in (corpus / f"{split}_images").iterdir()}
        assert listed == on_disk  # every listed image exists, and no stray files
    assert json.loads((corpus / INFO_FILE).read_text())["records"] == COUNTS


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    small = {"pretrain": 6, "sft": 10, "eval": 4, "eval_sft": 5}
    a = _files(_make(tmp_path / "a", seed=3, counts=small))
    b = _files(_make(tmp_path / "b", seed=3, counts=small))
    c = _files(_make(tmp_path / "c", seed=4, counts=small))
    assert a == b
    assert a["pretrain_data.jsonl"] != c["pretrain_data.jsonl"]


def test_record_does_not_depend_on_other_counts_or_language():
    en, _ = build_record("sft", 5, seed=1, lang="en")
    zh, _ = build_record("sft", 5, seed=1, lang="zh")
    assert en.get("image") == zh.get("image")  # same pictures, different words
    assert en["conversations"] != zh["conversations"]


def test_formats_present(corpus):
    seen = set()
    for split in SPLITS:
        for record in _records(corpus, split):
            for name in _images(record):
                with Image.open(corpus / f"{split}_images" / name) as im:
                    assert name.endswith({"JPEG": ".jpg", "PNG": ".png"}[im.format])
                    assert 64 <= min(im.size) and max(im.size) <= 320
                    seen |= {im.format, im.mode, "non-square" if im.size[0] != im.size[1] else "square"}
    assert {"JPEG", "PNG", "RGB", "RGBA", "L", "square", "non-square"} <= seen


def test_placeholders_match_images_and_roles_alternate(corpus):
    for split in SPLITS:
        for record in _records(corpus, split):
            messages = record["conversations"]
            assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
            assert all(m["content"].strip() for m in messages)
            text = "".join(m["content"] for m in messages)
            assert text.count("<image>") == len(_images(record))
            assert all("<image>" not in m["content"] for m in messages[1:])  # all in the first question


def test_sft_mix_two_images_text_only_multi_turn(corpus):
    records = _records(corpus, "sft")
    n_images = [len(_images(r)) for r in records]
    assert {0, 1, 2} <= set(n_images)
    assert {len(r["conversations"]) // 2 for r in records} == {2, 3}
    pair = next(r for r in records if len(_images(r)) == 2)
    assert pair["conversations"][0]["content"].startswith("<image>\n<image>\n") or \
        pair["conversations"][0]["content"].endswith("\n<image>\n<image>")
    assert all("image" not in r for r, n in zip(records, n_images) if n == 0)


def test_pretrain_caption_lists_every_shape(corpus):
    prompts = set()
    for index, record in enumerate(_records(corpus, "pretrain")):
        _, pictures = build_record("pretrain", index, seed=0)
        scene = pictures[0][1]
        caption = record["conversations"][1]["content"]
        assert parse_description(caption, "en") == [s.truth(scene.grayscale) for s in scene.shapes]
        prompts.add(record["conversations"][0]["content"])
    assert len(prompts) >= 4


def test_grayscale_answers_never_claim_a_colour(corpus):
    colour_words = set(COLOURS)
    checked = 0
    for split in ("pretrain", "sft"):
        for record in _records(corpus, split):
            names = _images(record)
            if len(names) != 1:
                continue
            with Image.open(corpus / f"{split}_images" / names[0]) as im:
                if im.mode != "L":
                    continue
            answers = " ".join(m["content"] for m in record["conversations"][1::2]).lower()
            assert not colour_words & set(answers.replace(".", " ").replace(",", " ").split()), answers
            checked += 1
    assert checked > 0


def test_eval_truth_matches_answer_and_prompt(corpus):
    for index, record in enumerate(_records(corpus, "eval")):
        truth = record["truth"]
        assert record["conversations"][0]["content"] == EVAL_PROMPT["en"]
        assert record["conversations"][1]["content"] == truth["answer"]
        assert truth["count"] == len(truth["shapes"]) == (1 if index % 2 == 0 else truth["count"])
        assert not truth["grayscale"]
        assert parse_description(truth["answer"], "en") == truth["shapes"]
        with Image.open(corpus / "eval_images" / record["image"]) as im:
            assert im.mode in ("RGB", "RGBA")
    assert {r["truth"]["count"] for r in _records(corpus, "eval")} >= {1, 2}


def test_scenes_are_drawn_where_the_truth_says():
    rng = random.Random(7)
    for _ in range(40):
        scene = sample_scene(rng, allow_grayscale=False)
        image = render(scene).convert("RGB")
        side = min(scene.width, scene.height)
        ox, oy = (scene.width - side) / 2, (scene.height - side) / 2
        corner = image.getpixel((0, 0))
        for shape in scene.shapes:
            column, row = int((shape.cx - ox) * 3 // side), int((shape.cy - oy) * 3 // side)
            name = "center" if (row, column) == (1, 1) else \
                f"{('top', 'middle', 'bottom')[row]} {('left', 'middle', 'right')[column]}"
            assert shape.position == name
            pixel = image.getpixel((int(shape.cx), int(shape.cy)))
            assert max(abs(a - b) for a, b in zip(pixel, COLOURS[shape.colour])) <= 2
            assert max(abs(a - b) for a, b in zip(corner, COLOURS[shape.colour])) > 100
            if len(scene.shapes) == 1:
                assert shape.extent >= side / 3


def test_backgrounds_are_light_and_shape_colours_saturated():
    assert all(min(b) >= 200 for b in BACKGROUNDS)
    assert all(min(c) <= 60 for c in COLOURS.values())
    assert len(KINDS) >= 4 and len(COLOURS) >= 6


def test_parse_description_grayscale_and_articles():
    shapes = parse_description("Two shapes, in grayscale: a small star in the top right and a large square "
                               "in the bottom middle.", "en")
    assert shapes == [{"kind": "star", "colour": None, "position": "top right", "size": "small"},
                      {"kind": "square", "colour": None, "position": "bottom middle", "size": "large"}]
    with pytest.raises(ValueError, match="language"):
        parse_description("x", "fr")


def test_chinese_corpus(corpus_zh):
    for split in SPLITS:
        for record in _records(corpus_zh, split):
            answers = [m["content"] for m in record["conversations"][1::2]]
            assert all(any("\u4e00" <= ch <= "\u9fff" for ch in a) for a in answers)
    for record in _records(corpus_zh, "eval"):
        assert record["conversations"][0]["content"] == EVAL_PROMPT["zh"]
        assert record["truth"]["lang"] == "zh"
        assert parse_description(record["truth"]["answer"], "zh") == record["truth"]["shapes"]
    assert any(len(_images(r)) == 2 for r in _records(corpus_zh, "sft"))


def test_rerun_replaces_our_corpus_but_refuses_foreign_data(tmp_path):
    out = _make(tmp_path / "d", counts={"pretrain": 5, "sft": 3, "eval": 2, "eval_sft": 12})
    _make(out, counts={"pretrain": 2, "sft": 1, "eval": 1, "eval_sft": 1})
    assert len(list((out / "pretrain_images").iterdir())) == 2  # no stale pictures from the first run
    assert [p.name for p in (out / "eval_sft_images").iterdir()] == _images(_records(out, "eval_sft")[0])
    foreign = tmp_path / "user_data"
    foreign.mkdir()
    (foreign / "pretrain_data.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="not written by data_tools.synth"):
        _make(foreign, counts={"pretrain": 1, "sft": 1, "eval": 1})
    assert (foreign / "pretrain_data.jsonl").read_text() == "{}\n"


def test_corpus_text_covers_the_vocabulary():
    for lang in ("en", "zh"):
        text = "\n".join(iter_corpus_text(lang, records_per_split=20))
        assert "<image>" not in text
        for table in ("kind", "colour", "position", "size"):
            assert all(word in text for word in WORDS[lang][table].values())

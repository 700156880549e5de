"""One set of record rules and one pixel limit, shared by the sharder, the trainer's text stage, eval and chat."""

from __future__ import annotations

import argparse
import inspect
import json

import pytest

from data_tools import shard
from vlm.config import DataConfig
from vlm.data.image import ImagePreprocessor
from vlm.data.text import ChatEncoder
from vlm.formats.constants import DEFAULT_MAX_PIXELS
from vlm.formats.errors import BadSample
from vlm.formats.records import check_conversations, parse_record
from vlm.inference import LoadedVLM, add_model_flags, load_model
from vlm.tokenizer import image_placeholder_id, load_tokenizer

SYSTEM_FIRST = [{"role": "system", "content": "You name colours."},
                {"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "Green."}]
IMAGE_IN_REPLY = [{"role": "user", "content": "<image>\nDescribe."},
                  {"role": "assistant", "content": "Here it is again: <image>"}]


@pytest.fixture(scope="module")
def encoder():
    tokenizer = load_tokenizer()
    return ChatEncoder(tokenizer, image_placeholder_id(tokenizer), image_token_len=4, max_seq_len=256)


def test_a_leading_system_turn_is_a_valid_record_for_the_sharder_and_the_trainer(encoder):
    record, names = parse_record(json.dumps({"conversations": SYSTEM_FIRST, "image": "a.jpg"}).encode())
    assert names == ["a.jpg"]
    sample = encoder(record["conversations"], num_images=1)
    assert int((sample["labels"] != -100).sum()) > 0


@pytest.mark.parametrize("conversations, images, reason", [
    (IMAGE_IN_REPLY, 2, "image_in_reply"),
    ([{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "<image> is a picture."}], 1,
     "image_in_reply"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],
     0, "bad_roles"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], 0, "empty_content"),
    ([{"role": "user", "content": "a\ue002"}, {"role": "assistant", "content": "b"}], 0, "reserved_char"),
])
def test_the_sharder_and_the_trainer_refuse_a_record_for_the_same_reason(encoder, conversations, images, reason):
    line = json.dumps({"conversations": conversations, "image": ", ".join(f"{i}.jpg" for i in range(images))})
    with pytest.raises(BadSample) as sharder:
        parse_record(line.encode())
    with pytest.raises(BadSample) as trainer:
        encoder(conversations, num_images=images)
    assert sharder.value.reason == trainer.value.reason == reason


def test_the_sharder_writes_a_system_turn_and_skips_an_image_in_a_reply(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for name in ("0.jpg", "1.jpg"):
        Image.new("RGB", (8, 8), "green").save(images / name)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"conversations": SYSTEM_FIRST, "image": "0.jpg"},
        {"conversations": IMAGE_IN_REPLY, "image": "0.jpg, 1.jpg"},
    ]) + "\n")
    # Half the records skipped: above the default --max-skip-fraction, so the run exits 1 with complete output.
    assert shard.main(["--jsonl", str(jsonl), "--images", str(images), "--out", str(tmp_path / "out")]) == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["total_samples"] == 1 and manifest["skipped_by_reason"] == {"image_in_reply": 1}


def test_a_prompt_ends_with_the_user_turn_to_answer():
    assert check_conversations(SYSTEM_FIRST[:2], 1, prompt=True)[-1]["role"] == "user"
    with pytest.raises(BadSample, match="prompt must end"):
        check_conversations(SYSTEM_FIRST, 1, prompt=True)


def test_one_pixel_limit_everywhere(tmp_path):
    assert DataConfig().max_pixels == DEFAULT_MAX_PIXELS == 8192 * 8192
    (tmp_path / "j.jsonl").write_text("")
    options = shard.parse_args(["--jsonl", str(tmp_path / "j.jsonl"), "--images", str(tmp_path), "--out", "o"])
    assert options.max_pixels == DEFAULT_MAX_PIXELS
    assert ImagePreprocessor.__dataclass_fields__["max_pixels"].default == DEFAULT_MAX_PIXELS
    parser = argparse.ArgumentParser()
    add_model_flags(parser)  # eval and chat
    assert parser.parse_args(["--max_pixels", "100"]).max_pixels == 100
    assert parser.parse_args([]).max_pixels == DEFAULT_MAX_PIXELS
    for function in (load_model, LoadedVLM.__init__):
        assert inspect.signature(function).parameters["max_pixels"].default == DEFAULT_MAX_PIXELS

"""The built-in tokenizer: ids, round trips, chat template, image placeholder, loading errors, reproducible build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_tools.synth_text import WORDS
from data_tools.train_tokenizer import main as train_main
from data_tools.train_tokenizer import tokenizer_config, write_tokenizer
from vlm.tokenizer import builtin_tokenizer_path, image_placeholder_id, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _byte_bpe_folder(folder: Path, specials: list[str], text: list[str]) -> Path:
    """A tiny byte-level BPE folder in the layout MiniMind's tokenizer has (specials first, then the bytes)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text, trainer=trainer)
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[1], "eos_token": specials[2],
              "pad_token": specials[0], "unk_token": specials[0]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_special_token_ids(tok):
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>"])
    assert ids == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 0)
    assert tok.is_fast
    assert len(tok) <= 6400


@pytest.mark.parametrize("text", [
    "Hello, world! 123 + 456 = 579.\n\tTabs and  double  spaces ",
    "左上角有一个大的红色圆形。今天天气很好，我们去公园散步吧！",
    "emoji 😀🎉👍🏽 and rare CJK 𠀀 mixed: café naïve Ω",
])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert ids[0] not in (1, 2)  # no automatic bos/eos


def test_chat_template_is_chatml_without_default_system(tok):
    messages = [{"role": "user", "content": "<|image|>\nDescribe the shapes."},
                {"role": "assistant", "content": "One shape: a large red circle in the top left."}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\n<|image|>\nDescribe the shapes.<|im_end|>\n"
        "<|im_start|>assistant\nOne shape: a large red circle in the top left.<|im_end|>\n")
    with_system = [{"role": "system", "content": "Be brief."}, *messages[:1]]
    assert tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|image|>\nDescribe the shapes.<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_image_placeholder_runs_stay_one_token_each(tok):
    assert tok.encode("<|image|>" * 64, add_special_tokens=False) == [3] * 64
    ids = tok.encode("Look:<|image|><|image|>\nWhat?", add_special_tokens=False)
    assert ids.count(3) == 2 and ids[ids.index(3) + 1] == 3
    assert image_placeholder_id(tok) == 3
    assert tok.decode(ids, skip_special_tokens=True) == "Look:\nWhat?"


def test_corpus_words_tokenize_compactly(tok):
    en = WORDS["en"]
    for table in ("kind", "colour", "size", "count"):
        for word in en[table].values():
            assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, word
    caption = "Three shapes: a large red circle in the top left, a small blue star in the center and a small " \
              "orange triangle in the bottom right."
    assert len(tok.encode(caption, add_special_tokens=False)) == len(caption.replace(",", " ,").replace(
        ".", " .").replace(":", " :").split())  # one token per word and per punctuation mark
    for table in ("kind", "colour", "position", "size"):
        for word in WORDS["zh"][table].values():
            assert len(tok.encode(word, add_special_tokens=False)) == len(word), word  # one token per character


def test_minimind_style_placeholder_is_resolved(tmp_path):
    folder = _byte_bpe_folder(tmp_path / "mm", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                              ["a picture of a red circle", "hello world"] * 5)
    mm = load_tokenizer(folder)
    assert image_placeholder_id(mm, "@") == 34  # MiniMind's '@' x 196 image ids
    with pytest.raises(ValueError, match='placeholder: "@"'):
        image_placeholder_id(mm)


def test_the_placeholder_is_found_from_the_tokenizer_without_a_flag(tmp_path, tok):
    """Ours <|image|>, MiniMind-V 3v's <|image_pad|> (id 12 there), MiniMind's '@' for its 6400-token tokenizer."""
    assert image_placeholder_id(tok) == tok.convert_tokens_to_ids("<|image|>")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|reserved_{i}|>" for i in range(9)]
    v3 = load_tokenizer(_byte_bpe_folder(tmp_path / "v3", specials + ["<|image_pad|>"], ["a red circle"] * 5))
    assert v3.convert_tokens_to_ids("<|image_pad|>") == 12 and image_placeholder_id(v3) == 12
    mm = load_tokenizer(_byte_bpe_folder(tmp_path / "mm", specials[:3], ["a picture of a red circle"] * 5))
    mm.add_tokens([f"filler{i}" for i in range(6400 - len(mm))])  # MiniMind's size: 6400 tokens
    assert image_placeholder_id(mm) == 34 == image_placeholder_id(mm, "@")


def test_placeholder_that_merges_in_runs_is_refused(tmp_path):
    folder = _byte_bpe_folder(tmp_path / "merges", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                              ["@@@@ @@ @@@@@@"] * 20)
    with pytest.raises(ValueError, match="merges with itself"):
        image_placeholder_id(load_tokenizer(folder), "@")


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text(json.dumps(tokenizer_config()))
    with pytest.raises(ValueError, match="broken"):
        load_tokenizer(broken)


def test_builtin_path_is_inside_the_package():
    assert builtin_tokenizer_path().parts[-3:] == ("vlm", "assets", "tokenizer")


def test_training_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert train_main(["--out", str(tmp_path / name), "--vocab-size", "400"]) == 0
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    small = load_tokenizer(tmp_path / "a")
    assert len(small) == 400
    assert small.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>"]) == [0, 1, 2, 3]


def test_committed_tokenizer_is_what_the_command_builds(tmp_path):
    write_tokenizer(tmp_path, vocab_size=6400)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / file).read_bytes() == (builtin_tokenizer_path() / file).read_bytes(), \
            f"vlm/assets/tokenizer/{file} is stale: run python -m data_tools.train_tokenizer"

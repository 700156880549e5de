"""python -m data_tools.inspect: counts, decoded samples and token-length statistics."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from data_tools import inspect

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_shards"


def word_tokenizer(folder: Path) -> Path:
    """Every word or punctuation run is one (unknown) token; <s> and </s> are special."""
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
    tokenizer.save_pretrained(folder)
    return folder


def test_folder_report_counts_and_decodes_samples():
    report = inspect.inspect(FIXTURE, n_show=2)
    assert "2 shard(s)" in report
    assert "manifest: 7 records in, 6 samples, 1 skipped {'missing_image': 1}" in report
    assert "samples: 6; images per sample: {0: 1, 1: 4, 2: 1}; image formats: {'jpg': 3, 'png': 3}" in report
    assert "image 0.jpg: 32x24 RGB  from red_square.jpg" in report
    assert "image 1.png: 24x24 RGB  from blue_circle.png" in report
    assert "user: First <image> then <image>: same colour?" in report
    assert "tiny_000000003" not in report  # only two samples shown
    assert "token lengths: pass --tokenizer DIR" in report


def test_single_shard_with_token_lengths(tmp_path, capsys):
    tokenizer = word_tokenizer(tmp_path / "tok")
    shard = FIXTURE / "tiny-000000.tar"
    assert inspect.main([str(shard), "--tokenizer", str(tokenizer), "--limit", "1", "--image-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert "1 shard(s)" in out and "samples: 1;" in out
    # "<s>user \nDescribe the picture.</s><s>assistant A red square.</s>" is 14 tokens, plus 10 for the image.
    assert "token lengths (chat template + 10 per image): min 24, median 24, p95 24, max 24" in out


def test_a_tokenizer_that_does_not_load_is_an_error(tmp_path, capsys):
    assert inspect.main([str(FIXTURE), "--tokenizer", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_percentiles_use_nearest_rank():
    assert inspect.percentiles(list(range(20, 0, -1))) == {"min": 1, "median": 10, "p95": 19, "max": 20}

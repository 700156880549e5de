"""Tiny shard folders for the loader tests, written with the sharder's own writer (`data_tools.shard_writer.ShardSink`).

`data_tools.shard` cuts shards at a fixed sample count; these helpers give shards of any size (deliberately
uneven ones) and let a test plant corrupt or hostile members. The folder follows `vlm.formats.manifest`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from data_tools.shard_writer import ShardSink
from vlm.data.image import ImagePreprocessConfig
from vlm.data.pipeline import EvalLoader, LoaderSettings, TrainLoader
from vlm.data.stages import SampleFormat
from vlm.formats import manifest as mf

IMAGE_TOKEN_ID = 3  # <|image|> in the built-in tokenizer
IMAGE_TOKEN_LEN = 4
MAX_SEQ_LEN = 64
SMALL_IMAGES = ImagePreprocessConfig(shortest_edge=16, crop=(16, 16))
_FORMAT_FIELDS = ("max_seq_len", "batching", "max_pixels", "image_token_id", "image_token_len")


def sample_format(tokenizer, **kw) -> SampleFormat:
    """The tests' sample format: 4 placeholders of id 3 per picture, 16 x 16 pixels, 64 tokens (kw overrides)."""
    return SampleFormat(**{"tokenizer": tokenizer, "image_config": SMALL_IMAGES, "image_token_id": IMAGE_TOKEN_ID,
                           "image_token_len": IMAGE_TOKEN_LEN, "max_seq_len": MAX_SEQ_LEN, **kw})


def make_loader(sources, tokenizer, eval: bool = False, **kw):
    """A TrainLoader (EvalLoader with eval=True) over `sources`; kw are SampleFormat or LoaderSettings fields."""
    fmt = sample_format(tokenizer, **{k: v for k, v in kw.items() if k in _FORMAT_FIELDS})
    settings = LoaderSettings(**{k: v for k, v in kw.items() if k not in _FORMAT_FIELDS})
    return (EvalLoader if eval else TrainLoader)([str(s) for s in sources], fmt, settings)


def jpeg(seed: int, size: tuple[int, int] = (20, 16)) -> bytes:
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return out.getvalue()


def members(i: int, images: int = 1) -> dict[str, bytes]:
    """A caption sample with `images` pictures (0 = text only)."""
    question = "<image>" * images + f"\nWhat is picture {i}?"
    record = {"conversations": [{"role": "user", "content": question},
                                {"role": "assistant", "content": f"Picture number {i}."}],
              "source": {"file": "data.jsonl", "line": i + 1}, "images": [f"{i}_{k}.jpg" for k in range(images)]}
    out = {"json": json.dumps(record).encode()}
    for k in range(images):
        out[f"{k}.jpg"] = jpeg(i * 7 + k)
    return out


def write_shards(folder: Path, counts: list[int], prefix: str = "c", special: dict | None = None,
                 images_of=lambda i: 1 if i % 5 else 0) -> Path:
    """Shards of `counts` samples each, keys `{prefix}_{line:09d}`; `special[i]` replaces sample i's members."""
    folder.mkdir(parents=True, exist_ok=True)
    special = special or {}
    entries, i = [], 0
    for s, count in enumerate(counts):
        sink = ShardSink(folder, mf.shard_name(prefix, s))
        for _ in range(count):
            sink.add(mf.sample_key(prefix, i + 1), special.get(i) or members(i, images_of(i)), i + 1)
            i += 1
        entries.append(sink.finish())
    manifest = {
        "format": mf.FORMAT, "tool": {"name": "tests", "version": "0"}, "args": {"prefix": prefix},
        "source": {"input": "data.jsonl", "format": "jsonl", "sha256": "", "bytes": 0, "images": "images"},
        "input_records": i, "blank_lines": 0, "total_samples": i, "shards": entries, "skipped": [],
        "skipped_by_reason": {},
    }
    mf.write_manifest(folder, manifest)
    return folder


def all_keys(prefix: str, n: int) -> set[str]:
    return {mf.sample_key(prefix, i + 1) for i in range(n)}

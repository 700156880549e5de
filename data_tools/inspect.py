"""Summarise shards: counts, a few decoded samples and token-length statistics.

    python -m data_tools.inspect data/shards/sft [--samples 3] [--tokenizer DIR] [--image-tokens 196]

PATH is one `.tar` shard or a shard folder (with manifest.json its shard list and skip counts are used).
Members are decoded by an allow-list only: `json` as JSON, images with PIL (header only, for the size);
anything else is counted and left alone. Token lengths use the tokenizer's chat template
(`transformers.AutoTokenizer.from_pretrained(DIR)`, local files only; without --tokenizer,
`vlm.tokenizer.load_tokenizer()` when it loads). `<image>` markers are left out of the text and
`--image-tokens N` adds N tokens per image instead, what the model spends on each (196 for CLIP ViT-B/16).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import json
import math
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from vlm.formats import manifest as mf
from vlm.formats.constants import IMAGE_EXTENSIONS, IMAGE_FORMATS, IMAGE_TAG


def shard_paths(path: Path) -> tuple[list[Path], dict | None]:
    """The shards PATH names, in order, and the folder's manifest if it has one."""
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a shard nor a folder")
    if (path / mf.MANIFEST_NAME).exists():
        manifest = mf.load_manifest(path)
        return [path / entry["name"] for entry in manifest["shards"]], manifest
    return sorted(path.glob("*.tar")), None


def iter_samples(paths: list[Path]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for every sample, reading the shards sequentially with plain tarfile."""
    for path in paths:
        with tarfile.open(path, "r:") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                member_key, suffix = mf.split_member_name(info.name)
                if member_key != key and members:
                    yield key, members
                    members = {}
                key = member_key
                members[suffix] = tar.extractfile(info).read()
            if members:
                yield key, members


def decode_sample(members: dict[str, bytes]) -> tuple[dict, list[tuple[str, tuple[int, int], str]]]:
    """(sample json, [(member, (w, h), mode), ...] for its images in placeholder order)."""
    doc = json.loads(members["json"]) if "json" in members else {}
    images = []
    for suffix in sorted((s for s in members if s.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS),
                         key=lambda s: int(s.split(".")[0]) if s.split(".")[0].isdigit() else -1):
        with Image.open(io.BytesIO(members[suffix]), formats=IMAGE_FORMATS) as image:
            images.append((suffix, image.size, image.mode))
    return doc, images


def format_sample(key: str, doc: dict, images: list, width: int = 160) -> str:
    """Lines showing one sample: key, source line, its images, and each turn cut to `width` characters."""
    source = doc.get("source", {})
    lines = [f"{key}  (source {source.get('file')}:{source.get('line')})"]
    for (suffix, (w, h), mode), name in zip(images, doc.get("images", [""] * len(images))):
        lines.append(f"  image {suffix}: {w}x{h} {mode}  from {name}")
    for turn in doc.get("conversations", []):
        text = turn.get("content", "").replace("\n", "\\n")
        lines.append(f"  {turn.get('role')}: {text[:width]}{'...' if len(text) > width else ''}")
    return "\n".join(lines)


def percentiles(values: list[int]) -> dict[str, int]:
    """min / median / p95 / max by nearest rank."""
    ordered = sorted(values)

    def rank(q: float) -> int:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"min": ordered[0], "median": rank(0.5), "p95": rank(0.95), "max": ordered[-1]}


def token_length(tokenizer, conversations: list[dict], n_images: int, image_tokens: int) -> int:
    """Chat-template tokens of the text without its `<image>` markers, plus `image_tokens` per image."""
    text_only = [{**turn, "content": turn["content"].replace(IMAGE_TAG, "")} for turn in conversations]
    text = tokenizer.apply_chat_template(text_only, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + n_images * image_tokens


def load_tokenizer(directory: str | None):
    """(tokenizer, None) from DIR or the project default (`vlm.tokenizer`), else (None, why not).

    A --tokenizer that does not load is an error; a missing default only means no token statistics.
    """
    if directory is not None:
        from transformers import AutoTokenizer

        if not Path(directory).is_dir():
            raise FileNotFoundError(f"--tokenizer {directory} is not a folder (a local tokenizer folder is needed)")

        return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False), None
    if importlib.util.find_spec("vlm.tokenizer") is None:
        return None, "pass --tokenizer DIR to compute them"
    try:
        return importlib.import_module("vlm.tokenizer").load_tokenizer(), None
    except (OSError, ValueError) as e:
        return None, f"the default tokenizer did not load ({e}); pass --tokenizer DIR"


def inspect(path: Path, n_show: int, tokenizer=None, image_tokens: int = 0, limit: int | None = None,
            no_tokenizer: str = "pass --tokenizer DIR to compute them") -> str:
    """The report printed by the command, as text."""
    paths, manifest = shard_paths(path)
    out = [f"{path}: {len(paths)} shard(s)"]
    if manifest is not None:
        out.append(f"manifest: {manifest['input_records']} records in, {manifest['total_samples']} samples, "
                   f"{len(manifest['skipped'])} skipped {manifest['skipped_by_reason']}")
    samples, per_sample, formats, other, lengths = 0, Counter(), Counter(), Counter(), []
    for key, members in iter_samples(paths):
        doc, images = decode_sample(members)
        samples += 1
        per_sample[len(images)] += 1
        formats.update(suffix.rsplit(".", 1)[-1] for suffix, _, _ in images)
        other.update(s for s in members if s != "json" and s.rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS)
        if samples <= n_show:
            out.append(format_sample(key, doc, images))
        if tokenizer is not None:
            lengths.append(token_length(tokenizer, doc["conversations"], len(images), image_tokens))
        if limit is not None and samples >= limit:
            break
    out.append(f"samples: {samples}; images per sample: {dict(sorted(per_sample.items()))}; "
               f"image formats: {dict(sorted(formats.items()))}")
    if other:
        out.append(f"other members (not decoded): {dict(other)}")
    if tokenizer is None:
        out.append(f"token lengths: {no_tokenizer}")
    elif lengths:
        stats = percentiles(lengths)
        out.append("token lengths (chat template" + (f" + {image_tokens} per image" if image_tokens else "")
                   + "): " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Print the report for PATH; returns 0, or 2 when a shard or the tokenizer cannot be read."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a .tar shard or a shard folder")
    parser.add_argument("--samples", type=int, default=3, help="how many samples to print (default 3)")
    parser.add_argument("--tokenizer", help="tokenizer folder for token-length statistics")
    parser.add_argument("--image-tokens", type=int, default=0,
                        help="tokens each image occupies in the model (e.g. 196), added to lengths")
    parser.add_argument("--limit", type=int, help="read at most this many samples (default: all)")
    args = parser.parse_args(argv)
    try:
        tokenizer, no_tokenizer = load_tokenizer(args.tokenizer)
        report = inspect(args.path, args.samples, tokenizer, args.image_tokens, args.limit, no_tokenizer or "")
    except (OSError, ValueError, tarfile.TarError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

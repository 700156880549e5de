"""The per-sample stages of the data pipeline and `SampleFormat`, which builds them.

    read (seek into the tar; exact mode only) -> decode (allow-list, `vlm.data.reader`) -> text (chat
    template, labels; before images, so a sample rejected for length costs no image decoding) -> images
    (the tower's resize, CLIP's shortest edge + centre crop or SigLIP's fixed size, under a pixel limit, kept
    uint8)

Each stage is a picklable callable on a sample dict that may raise `BadSample` (the pipeline skips and
counts it); `SampleFormat.collator()` then forms the rows (`vlm.data.collate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlm.data.collate import Collator
from vlm.data.image import ImagePreprocessConfig, ImagePreprocessor
from vlm.data.reader import ShardReader, decode_members
from vlm.data.text import ChatEncoder
from vlm.formats.constants import BATCHING, DEFAULT_MAX_PIXELS


@dataclass
class ReadSample:
    """Stage `read`: {"__id__"} -> adds "__key__" and "members" ({suffix: bytes}) by seeking into the shard."""

    reader: ShardReader

    def __call__(self, sample: dict) -> dict:
        sample["__key__"] = self.reader.key(sample["__id__"])
        _, sample["members"] = self.reader.read(sample["__id__"])
        return sample


def decode_sample(sample: dict) -> dict:
    """Stage `decode`: members -> "conversations" and "images" (bytes), by the allow-list of the reader."""
    return decode_members(sample["__key__"], sample.pop("members"))


@dataclass
class EncodeText:
    """Stage `text`: conversations -> "input_ids", "labels" (L,) with the chat template and loss mask."""

    encoder: ChatEncoder

    def __call__(self, sample: dict) -> dict:
        sample.update(self.encoder(sample["conversations"], num_images=len(sample["images"])))
        return sample


@dataclass
class PreprocessImages:
    """Stage `images`: encoded images -> "pixel_values" uint8 (n, 3, H, W), resized (and cropped), not normalised
    (the trainer normalises on its device with `PixelNormalizer`); (0, 3, H, W) for text-only samples."""

    preprocessor: ImagePreprocessor

    def __call__(self, sample: dict) -> dict:
        images = sample.pop("images")
        if images:
            sample["pixel_values"] = torch.stack([self.preprocessor.pixels(data) for data in images])
        else:
            sample["pixel_values"] = torch.zeros((0, *self.preprocessor.config.output_shape), dtype=torch.uint8)
        return sample


@dataclass(frozen=True)
class SampleFormat:
    """How a sample becomes tensors: tokenizer and chat template, image preprocessing, the placeholder run of
    `image_token_len` x `image_token_id` per picture, truncation, row forming and the pixel limit."""

    tokenizer: Any
    image_config: ImagePreprocessConfig
    image_token_id: int
    image_token_len: int
    max_seq_len: int
    batching: str = "dynamic"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def stages(self, reader: ShardReader | None) -> list[tuple[str, Any]]:
        """The named per-sample stages; `read` only when samples are addressed by id (manifest sources).

        Raises ValueError when the image preprocessing has no fixed output size (rows could not be batched).
        """
        if self.image_config.output_shape is None:
            raise ValueError("image preprocessing must give one output size (a centre crop, or SigLIP's fixed size) so that images can "
                             "be batched")
        stages: list[tuple[str, Any]] = [("read", ReadSample(reader))] if reader is not None else []
        encoder = ChatEncoder(self.tokenizer, self.image_token_id, self.image_token_len, self.max_seq_len)
        return stages + [
            ("decode", decode_sample),
            ("text", EncodeText(encoder)),
            ("images", PreprocessImages(ImagePreprocessor(self.image_config, max_pixels=self.max_pixels))),
        ]

    def collator(self) -> Collator:
        """The collator of `batching`; ValueError for an unknown mode or a tokenizer without pad and eos."""
        if self.batching not in BATCHING:
            raise ValueError(f"data.batching must be one of {BATCHING}, got {self.batching!r}")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; give it a pad_token")
        # "max_len" pads every row to max_seq_len: the naive layout, kept for comparison.
        multiple_of = self.max_seq_len if self.batching == "max_len" else 8
        return Collator(pad_id=int(pad_id), max_len=self.max_seq_len, multiple_of=multiple_of,
                        pack=self.batching == "pack")

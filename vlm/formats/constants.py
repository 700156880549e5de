"""Values that the sharder, the data pipeline, the model, eval and chat must agree on: defined once, here."""

from __future__ import annotations

IGNORE_INDEX = -100
"""Label of a position without a target (prompt, template, image and padding tokens); PyTorch's cross-entropy
default `ignore_index`."""

IMAGE_TAG = "<image>"
"""Where a picture goes in a record's text (MiniMind-V's JSONL convention); one tag per listed image."""

DEFAULT_MAX_PIXELS = 8192 * 8192
"""Pictures with more pixels (width x height, read from the header before decoding) are refused as possible
decompression bombs: by the sharder (`--max-pixels`), training (`data.max_pixels`), eval and chat
(`--max_pixels`). 67,108,864 pixels: an 8192 x 8192 picture still passes."""

PROJECTORS = ("linear", "mlp", "mlp2x_gelu")
"""Projector kinds (`vlm.model.projector`): MiniMind-V 623a130's Linear, MiniMind-V 3v's MLP, LLaVA-1.5's."""
BATCHING = ("dynamic", "pack", "max_len")
"""How the collator forms rows (`data.batching`): pad to the longest row (multiple of 8), pack samples into
rows of max_seq_len, or pad every row to max_seq_len."""

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""The only PIL decoders any part may run on a picture (the JPEG one also returns MPO, cameras' multi-picture
JPEG); no exotic or external-program decoder is ever reached."""

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
"""File extensions of image members in a shard (`KEY.0.jpg`, ...); every other member is ignored undecoded."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's pixel normalisation (per RGB channel, of values in [0, 1]), as in openai/clip-vit-base-patch16's
preprocessor config: the default when a vision folder's preprocessor config gives none."""

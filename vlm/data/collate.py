"""Batching stage: pad a list of samples to the batch's longest, or pack several samples into each row.

    from vlm.data.collate import Collator
    loader = DataLoader(dataset, batch_size=16, collate_fn=Collator(pad_id=0, max_len=640, pack=True))

Sample contract (what the text and image stages produce, one dict per record):
    input_ids     (L,) long, L <= max_len; each image is a run of image_token_len placeholder ids
    labels        (L,) long, IGNORE_INDEX (-100) where no loss is taken
    pixel_values  (n, 3, H, W) uint8, resized to the tower's size but not normalised
                  (`ImagePreprocessor.pixels`), one per placeholder run in order; (0, 3, H, W) for text-only
    __key__       str, optional: the sample's shard key, passed through for the audit log

Batch contract (read by the trainer and the model's composite):
    input_ids       (B, T) long, `pad_id` on padding. T is a multiple of `multiple_of`, capped at `max_len`.
    labels          (B, T) long, aligned with input_ids (the model shifts by one inside: the logits at t
                    score labels[t + 1]); -100 on padding and on the first token of every segment, so the
                    last token of one packed sample never learns to predict the next sample.
    attention_mask  (B, T) long SEGMENT IDS: 0 = padding, 1..k = which sample of the row the token belongs
                    to. A token attends causally only to earlier tokens of the same segment. A padded
                    (unpacked) batch is the special case of one segment per row, i.e. an ordinary 1/0 mask.
    position_ids    (B, T) long, restarting at 0 at every segment start; 0 on padding.
    pixel_values    (B, N, 3, H, W) uint8, N = most images in any row. Row b's images are in the order of
                    its placeholder runs (segment by segment); slots beyond them are zeros. Not normalised:
                    the model takes `vlm.data.image.PixelNormalizer(config)(pixel_values)` (float32; the
                    trainer applies it on its device, so workers ship a quarter of float32's bytes).
    image_mask      (B, N) bool, True for real images (for inspection and tests).
    image_index     (M,) long, the real images' slots in pixel_values.flatten(0, 1), row-major (the order of
                    the placeholder runs). The model takes it as the trusted layout: it gathers exactly these
                    images, with no check of the runs (the text stage guarantees one run per image), so a
                    training step needs no host-device sync for it. M = num_images.
    num_images      int, real images (M).
    loss_index      (K,) long, the positions p = b * T + t of input_ids.flatten() whose next label
                    labels[b, t + 1] is not -100: the only positions whose logits the loss needs. The trainer
                    passes it with `loss_targets` (K,) long (those labels), so the output head runs on K rows
                    instead of B x T (images and prompts are never targets) and no (B, T, vocab) tensor exists.
    packed          bool (a Python bool, no tensor): some row holds more than one sample. When False every
                    row is one sample padded on the right, so causal attention without any mask is exact for
                    the real tokens (they never see a later pad; pads carry no label): the trainer then passes
                    no attention_mask and the model takes SDPA's mask-free causal kernels.
    num_tokens      int, real (non-padding) tokens, for throughput.
    num_label_tokens int, labels that are not -100.
(The counts are Python ints, so reading them never touches a tensor.)
    keys            list[str], only when every sample has `__key__`: keys in row order, segment order.

Packing (`pack=True`) puts the same samples a padded batch would hold into as few rows as first-fit
decreasing allows, so steps per epoch and exactly-once accounting do not change; B varies per batch.
With segment-isolated attention and restarted positions, the packed loss equals the unpacked loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlm.formats.constants import IGNORE_INDEX


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def padded_width(longest: int, multiple_of: int, max_len: int | None) -> int:
    """Row width for a batch whose longest row has `longest` tokens."""
    width = round_up(longest, multiple_of)
    if max_len is not None:
        if longest > max_len:
            raise ValueError(f"a row of {longest} tokens exceeds max_len={max_len}; truncate samples first")
        width = min(width, max_len)
    return width


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit decreasing: sample indices per row, every row's total length <= capacity.

    Deterministic: ties keep input order, and indices inside a row are ascending.
    """
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"sample {i} has {lengths[i]} tokens > row capacity {capacity}")
        for r, used in enumerate(fill):
            if used + lengths[i] <= capacity:
                rows[r].append(i)
                fill[r] += lengths[i]
                break
        else:
            rows.append([i])
            fill.append(lengths[i])
    return [sorted(row) for row in rows]


def pad_collate(
    samples: Sequence[dict], pad_id: int, multiple_of: int = 8, max_len: int | None = None
) -> dict:
    """One sample per row, padded to the longest (rounded up to `multiple_of`, never beyond `max_len`)."""
    return _build(samples, [[i] for i in range(len(samples))], pad_id, multiple_of, max_len)


def pack_collate(samples: Sequence[dict], pad_id: int, max_len: int, multiple_of: int = 8) -> dict:
    """Several samples per row (first-fit decreasing into rows of `max_len`), segment ids in attention_mask."""
    rows = first_fit([len(s["input_ids"]) for s in samples], max_len)
    return _build(samples, rows, pad_id, multiple_of, max_len)


@dataclass(frozen=True)
class Collator:
    """Picklable `collate_fn` for DataLoader workers: padding or packing with fixed settings."""

    pad_id: int
    max_len: int
    multiple_of: int = 8
    pack: bool = False

    def __call__(self, samples: Sequence[dict]) -> dict:
        if self.pack:
            return pack_collate(samples, self.pad_id, self.max_len, self.multiple_of)
        return pad_collate(samples, self.pad_id, self.multiple_of, self.max_len)


def _build(
    samples: Sequence[dict], rows: list[list[int]], pad_id: int, multiple_of: int, max_len: int | None
) -> dict:
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    image_shape = _image_shape(samples)
    lengths = [sum(len(samples[i]["input_ids"]) for i in row) for row in rows]
    width = padded_width(max(lengths), multiple_of, max_len)
    n_images = [sum(samples[i]["pixel_values"].shape[0] for i in row) for row in rows]
    batch, n_max = len(rows), max(n_images)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    segments = torch.zeros((batch, width), dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    pixel_values = torch.zeros((batch, n_max, *image_shape), dtype=torch.uint8)
    image_mask = torch.zeros((batch, n_max), dtype=torch.bool)
    for b, row in enumerate(rows):
        start, image = 0, 0
        for segment, i in enumerate(row, start=1):
            ids, lab, pix = samples[i]["input_ids"], samples[i]["labels"], samples[i]["pixel_values"]
            end = start + len(ids)
            input_ids[b, start:end] = ids
            labels[b, start:end] = lab
            labels[b, start] = IGNORE_INDEX  # the previous segment's last logit must not target this token
            segments[b, start:end] = segment
            positions[b, start:end] = torch.arange(len(ids))
            pixel_values[b, image : image + len(pix)] = pix
            image_mask[b, image : image + len(pix)] = True
            start, image = end, image + len(pix)
    out = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": segments,
        "position_ids": positions,
        "pixel_values": pixel_values,
        "image_mask": image_mask,
        "image_index": image_mask.flatten().nonzero().squeeze(1),
        **_loss_positions(labels),
        "num_images": sum(n_images),
        "packed": any(len(row) > 1 for row in rows),
        "num_tokens": sum(lengths),
        "num_label_tokens": int((labels != IGNORE_INDEX).sum()),
    }
    if all("__key__" in s for s in samples):
        out["keys"] = [samples[i]["__key__"] for row in rows for i in row]
    return out


def _loss_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"loss_index": (K,), "loss_targets": (K,)} of labels (B, T): see the batch contract."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]  # the logit at t scores the label at t + 1
    flat = targets.flatten()
    index = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return {"loss_index": index, "loss_targets": flat[index]}


def _image_shape(samples: Sequence[dict]) -> tuple[int, ...]:
    """Check every sample against the sample contract -> the common image shape (3, H, W)."""
    shapes = set()
    for s in samples:
        if "pixel_values" not in s:
            raise KeyError(
                "every sample needs 'pixel_values' (n, 3, H, W); text-only samples carry (0, 3, H, W)"
            )
        if s["pixel_values"].dtype != torch.uint8:
            raise TypeError(
                f"pixel_values must be uint8 (ImagePreprocessor.pixels), got {s['pixel_values'].dtype}: "
                "batches carry raw pixels and the trainer normalises them once, with PixelNormalizer"
            )
        if len(s["input_ids"]) != len(s["labels"]) or len(s["input_ids"]) == 0:
            raise ValueError(
                f"input_ids ({len(s['input_ids'])}) and labels ({len(s['labels'])}) must be non-empty and "
                "of equal length"
            )
        shapes.add(tuple(s["pixel_values"].shape[1:]))
    if len(shapes) != 1:
        raise ValueError(f"samples' images differ in shape {sorted(shapes)}; preprocess to one size (a centre crop, or SigLIP's fixed size)")
    return shapes.pop()


def token_efficiency(
    lengths: Sequence[int], max_len: int, batch_size: int, multiple_of: int = 8
) -> dict[str, float]:
    """Share of non-padding tokens in the batches made from `lengths` (in order, `batch_size` per batch).

    naive: every row padded to max_len; dynamic: pad_collate; packed: pack_collate.
    """
    if not lengths:
        raise ValueError("token_efficiency needs at least one length")
    lengths = [min(n, max_len) for n in lengths]
    real = sum(lengths)
    dynamic = packed = 0
    for k in range(0, len(lengths), batch_size):
        chunk = lengths[k : k + batch_size]
        dynamic += len(chunk) * padded_width(max(chunk), multiple_of, max_len)
        rows = first_fit(chunk, max_len)
        fills = [sum(chunk[i] for i in row) for row in rows]
        packed += len(rows) * padded_width(max(fills), multiple_of, max_len)
    return {"naive": real / (len(lengths) * max_len), "dynamic": real / dynamic, "packed": real / packed}

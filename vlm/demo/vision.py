"""Demo stage `vision`: teach the tiny vision encoder to see before the VLM stages (the demo's stand-in for CLIP).

Real runs start from a pretrained CLIP ViT. The offline demo cannot download one, and a vision encoder that
learns only through the language model's caption loss learns shape kinds slowly: measured on 2 cores with
every parameter trainable, colour 0.98 but kind 0.46 on held-out one-shape pictures after 500 pretrain steps
on 16000 fresh captions. So this stage first trains the encoder on what the pretrain split's captions say
about every cell of the pictures' 3 x 3 grid (`data_tools.shapes.POSITIONS`): which kind of shape has its
centre there, or none, and that shape's colour and size. The labels are read back from the captions with
`data_tools.synth_text.parse_description` (no held-out picture is used for training); pictures with one, two
and three shapes all count. The heads read each cell from exactly the image token the language model gets
for it (the cell's patches concatenated, `model.pixel_shuffle: 3`), through one linear layer: the patch
features must therefore say, linearly, what lies where. Teaching only one-shape pictures through
mean-pooled features (the previous recipe) left pictures with several shapes right 0.16-0.21 of the time.
The head is thrown away; the encoder is saved as a CLIP folder that both VLM stages start from.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_tools.shapes import COLOURS, KINDS, POSITIONS, SIZES
from data_tools.synth_text import parse_description
from vlm.data.image import ImagePreprocessConfig, ImagePreprocessor
from vlm.eval import records_from_shards
from vlm.formats.constants import IGNORE_INDEX
from vlm.model.projector import pixel_shuffle
from vlm.model.vision_encoder import (
    encode_images,
    load_vision_encoder,
    save_vision_encoder,
    write_tiny_vision_encoder,
)

CELLS = len(POSITIONS)
EMPTY = 0
"""Kind label of a cell without a shape; kinds are 1 + their index in `KINDS`."""
ATTRIBUTES = {"kind": ("none", *KINDS), "colour": tuple(COLOURS), "size": SIZES}
"""Per-cell classification heads, in this order, and their classes."""
TOWER = {"image_size": 72, "patch_size": 8}
"""The demo's tower geometry (the rest is `vlm.model.vision_encoder.TINY_VISION`): 9 x 9 patches, so each cell
of the 3 x 3 grid is exactly 3 x 3 patches and `model.pixel_shuffle: 3` makes one image token per cell. At
64 px / 8 px patches (the built-in tiny tower) small shapes in pictures with three of them were named right
0.77 of the time after 1000 steps, at 72 px 0.97."""


def cell_labels(caption: str) -> list[list[int]] | None:
    """(9, 3) [kind, colour, size] per grid cell of an English caption: kind EMPTY (and colour, size
    IGNORE_INDEX) where no shape is named; colour IGNORE_INDEX in grayscale. None when no shape parses."""
    shapes = parse_description(caption, "en")
    if not shapes:
        return None
    labels = [[EMPTY, IGNORE_INDEX, IGNORE_INDEX] for _ in range(CELLS)]
    for shape in shapes:
        colour = IGNORE_INDEX if shape["colour"] is None else list(COLOURS).index(shape["colour"])
        labels[POSITIONS.index(shape["position"])] = [1 + KINDS.index(shape["kind"]), colour,
                                                      SIZES.index(shape["size"])]
    return labels


def labelled_pictures(shards: str | Path, preprocess: ImagePreprocessor
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """uint8 pixels (N, 3, H, W) and cell labels (N, 9, 3) of the one-picture caption records of a shard
    folder, and the samples the reader skipped as unreadable, by reason.

    Raises ValueError when the folder holds no caption that parses into shapes."""
    pixels, labels = [], []
    records, skipped = records_from_shards(shards)
    for record in records:
        replies = [m["content"] for m in record.conversations if m["role"] == "assistant"]
        found = cell_labels(replies[0]) if len(record.images) == 1 and replies else None
        if found is not None:
            pixels.append(preprocess.pixels(record.images[0]))
            labels.append(found)
    if not pixels:
        raise ValueError(f"{shards} holds no caption records naming shapes to teach the vision encoder with")
    return torch.stack(pixels), torch.tensor(labels), dict(skipped)


class CellHeads(torch.nn.Module):
    """Patch features (N, P, D) on a square grid whose side is a multiple of 3 -> logits per cell (N, 9, sum of
    class counts + 9): the `ATTRIBUTES` heads, then the cell head (which cell this is).

    Each cell is read from exactly the image token the language model gets for it: the cell's patches
    concatenated by `vlm.model.projector.pixel_shuffle` (grid / 3 x grid / 3 patches each), through a LayerNorm
    and one linear layer. The encoder is therefore taught to make each attribute a linear function of that
    token. (Mean-pooling each cell's patches instead left the language model to find the kinds itself: one run
    in three of the same recipe never did, 0.43 of one-shape pictures right.)"""

    def __init__(self, width: int, patches: int):
        super().__init__()
        grid = math.isqrt(patches)
        if grid * grid != patches or grid % 3:
            raise ValueError(f"{patches} patches are not a square grid whose side is a multiple of 3 (the 3 x 3 "
                             "cells must each be whole patches)")
        self.factor = grid // 3
        self.norm = torch.nn.LayerNorm(width * self.factor ** 2)
        self.sizes = [len(classes) for classes in ATTRIBUTES.values()] + [CELLS]
        self.linear = torch.nn.Linear(width * self.factor ** 2, sum(self.sizes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, P, D) -> (N, 9, classes): each cell's image token (`pixel_shuffle`), classified."""
        return self.linear(self.norm(pixel_shuffle(features, self.factor)))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy over every cell of the three attribute heads (labels (N, 9, 3), IGNORE_INDEX
        skipped) and of the cell head, which names the cell itself: it keeps where a patch lies in the
        features, so that the language model can name a shape's position from its image token."""
        *parts, cell = logits.split(self.sizes, dim=-1)
        where = torch.arange(CELLS, device=labels.device).expand(labels.shape[:2])
        return sum(F.cross_entropy(part.flatten(0, 1), labels[..., i].flatten(), ignore_index=IGNORE_INDEX)
                   for i, part in enumerate(parts)) + F.cross_entropy(cell.flatten(0, 1), where.flatten())

    def accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
        """Shares right: `position` (shape or none, every cell), `kind`, `colour`, `size` (cells with a shape
        and a known value), `pictures` (every cell's kind, colour and size right)."""
        predicted = torch.stack([part.argmax(-1) for part in logits.split(self.sizes, dim=-1)[:-1]], dim=-1)
        known = labels != IGNORE_INDEX
        right = (predicted == labels) | ~known
        occupied = labels[..., 0] != EMPTY

        def share(hits: torch.Tensor, where: torch.Tensor) -> float | None:
            return float(hits[where].float().mean()) if where.any() else None

        return {"position": share((predicted[..., 0] != EMPTY) == occupied, torch.ones_like(occupied)),
                "kind": share(right[..., 0], occupied), "colour": share(right[..., 1], occupied & known[..., 1]),
                "size": share(right[..., 2], occupied), "pictures": float(right.all(-1).all(-1).float().mean())}


def train_vision_encoder(train_shards: str | Path, eval_shards: str | Path, folder: str | Path, steps: int = 1000,
                         batch_size: int = 32, learning_rate: float = 1e-3, warmup_steps: int = 50, seed: int = 0,
                         progress: bool = True, tower: dict | None = TOWER) -> dict:
    """Train a fresh tiny encoder on the cell labels of `train_shards` and save it as a CLIP folder in `folder`.

    Returns the number of pictures (and of unreadable samples skipped, by reason), the mean loss of the first
    and last tenth of the steps, and the accuracies of `CellHeads.accuracy` on the pictures of `eval_shards`
    (held out: never trained on). `tower` overrides the tiny tower's geometry. Raises ValueError for steps or
    batch_size below 1 and for a corpus without shape captions.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    folder = Path(folder)
    write_tiny_vision_encoder(folder, seed=seed, **(tower or {}))  # random init + preprocessor config, as the trainer would
    encoder = load_vision_encoder(folder).requires_grad_(True).train()
    preprocess = ImagePreprocessor(ImagePreprocessConfig.from_folder(folder))
    pixels, labels, skipped = labelled_pictures(train_shards, preprocess)
    patches = (encoder.config.image_size // encoder.config.patch_size) ** 2
    heads = CellHeads(encoder.config.hidden_size, patches)
    params = list(encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup_steps, steps))
    order = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc="  vision", unit="step", disable=not progress)
    for step in bar:
        batch = torch.randint(0, len(pixels), (batch_size,), generator=order)
        features = encode_images(encoder, preprocess.normalizer(pixels[batch]))  # (B, P, D)
        loss = heads.loss(heads(features), labels[batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 25 == 0:
            bar.set_postfix_str(f"loss {losses[-1]:.4f}")
    save_vision_encoder(encoder.eval(), folder)
    window = max(1, steps // 10)
    return {"pictures": len(pixels), "skipped": skipped, "steps": steps,
            "loss_first": round(sum(losses[:window]) / window, 4),
            "loss_last": round(sum(losses[-window:]) / window, 4),
            "held_out": _held_out_accuracy(encoder, heads, preprocess, eval_shards)}


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine down to a tenth (the trainer's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def _held_out_accuracy(encoder, heads: CellHeads, preprocess: ImagePreprocessor, shards) -> dict:
    pixels, labels, skipped = labelled_pictures(shards, preprocess)
    logits = torch.cat([heads(encode_images(encoder, preprocess.normalizer(chunk))) for chunk in pixels.split(256)])
    return {"pictures": len(pixels), "skipped": skipped, **{k: None if v is None else round(v, 4)
                                        for k, v in heads.accuracy(logits, labels).items()}}

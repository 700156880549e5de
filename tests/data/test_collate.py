"""Batching: dynamic padding, packing with segment ids, and the batch contract the model relies on."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vlm.data.collate import IGNORE_INDEX, Collator, first_fit, pack_collate, pad_collate, token_efficiency

IMAGE_ID, IMAGE_LEN, SHAPE = 3, 4, (3, 2, 2)


def make_sample(index: int, length: int, n_images: int = 0, labelled_from: int = 1) -> dict:
    """Random text ids (>= 10) with `n_images` placeholder runs spread out; image j of sample i holds i*10+j
    (uint8, as `ImagePreprocessor.pixels` makes them)."""
    g = torch.Generator().manual_seed(index)
    ids = torch.randint(10, 60, (length,), generator=g)
    for j in range(n_images):
        start = 1 + j * (IMAGE_LEN + 1)
        ids[start : start + IMAGE_LEN] = IMAGE_ID
    labels = ids.clone()
    labels[:labelled_from] = IGNORE_INDEX
    labels[ids == IMAGE_ID] = IGNORE_INDEX
    pixels = (
        torch.stack([torch.full(SHAPE, index * 10 + j, dtype=torch.uint8) for j in range(n_images)])
        if n_images
        else torch.zeros((0, *SHAPE), dtype=torch.uint8)
    )
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "__key__": f"s{index}"}


def test_pad_collate_pads_to_the_longest_rounded_up():
    samples = [make_sample(0, 5, 1), make_sample(1, 13, 2), make_sample(2, 9)]
    batch = pad_collate(samples, pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 16)
    for b, sample in enumerate(samples):
        n = len(sample["input_ids"])
        assert torch.equal(batch["input_ids"][b, :n], sample["input_ids"])
        assert (batch["input_ids"][b, n:] == 0).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch["labels"][b, 1:n], sample["labels"][1:])
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (16 - n)
        assert batch["position_ids"][b, :n].tolist() == list(range(n))
    assert batch["pixel_values"].shape == (3, 2, *SHAPE) and batch["pixel_values"].dtype == torch.uint8
    assert batch["image_mask"].tolist() == [[True, False], [True, True], [False, False]]
    assert (batch["pixel_values"][0, 1] == 0).all() and (batch["pixel_values"][1, 1] == 11).all()
    assert batch["num_tokens"] == 27 and isinstance(batch["num_tokens"], int)
    assert batch["num_label_tokens"] == sum(
        (s["labels"] != IGNORE_INDEX).sum().item() for s in samples
    )
    assert batch["keys"] == ["s0", "s1", "s2"]


@pytest.mark.parametrize("multiple_of", [1, 8, 64])
def test_width_is_a_multiple_and_never_beyond_the_cap(multiple_of):
    samples = [make_sample(0, 13), make_sample(1, 7)]
    assert pad_collate(samples, 0, multiple_of)["input_ids"].shape[1] == -(-13 // multiple_of) * multiple_of
    assert pad_collate(samples, 0, multiple_of, max_len=14)["input_ids"].shape[1] == min(
        14, -(-13 // multiple_of) * multiple_of
    )
    with pytest.raises(ValueError, match="max_len=12"):
        pad_collate(samples, 0, multiple_of, max_len=12)


def test_text_only_batches_keep_the_image_shape():
    batch = pad_collate([make_sample(0, 6), make_sample(1, 4)], pad_id=0)
    assert batch["pixel_values"].shape == (2, 0, *SHAPE) and batch["image_mask"].shape == (2, 0)


def test_mixed_image_shapes_are_refused():
    odd = make_sample(1, 8, 1)
    odd["pixel_values"] = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="shape"):
        pad_collate([make_sample(0, 8, 1), odd], pad_id=0)


def test_already_normalised_float_pixels_are_refused():
    normalised = make_sample(1, 8, 1)
    normalised["pixel_values"] = normalised["pixel_values"].float()
    with pytest.raises(TypeError, match="uint8"):
        pad_collate([make_sample(0, 8, 1), normalised], pad_id=0)


def test_first_fit_is_deterministic_and_within_capacity():
    lengths = [9, 3, 8, 8, 2, 16, 5]
    rows = first_fit(lengths, 16)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 16 for row in rows)
    assert rows == first_fit(lengths, 16) and len(rows) == 4  # 51 tokens: 4 rows of 16 is the minimum
    with pytest.raises(ValueError, match="capacity"):
        first_fit([17], 16)


def test_packing_segments_positions_labels_and_image_order():
    samples = [make_sample(i, n, k) for i, (n, k) in enumerate([(11, 2), (6, 1), (5, 0), (9, 1), (3, 0)])]
    batch = pack_collate(samples, pad_id=0, max_len=16)
    by_key = {s["__key__"]: s for s in samples}
    assert sorted(batch["keys"]) == sorted(by_key)  # every sample exactly once
    keys = iter(batch["keys"])
    for b in range(batch["input_ids"].shape[0]):
        segments, positions = batch["attention_mask"][b], batch["position_ids"][b]
        row_images = []
        for segment in range(1, int(segments.max()) + 1):
            where = (segments == segment).nonzero().flatten()
            start, end = where[0].item(), where[-1].item() + 1
            assert where.tolist() == list(range(start, end))  # contiguous, in order
            sample = by_key[next(keys)]
            assert torch.equal(batch["input_ids"][b, start:end], sample["input_ids"])
            assert positions[start:end].tolist() == list(range(end - start))
            assert batch["labels"][b, start] == IGNORE_INDEX  # nothing learns across the boundary
            assert torch.equal(batch["labels"][b, start + 1 : end], sample["labels"][1:])
            row_images += list(sample["pixel_values"])
        real = int(batch["image_mask"][b].sum())
        assert batch["image_mask"][b].tolist() == [True] * real + [False] * (
            batch["image_mask"].shape[1] - real
        )
        assert (
            torch.equal(batch["pixel_values"][b, :real], torch.stack(row_images)) if real else not row_images
        )
        # i-th image of the row belongs to the i-th placeholder run of the row
        runs = (batch["input_ids"][b] == IMAGE_ID).sum().item() // IMAGE_LEN
        assert runs == real
        assert (segments > 0).sum() <= 16 and (segments[segments.nonzero().max() + 1 :] == 0).all()


class SegmentToyModel(torch.nn.Module):
    """One attention layer honouring the batch contract: segment-causal attention, given position ids."""

    def __init__(self, vocab: int = 64, dim: int = 16, max_pos: int = 32):
        super().__init__()
        self.embed, self.pos = torch.nn.Embedding(vocab, dim), torch.nn.Embedding(max_pos, dim)
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, vocab)

    def loss(self, batch: dict) -> torch.Tensor:
        x = self.embed(batch["input_ids"]) + self.pos(batch["position_ids"])  # (B, T, D)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        seg = batch["attention_mask"]  # (B, T)
        t = torch.arange(seg.shape[1])
        allowed = (seg[:, :, None] == seg[:, None, :]) & (t[None, :, None] >= t[None, None, :])  # (B, T, T)
        scores = (q @ k.transpose(1, 2)).masked_fill(~allowed, float("-inf"))
        logits = self.out(torch.softmax(scores, -1) @ v)  # (B, T, V)
        return (
            F.cross_entropy(
                logits[:, :-1].flatten(0, 1),
                batch["labels"][:, 1:].flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            / (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        )


def test_packed_loss_equals_unpacked_loss():
    # Every token labelled, the first included: only the collate's boundary masking keeps segments apart.
    samples = [make_sample(i, n, labelled_from=0) for i, n in enumerate([12, 7, 5, 9, 3, 14])]
    model = SegmentToyModel()
    packed = pack_collate(samples, pad_id=0, max_len=24)
    assert packed["input_ids"].shape[0] < len(samples)
    torch.testing.assert_close(model.loss(packed), model.loss(pad_collate(samples, pad_id=0)))


def test_token_efficiency_counts_padding():
    shares = token_efficiency([3, 5, 4, 4], max_len=16, batch_size=4)
    assert shares == {"naive": 16 / 64, "dynamic": 16 / 32, "packed": 1.0}
    shares = token_efficiency([16, 10, 12, 2], max_len=16, batch_size=2)
    assert shares["dynamic"] == 40 / 64 and shares["packed"] == 40 / 48


def test_collator_pickles_and_dispatches():
    samples = [make_sample(i, n, 1) for i, n in enumerate([10, 6, 7])]
    for pack in (False, True):
        collate = pickle.loads(pickle.dumps(Collator(pad_id=0, max_len=24, pack=pack)))
        expected = (pack_collate if pack else pad_collate)(samples, 0, max_len=24)
        got = collate(samples)
        assert all(torch.equal(got[k], expected[k]) if torch.is_tensor(got[k]) else got[k] == expected[k]
                   for k in expected if k != "keys")


def test_data_package_imports_no_model_code():
    probe = (
        "import pkgutil, importlib, sys, vlm.data\n"
        "for m in pkgutil.iter_modules(vlm.data.__path__): importlib.import_module('vlm.data.' + m.name)\n"
        "print(sorted(n for n in sys.modules if n.startswith('vlm.model')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

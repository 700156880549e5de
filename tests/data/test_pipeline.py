"""The loaders end to end: real shards through a real DataLoader, resume, resampled streams, mixing, eval."""

import json
import pickle
from collections import Counter

import pytest
import torch

from tests.data.shard_fixtures import (
    IMAGE_TOKEN_ID,
    IMAGE_TOKEN_LEN,
    MAX_SEQ_LEN,
    SMALL_IMAGES,
    all_keys,
    make_loader,
    members,
    write_shards,
)
from vlm.data import plan
from vlm.data.image import ImagePreprocessor, PixelNormalizer
from vlm.data.order import EpochOrder
from vlm.data.pipeline import BadSampleLog
from vlm.data.reader import ShardReader, decode_members
from vlm.data.sources import SourceError
from vlm.formats.errors import BadSample
from vlm.tokenizer import load_tokenizer

UNEVEN = [9, 2, 14]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("uneven"), UNEVEN)


def make(sources, tokenizer, **kw):
    return make_loader(sources, tokenizer, **{"batch_size": 2, "num_workers": 0, "seed": 5, "chunk_size": 4, **kw})


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


def test_two_workers_through_a_real_dataloader(uneven, tokenizer):
    loader = make([uneven], tokenizer, num_workers=2, batch_size=3)
    assert loader.micro_batches_per_epoch == len(loader) == 8 and loader.dropped_per_epoch == 1
    batches = list(loader)
    assert [b["micro_step"] for b in batches] == list(range(8))
    for b in batches:
        rows, width = b["input_ids"].shape
        assert b["num_samples"] == rows == len(b["keys"]) == 3 and width % 8 == 0 and width <= MAX_SEQ_LEN
        assert b["labels"].shape == b["attention_mask"].shape == (rows, width)
        assert b["pixel_values"].shape[2:] == (3, 16, 16) and b["image_mask"].shape == b["pixel_values"].shape[:2]
        assert b["epoch"] == 0 and b["stats"] == {"seen": 3, "bad": 0, "bad_by_reason": {}}
        # every image-token run in the ids has a real image behind it
        assert int((b["input_ids"] == IMAGE_TOKEN_ID).sum()) == IMAGE_TOKEN_LEN * int(b["image_mask"].sum())
    keys = keys_of(batches)
    assert len(set(keys)) == 24 and set(keys) <= all_keys("c", 25)
    # The keys are exactly what the pure plan says, in the same order.
    order = EpochOrder([UNEVEN], [1.0], 4, 5, 0)
    reader = ShardReader(loader.sources.shards)
    expected = [reader.key(int(i)) for step in range(8)
                for i in order.ids(range(*plan.batch_range(25, loader.geometry, 0, step)))]
    assert keys == expected


def test_the_worker_count_changes_nothing_in_the_batches(uneven, tokenizer):
    a = list(make([uneven], tokenizer, num_workers=0, batch_size=3))
    b = list(make([uneven], tokenizer, num_workers=2, batch_size=3))
    assert [x["micro_step"] for x in a] == [y["micro_step"] for y in b] == list(range(8))
    assert keys_of(a) == keys_of(b) and len(set(keys_of(a))) == 24
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["pixel_values"], y["pixel_values"])
               for x, y in zip(a, b))  # the same batches, tensors included


def test_workers_ship_uint8_pixels_that_normalise_to_the_float_path(tmp_path, tokenizer):
    folder = write_shards(tmp_path / "s", [12], images_of=lambda i: i % 3)  # 0, 1 and 2 images per sample
    loader = make([folder], tokenizer, num_workers=2, batch_size=4)
    reader = ShardReader(loader.sources.shards)
    by_key = {reader.key(i): i for i in range(len(reader))}
    preprocess, normalize = ImagePreprocessor(SMALL_IMAGES), PixelNormalizer(SMALL_IMAGES)
    for batch in loader:
        assert batch["pixel_values"].dtype == torch.uint8
        expected = [preprocess(data) for key in batch["keys"]
                    for data in decode_members(*reader.read(by_key[key]))["images"]]
        got = normalize(batch["pixel_values"])[batch["image_mask"]]  # (n_real, 3, H, W), row-major
        assert len(expected) == len(got) > 0 and torch.equal(got, torch.stack(expected))


def test_one_rank_accumulating_two_trains_on_the_global_batches_of_two_ranks(uneven, tokenizer):
    one = list(make([uneven], tokenizer, accumulation=2, num_workers=2, batch_size=3))
    two = [list(make([uneven], tokenizer, world_size=2, rank=r, num_workers=2, batch_size=3)) for r in range(2)]
    assert len(one) == 8 and len(two[0]) == len(two[1]) == 4  # 25 // 6 = 4 global batches, 1 sample dropped
    for step in range(4):
        assert keys_of(one[2 * step : 2 * step + 2]) == keys_of([two[0][step], two[1][step]])


def test_two_ranks_two_workers_exactly_once_and_epochs_differ(uneven, tokenizer):
    ranks = [make([uneven], tokenizer, world_size=2, rank=r, num_workers=2, batch_size=2) for r in range(2)]
    epoch_keys = []
    for epoch in range(2):
        per_rank = []
        for loader in ranks:
            loader.set_epoch(epoch)
            per_rank.append(keys_of(list(loader)))
        assert len(per_rank[0]) == len(per_rank[1]) == 12  # 25 // 4 = 6 micro-batches of 2 on each rank
        assert len(set(per_rank[0] + per_rank[1])) == 24
        epoch_keys.append(per_rank[0] + per_rank[1])
    assert epoch_keys[0] != epoch_keys[1]


def test_resume_same_geometry_continues_identically_and_resize_repeats_nothing(uneven, tokenizer):
    full = list(make([uneven], tokenizer, num_workers=2))
    first = make([uneven], tokenizer, num_workers=2)
    taken = []
    for batch in first:
        taken.append(batch)
        if len(taken) == 5:
            break  # the DataLoader had prefetched more; they must not count
    state = json.loads(json.dumps(first.state_dict(taken[-1]["micro_step"] + 1)))
    same = make([uneven], tokenizer, num_workers=2)
    same.load_state_dict(state)
    rest = list(same)
    assert same.start_step == 5 and [b["micro_step"] for b in rest] == list(range(5, 12))
    assert keys_of(taken + rest) == keys_of(full)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(rest, full[5:]))
    in_process = make([uneven], tokenizer, num_workers=0)  # only the worker count differs: the same stream
    in_process.load_state_dict(state)
    assert in_process.segment_start == 0 and keys_of(list(in_process)) == keys_of(rest)

    resized = make([uneven], tokenizer, num_workers=0, batch_size=3)  # other worker count and batch size
    resized.load_state_dict(state)
    assert resized.segment_start == resized.start_step == 5 and same.segment_start == 0
    more = list(resized)
    counts = Counter(keys_of(taken + more))
    assert max(counts.values()) == 1 and 25 - len(counts) == resized.dropped_this_epoch < 3


def test_resampled_mode_over_a_brace_pattern_without_manifest(uneven, tokenizer):
    pattern = str(uneven / "c-{000000..000002}.tar")
    with pytest.raises(SourceError, match="data.samples_per_epoch"):
        make([pattern], tokenizer)
    loader = make([pattern], tokenizer, samples_per_epoch=20, batch_size=4, num_workers=2)
    assert loader.mode == "resampled" and loader.micro_batches_per_epoch == 5
    first = list(loader)
    assert [b["num_samples"] for b in first] == [4] * 5
    assert set(keys_of(first)) <= all_keys("c", 25)
    loader.set_epoch(1)
    assert keys_of(list(loader)) != keys_of(first)
    state = loader.state_dict(2)
    resumed = make([pattern], tokenizer, samples_per_epoch=20, batch_size=4, num_workers=2)
    resumed.load_state_dict(state)
    assert [b["micro_step"] for b in resumed] == [2, 3, 4]
    piped = make([f"pipe:cat {pattern}"], tokenizer, samples_per_epoch=6, batch_size=3)
    assert [b["num_samples"] for b in piped] == [3, 3]
    with pytest.raises(SourceError, match="samples_per_epoch is only for"):
        make([uneven], tokenizer, samples_per_epoch=20)


def test_mixing_weights_per_epoch(tmp_path, tokenizer):
    a = write_shards(tmp_path / "a", [6, 4], prefix="a")
    b = write_shards(tmp_path / "b", [8], prefix="b")
    loader = make([a, b], tokenizer, weights=[2, 0.5], batch_size=2)
    assert loader.num_samples == 24 and loader.dropped_per_epoch == 0
    halves = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        counts = Counter(keys_of(list(loader)))
        assert all(counts[k] == 2 for k in all_keys("a", 10))
        half = {k for k in counts if k.startswith("b")}
        assert len(half) == 4 and all(counts[k] == 1 for k in half)
        halves.append(half)
    assert halves[0] != halves[1]


def test_batching_modes_keep_sample_counts(uneven, tokenizer):
    dynamic = next(iter(make([uneven], tokenizer, batch_size=4)))
    packed = next(iter(make([uneven], tokenizer, batch_size=4, batching="pack")))
    naive = next(iter(make([uneven], tokenizer, batch_size=4, batching="max_len")))
    assert dynamic["keys"] == naive["keys"] and sorted(packed["keys"]) == sorted(dynamic["keys"])
    assert packed["num_samples"] == 4 and packed["input_ids"].shape[0] < 4
    assert packed["num_label_tokens"] == dynamic["num_label_tokens"] == naive["num_label_tokens"]
    assert naive["input_ids"].shape == (4, MAX_SEQ_LEN) and dynamic["input_ids"].shape[1] < MAX_SEQ_LEN


def test_a_batch_of_only_bad_samples_is_empty_but_still_delivered(tmp_path, tokenizer):
    broken = {i: {**members(i), "0.jpg": b"garbage"} for i in range(4)}
    folder = write_shards(tmp_path / "s", [8], special=broken, images_of=lambda i: 1)
    batches = list(make([folder], tokenizer, batch_size=4, chunk_size=100, max_bad_fraction=0.6, min_seen=1))
    assert len(batches) == 2
    empty = [b for b in batches if b["num_samples"] == 0]
    assert len(empty) <= 1 and sum(b["num_samples"] for b in batches) == 4
    if empty:
        assert empty[0]["input_ids"].shape == (0, 0) and empty[0]["keys"] == [] and len(empty[0]["skipped"]) == 4
    # However the chunks fall, an all-bad micro-batch has the batch contract's keys and dtypes.
    loader = make([folder], tokenizer, batch_size=4)
    bad = [BadSample("image_decode", "test")] * 4
    batch = loader.dataset().make_batch(0, bad, BadSampleLog())
    assert batch["num_samples"] == 0 and batch["stats"]["bad"] == 4
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (0, 0, 3, 16, 16)
    assert batch["image_mask"].dtype == torch.bool and batch["input_ids"].dtype == torch.long


def test_eval_loader_every_sample_once_disjoint_ranks_equal_lengths(uneven, tokenizer):
    loaders = [make_loader([uneven], tokenizer, eval=True, batch_size=4, world_size=3, rank=r, num_workers=2)
               for r in range(3)]
    assert {len(loader) for loader in loaders} == {3}  # ceil(ceil(25 / 3) / 4)
    per_rank = [keys_of(list(loader)) for loader in loaders]
    flat = [k for keys in per_rank for k in keys]
    assert sorted(flat) == sorted(all_keys("c", 25)) and flat == sorted(flat)  # in order, each once


def test_dataset_is_picklable_and_state_is_checked(uneven, tokenizer):
    loader = make([uneven], tokenizer, num_workers=2)
    clone = pickle.loads(pickle.dumps(loader.dataset()))
    assert next(iter(clone))["keys"] == next(iter(loader))["keys"]
    other = make([uneven], tokenizer, chunk_size=8)
    with pytest.raises(plan.PositionError, match="data.chunk_size"):
        other.load_state_dict(loader.state_dict(0))

"""The demo's `vision` stage: cell labels read from captions, the cell pooling, and a trained encoder saved as a
loadable CLIP folder whose geometry gives one image token per cell."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_tools.shapes import COLOURS, KINDS, POSITIONS, SIZES
from vlm.demo.vision import (
    EMPTY,
    IGNORE_INDEX,
    TOWER,
    CellHeads,
    cell_labels,
    train_vision_encoder,
)
from vlm.model.projector import pixel_shuffle, shuffled_tokens
from vlm.model.vision_encoder import encode_images, load_vision_encoder

TINY_SHARDS = Path(__file__).parents[1] / "fixtures" / "tiny_shards"  # captions like "A red square.": no labels


def test_every_named_shape_labels_its_cell_and_the_other_cells_are_empty():
    labels = cell_labels("Two shapes: a large red circle in the top left and a small blue square in the center.")
    assert len(labels) == len(POSITIONS) == 9
    assert labels[POSITIONS.index("top left")] == [1 + KINDS.index("circle"), list(COLOURS).index("red"),
                                                  SIZES.index("large")]
    assert labels[POSITIONS.index("center")] == [1 + KINDS.index("square"), list(COLOURS).index("blue"),
                                                SIZES.index("small")]
    empty = [cell for i, cell in enumerate(labels) if POSITIONS[i] not in ("top left", "center")]
    assert empty == [[EMPTY, IGNORE_INDEX, IGNORE_INDEX]] * 7
    gray = cell_labels("One shape, in grayscale: a small star in the top right.")
    assert gray[POSITIONS.index("top right")] == [1 + KINDS.index("star"), IGNORE_INDEX, SIZES.index("small")]
    assert cell_labels("Nothing I can parse.") is None


def test_each_cell_is_read_from_the_image_token_the_language_model_gets():
    heads = CellHeads(4, 81)  # the demo tower: 9 x 9 patches, 3 x 3 per cell
    features = torch.zeros(1, 81, 4)
    features[0, 3 * 9 + 6, :] = 1.0  # row 3, column 6: the first patch of the middle-right cell
    tokens = pixel_shuffle(features, 3)  # what the VLM's projector receives
    assert tokens.shape == (1, 9, 36) and tokens[0, POSITIONS.index("middle right")].sum() == 4
    assert tokens[0].sum() == 4
    assert heads(features).shape == (1, 9, sum(heads.sizes))
    assert heads.sizes == [5, len(COLOURS), len(SIZES), 9]
    with pytest.raises(ValueError, match="multiple of 3"):
        CellHeads(16, 64)  # 8 x 8 patches: cells would split patches


def test_the_demo_tower_gives_one_image_token_per_cell():
    patches = (TOWER["image_size"] // TOWER["patch_size"]) ** 2
    assert shuffled_tokens(patches, 3) == len(POSITIONS)


@pytest.mark.slow
def test_training_lowers_the_loss_and_saves_an_encoder_the_trainer_can_load(synth_shards, tmp_path):
    folder = tmp_path / "vision_model"
    result = train_vision_encoder(synth_shards["pretrain"], synth_shards["eval"], folder, steps=40, batch_size=16,
                                  warmup_steps=5, progress=False)
    assert result["pictures"] == 192 and result["steps"] == 40 and result["skipped"] == {}  # 1-3 shapes: all
    assert result["loss_last"] < result["loss_first"]
    held = result["held_out"]
    assert held["pictures"] > 0 and all(0.0 <= held[k] <= 1.0 for k in ("kind", "position", "size"))

    encoder = load_vision_encoder(folder)  # the CLIP folder the pretrain stage starts from
    assert encoder.config.image_size == TOWER["image_size"] and encoder.config.patch_size == TOWER["patch_size"]
    features = encode_images(encoder, torch.zeros(2, 3, encoder.config.image_size, encoder.config.image_size))
    assert features.shape == (2, (encoder.config.image_size // encoder.config.patch_size) ** 2,
                              encoder.config.hidden_size)


def test_bad_settings_and_a_corpus_without_shape_captions_are_clear_errors(synth_shards, tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        train_vision_encoder(synth_shards["pretrain"], synth_shards["eval"], tmp_path / "v", steps=0)
    with pytest.raises(ValueError, match="no caption records naming shapes"):
        train_vision_encoder(TINY_SHARDS, synth_shards["eval"], tmp_path / "v", steps=2, progress=False)


def test_the_demo_stage_turns_a_corpus_without_labels_into_a_stage_error(tmp_path):
    from vlm.demo.settings import DemoPaths, DemoSettings
    from vlm.demo.stages import StageError, teach_vision

    paths = DemoPaths(tmp_path / "data", tmp_path / "out")
    paths.shards("pretrain").parent.mkdir(parents=True)
    paths.shards("pretrain").symlink_to(TINY_SHARDS.resolve(), target_is_directory=True)
    with pytest.raises(StageError, match="--vision_steps 0"):
        teach_vision(paths, DemoSettings(vision_steps=2, batch_size=2))
    assert teach_vision(paths, DemoSettings(vision_steps=0)) is None

"""The demo's `vision` stage: labels read from captions, and a trained encoder saved as a loadable CLIP folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_tools.shapes import COLOURS, KINDS, POSITIONS, SIZES
from vlm.demo.vision import IGNORE_INDEX, one_shape_labels, train_vision_encoder
from vlm.model.vision_encoder import encode_images, load_vision_encoder

TINY_SHARDS = Path(__file__).parents[1] / "fixtures" / "tiny_shards"  # captions like "A red square.": no labels


def test_labels_come_from_one_shape_captions_only():
    labels = one_shape_labels("One shape: a large red circle in the middle left.")
    assert labels == [KINDS.index("circle"), list(COLOURS).index("red"), POSITIONS.index("middle left"),
                      SIZES.index("large")]
    gray = one_shape_labels("One shape, in grayscale: a small star in the top right.")
    assert gray is not None and gray[1] == IGNORE_INDEX and gray[0] == KINDS.index("star")
    assert one_shape_labels("Two shapes: a large red circle in the top left and a small blue square in the "
                            "center.") is None
    assert one_shape_labels("Nothing I can parse.") is None


@pytest.mark.slow
def test_training_lowers_the_loss_and_saves_an_encoder_the_trainer_can_load(synth_shards, tmp_path):
    folder = tmp_path / "vision_model"
    result = train_vision_encoder(synth_shards["pretrain"], synth_shards["eval"], folder, steps=40, batch_size=16,
                                  warmup_steps=5, progress=False)
    assert result["pictures"] > 50 and result["steps"] == 40 and result["skipped"] == {}
    assert result["loss_last"] < result["loss_first"]
    held = result["held_out"]
    assert held["pictures"] > 0 and all(0.0 <= held[k] <= 1.0 for k in ("kind", "position", "size"))

    encoder = load_vision_encoder(folder)  # the CLIP folder the pretrain stage starts from
    features = encode_images(encoder, torch.zeros(2, 3, encoder.config.image_size, encoder.config.image_size))
    assert features.shape == (2, (encoder.config.image_size // encoder.config.patch_size) ** 2,
                              encoder.config.hidden_size)


def test_bad_settings_and_a_corpus_without_one_shape_captions_are_clear_errors(synth_shards, tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        train_vision_encoder(synth_shards["pretrain"], synth_shards["eval"], tmp_path / "v", steps=0)
    with pytest.raises(ValueError, match="no one-shape caption records"):
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

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from vlm.model.vision_encoder import (
    VisionEncoderError,
    encode_images,
    load_vision_encoder,
    num_image_tokens,
    tiny_vision_config,
)


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(VisionEncoderError, match=str(tmp_path / "nowhere")):
        load_vision_encoder(tmp_path / "nowhere")


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(VisionEncoderError, match="config.json"):
        load_vision_encoder(tmp_path)


def test_non_clip_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    with pytest.raises(VisionEncoderError, match="siglip_vision_model"):
        load_vision_encoder(tmp_path)


def test_tiny_encoder_loads_frozen_with_cls_dropped(tiny_vision_dir):
    encoder = load_vision_encoder(tiny_vision_dir)
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    features = encode_images(encoder, torch.randn(3, 3, 32, 32))
    assert features.shape == (3, num_image_tokens(encoder.config), 32) == (3, 16, 32)
    full = encoder(pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state
    assert full.shape[1] == 17  # CLS + 16 patches


def test_full_clip_model_folder_gives_the_vision_tower(tmp_path):
    vision = tiny_vision_config(image_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict())).eval()
    clip.save_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    expected = clip.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
    assert torch.allclose(encode_images(load_vision_encoder(tmp_path), pixels), expected, atol=1e-6)


def test_incomplete_weights_are_an_error(tmp_path):
    CLIPVisionModel(tiny_vision_config(image_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in weights if "encoder.layers.0" in k)
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VisionEncoderError, match="incomplete"):
        load_vision_encoder(tmp_path)

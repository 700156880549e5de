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


def test_a_folder_of_another_kind_of_model_is_refused_naming_what_was_found_and_what_works(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2"}))  # SigLIP2 naflex
    with pytest.raises(VisionEncoderError, match=r"holds a 'siglip2' model.*'clip'.*'siglip_vision_model'"):
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


TINY = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2)


def _siglip_folders(tmp_path):
    """A tiny random SigLIP vision tower alone and inside a whole SigLIP model, saved with save_pretrained."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    alone = SiglipVisionModel(SiglipVisionConfig(**TINY)).eval()
    alone.save_pretrained(tmp_path / "alone")
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    whole = SiglipModel(SiglipConfig(text_config=text, vision_config=TINY)).eval()
    whole.save_pretrained(tmp_path / "whole")
    return (tmp_path / "alone", alone), (tmp_path / "whole", whole.vision_model)


def test_siglip_towers_load_alone_or_from_a_whole_model_and_keep_every_token(tmp_path):
    """SigLIP has no CLS: every one of its (32 / 8)^2 = 16 output tokens is an image token."""
    pixels = torch.randn(2, 3, 32, 32)
    for folder, reference in _siglip_folders(tmp_path):
        encoder = load_vision_encoder(folder)
        assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
        assert num_image_tokens(encoder.config) == 16
        with torch.no_grad():
            got, want = encode_images(encoder, pixels), reference(pixel_values=pixels).last_hidden_state
        assert got.shape == (2, 16, 32)
        torch.testing.assert_close(got, want)


def test_the_feature_layer_and_keeping_clips_cls(tmp_path):
    """feature_layer -2 is the second to last layer's output (LLaVA's choice); drop_leading=0 keeps CLIP's CLS
    first, making one more image token."""
    from vlm.model.vision_encoder import build_vision_encoder, read_vision_config

    (folder, _), _ = _siglip_folders(tmp_path)
    siglip = load_vision_encoder(folder)
    clip = CLIPVisionModel(tiny_vision_config(**TINY)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for encoder, lead in ((siglip, 0), (clip, 1)):
            states = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states  # embeddings + 2 layers
            torch.testing.assert_close(encode_images(encoder, pixels, feature_layer=-2), states[1][:, lead:])
            assert not torch.equal(encode_images(encoder, pixels, feature_layer=-2), encode_images(encoder, pixels))
        kept = encode_images(clip, pixels, drop_leading=0)
        torch.testing.assert_close(kept, clip(pixel_values=pixels).last_hidden_state)
    assert num_image_tokens(clip.config, drop_leading=0) == kept.shape[1] == 17
    assert type(build_vision_encoder(read_vision_config(folder))).__name__ == "SiglipVisionModel"


def test_another_transformers_vision_tower_loads_with_its_leading_tokens_counted(tmp_path):
    """A ViT (not CLIP, not SigLIP): loaded through the Auto classes, its CLS found by running it once, dropped."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(**TINY)).eval()
    vit.save_pretrained(tmp_path / "vit")
    encoder = load_vision_encoder(tmp_path / "vit")
    assert type(encoder).__name__ == "ViTModel" and encoder.config.vlm_leading_tokens == 1
    assert num_image_tokens(encoder.config) == 16 and num_image_tokens(encoder.config, drop_leading=0) == 17
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encode_images(encoder, pixels), vit(pixel_values=pixels).last_hidden_state[:, 1:])


def test_a_folder_of_a_model_that_is_not_a_vision_tower_is_refused_naming_it(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(VisionEncoderError, match="holds a 'gpt2' model, not a fixed-resolution vision tower"):
        load_vision_encoder(tmp_path)


def test_a_preprocessor_that_makes_another_size_than_the_tower_takes_is_named(tmp_path):
    """A 48 x 48 processor for a 32 px tower: a config error naming both sizes, before any training."""
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    from vlm.build import build
    from vlm.config import Config, ConfigError, DataConfig, ModelConfig

    SiglipVisionModel(SiglipVisionConfig(**TINY)).save_pretrained(tmp_path)
    SiglipImageProcessorPil(size={"height": 48, "width": 48}).save_pretrained(tmp_path)
    cfg = Config(model=ModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vision_model=str(tmp_path)),
                 data=DataConfig(train_shards=["unused"]))
    with pytest.raises(ConfigError, match="makes 48 x 48 pictures but the vision tower takes 32 x 32"):
        build(cfg)

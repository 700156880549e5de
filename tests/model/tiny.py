"""Tiny model geometry shared by the model tests (32 px / patch 8 tiny vision encoder = 16 image tokens)."""

from vlm.model.config import VLMConfig

IMG = 5  # placeholder id in these tests
RUN = 16  # tokens per image


def tiny_config(**overrides):
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                image_token_id=IMG, image_token_len=RUN, vision_hidden_size=32, max_position_embeddings=512)
    return VLMConfig(**{**base, **overrides})


def ids_with_images(pattern):
    """pattern: list of ints (text ids) and 'I' (one placeholder run)."""
    out = []
    for item in pattern:
        out += [IMG] * RUN if item == "I" else [item]
    return out

"""Projectors (key names, shapes, math) and pixel shuffle (token count and placement), alone and in the VLM.

.venv/bin/python -m pytest tests/model/test_projector.py -q
"""

import pytest
import torch
import torch.nn.functional as F

from tests.model.tiny import IMG, tiny_config
from vlm.model.projector import VisionProjector, pixel_shuffle
from vlm.model.vision_encoder import load_vision_encoder
from vlm.model.vlm import MiniMindVLM


@pytest.mark.parametrize("kind, shapes", [
    ("linear", {"vision_proj.0.weight": (32, 768), "vision_proj.0.bias": (32,)}),
    ("mlp", {"mlp.0.weight": (768,), "mlp.0.bias": (768,), "mlp.1.weight": (32, 768), "mlp.1.bias": (32,),
             "mlp.3.weight": (32, 32), "mlp.3.bias": (32,)}),
    ("mlp2x_gelu", {"mlp.0.weight": (32, 768), "mlp.0.bias": (32,), "mlp.2.weight": (32, 32), "mlp.2.bias": (32,)}),
])
def test_each_projector_has_its_projects_key_names_shapes_and_math(kind, shapes):
    projector = VisionProjector(768, 32, kind)
    assert {k: tuple(v.shape) for k, v in projector.state_dict().items()} == shapes
    x = torch.randn(2, 5, 768)
    p = dict(projector.named_parameters())
    if kind == "linear":
        want = F.linear(x, p["vision_proj.0.weight"], p["vision_proj.0.bias"])
    elif kind == "mlp":
        normed = F.layer_norm(x, (768,), p["mlp.0.weight"], p["mlp.0.bias"])
        want = F.linear(F.gelu(F.linear(normed, p["mlp.1.weight"], p["mlp.1.bias"])), p["mlp.3.weight"], p["mlp.3.bias"])
    else:
        want = F.linear(F.gelu(F.linear(x, p["mlp.0.weight"], p["mlp.0.bias"])), p["mlp.2.weight"], p["mlp.2.bias"])
    torch.testing.assert_close(projector(x), want)


def test_pixel_shuffle_merges_each_block_of_neighbouring_patches_into_one_token():
    """A 4 x 4 grid by 2: output token (i, j) holds patches (2i + a, 2j + b) for (a, b) in row-major order."""
    grid = torch.arange(16.0).view(1, 16, 1) * torch.tensor([1.0, -1.0])  # patch r*4+c has features (k, -k)
    out = pixel_shuffle(grid, 2)
    assert out.shape == (1, 4, 8)
    for i in range(2):
        for j in range(2):
            patches = [(2 * i + a) * 4 + (2 * j + b) for a in range(2) for b in range(2)]
            assert out[0, i * 2 + j].tolist() == [v for k in patches for v in (float(k), -float(k))]
    assert pixel_shuffle(grid, 1) is grid
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.zeros(1, 12, 2), 2)


def test_a_vlm_with_pixel_shuffle_and_the_mlp_projector_has_shorter_placeholder_runs(tiny_vision_dir):
    """16 patches of the tiny tower by 2 -> 4 image tokens per picture, each a projection of 4 patches."""
    encoder = load_vision_encoder(tiny_vision_dir)
    with pytest.raises(ValueError, match="4 tokens per image"):  # the run length must follow the shuffle
        MiniMindVLM(tiny_config(projector="mlp", pixel_shuffle=2), encoder)
    model = MiniMindVLM(tiny_config(projector="mlp", pixel_shuffle=2, image_token_len=4), encoder).eval()
    assert model.vision_proj.in_features == 4 * 32
    pixels = torch.randn(1, 1, 3, 32, 32)
    ids = torch.tensor([[7, 8] + [IMG] * 4 + [9]])
    embeds = model.merge_image_features(ids, model.model.embed_tokens(ids), pixels)
    with torch.no_grad():
        patches = encoder(pixel_values=pixels[0]).last_hidden_state[:, 1:]  # (1, 16, 32)
        want = model.vision_proj(pixel_shuffle(patches, 2))  # (1, 4, 32)
    torch.testing.assert_close(embeds[0, 2:6], want[0])
    assert model(input_ids=ids, pixel_values=pixels).logits.shape == (1, 7, 64)

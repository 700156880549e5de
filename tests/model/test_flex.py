"""Packed rows through FlexAttention (`vlm.model.flex`): same results as the dense mask, and the path chosen.

.venv/bin/python -m pytest tests/model/test_flex.py -q
"""

import warnings

import pytest
import torch

from tests.model.test_language_model import tiny_model
from vlm.model import flex
from vlm.model.language_model import segment_attention

pytestmark = pytest.mark.skipif(flex.flex_attention is None, reason="this PyTorch has no FlexAttention")

# Two packed rows of two 128-token tiles: row 0 holds two samples, one per tile; row 1 a sample across both
# tiles, two short ones and padding.
SEGMENTS = torch.tensor([[1] * 128 + [2] * 128, [1] * 200 + [2] * 37 + [3] * 3 + [0] * 16])


def test_segment_positions_count_as_the_dense_rule_does():
    """Positions restart in every segment, padding gets 0, and ids that come back later continue their count."""
    odd = torch.tensor([[1, 1, 2, 2, 1, 0, 3, 0], [2, 2, 2, 1, 1, 1, 1, 0]])
    for seg in (SEGMENTS, odd):
        _, dense = segment_attention(seg, seg.shape[1])
        assert torch.equal(flex.segment_positions(seg), dense)


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_packed_rows_give_the_dense_results_and_skip_unshared_blocks(compiled):
    """The block mask attends as the dense mask does (every real token's logits match), GQA without K/V
    copies; tiles two samples do not share are not computed."""
    import shutil

    if compiled and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    model = tiny_model(max_position_embeddings=256).eval()
    ids = torch.randint(0, 97, SEGMENTS.shape)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        dense = model(ids, attention_mask=SEGMENTS).logits
        model.model.packed_attention = "flex"
        mask, positions = model.model.attention_layout(SEGMENTS, SEGMENTS.shape[1], 0)
        assert flex.is_block_mask(mask)
        if compiled:
            for layer in model.model.layers:
                layer.compile()
        flexed = model(ids, attention_mask=SEGMENTS).logits
    real = SEGMENTS > 0
    torch.testing.assert_close(flexed[real], dense[real], atol=2e-5, rtol=1e-5)
    # Query tile 1 of row 0 shares nothing with key tile 0 (another sample): one tile read, where causal
    # attention alone would read two; row 1's sample spans both tiles, so there it reads two.
    assert mask.kv_num_blocks[0, 0, 1].item() == 1 and mask.kv_num_blocks[1, 0, 1].item() == 2


def test_the_dense_mask_where_flex_cannot_run():
    """Training on the CPU (PyTorch has no FlexAttention backward there), attention dropout, a KV-cache
    prefix, and a model never compiled take the dense mask."""
    model = tiny_model(max_position_embeddings=256)
    seg, total = SEGMENTS, SEGMENTS.shape[1]
    assert not flex.is_block_mask(model.model.attention_layout(seg, total, 0)[0])  # not compiled: "dense"
    model.model.packed_attention = "flex"
    model.train()
    assert torch.is_grad_enabled()
    assert not flex.usable(torch.device("cpu"), 0.0)
    assert isinstance(model.model.attention_layout(seg, total, 0)[0], torch.Tensor)  # CPU backward: dense
    assert flex.usable(torch.device("cuda"), 0.0) and not flex.usable(torch.device("cuda"), 0.1)
    with torch.no_grad():
        assert flex.is_block_mask(model.model.attention_layout(seg, total, 0)[0])
        assert isinstance(model.model.attention_layout(seg, total - 8, 8)[0], torch.Tensor)  # with a cache prefix

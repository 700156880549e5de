"""Which attention kernel path a training batch takes, through the trainer's own input function
(`vlm.train.stepping.model_inputs`) and the real model: right-padded rows go mask-free (SDPA's causal path,
no (B, 1, T, T) tensor, GQA without copied K/V), packed rows keep their segment mask; losses agree."""

import pytest
import torch
import torch.nn.functional as F

from vlm.data.collate import pack_collate, pad_collate
from vlm.formats.constants import IGNORE_INDEX
from vlm.model.config import MiniMindConfig
from vlm.model.language_model import MiniMindForCausalLM
from vlm.train.stepping import model_inputs


def samples(lengths):
    out = []
    for i, n in enumerate(lengths):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(1, 97, (n,), generator=g)
        labels = ids.clone()
        labels[0] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels, "pixel_values": torch.zeros((0, 3, 4, 4), dtype=torch.uint8)})
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = MiniMindConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)
    return MiniMindForCausalLM(cfg).eval()


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append({"mask": attn_mask, "causal": kwargs.get("is_causal"), "gqa": kwargs.get("enable_gqa"),
                      "kv_heads": k.shape[1], "q_heads": q.shape[1]})
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def loss_of(model, inputs):
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "pixel_values"}).loss


def test_right_padded_rows_take_the_mask_free_causal_path_with_the_same_loss(model, sdpa_calls):
    batch = pad_collate(samples([12, 7, 3]), pad_id=0)
    assert batch["packed"] is False
    inputs = model_inputs(batch, torch.device("cpu"), normalize_pixels=None)
    assert "attention_mask" not in inputs and "position_ids" not in inputs
    fast = loss_of(model, inputs)
    assert sdpa_calls and all(c["mask"] is None and c["causal"] for c in sdpa_calls)
    assert all(c["gqa"] and c["kv_heads"] == 2 and c["q_heads"] == 4 for c in sdpa_calls)  # K/V not copied
    sdpa_calls.clear()
    masked = loss_of(model, {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids")})
    assert all(c["mask"] is not None for c in sdpa_calls)
    torch.testing.assert_close(fast, masked, atol=1e-6, rtol=1e-6)


def test_packed_rows_keep_their_segment_mask_and_equal_the_unpacked_loss(model, sdpa_calls):
    rows = samples([12, 7, 5, 9, 3])
    batch = pack_collate(rows, pad_id=0, max_len=24)
    assert batch["packed"] is True and batch["input_ids"].shape[0] < len(rows)
    inputs = model_inputs(batch, torch.device("cpu"), normalize_pixels=None)
    assert "attention_mask" in inputs
    packed = loss_of(model, inputs)
    assert sdpa_calls and all(c["mask"] is not None for c in sdpa_calls)
    # With a mask, K/V are expanded (CUDA's fused kernels take enable_gqa only without one).
    assert all(not c["gqa"] and c["kv_heads"] == c["q_heads"] == 4 for c in sdpa_calls)
    unpacked = loss_of(model, model_inputs(pad_collate(rows, pad_id=0), torch.device("cpu"), normalize_pixels=None))
    torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=1e-5)


def test_a_pack_batch_of_one_sample_per_row_is_not_packed():
    batch = pack_collate(samples([20, 18]), pad_id=0, max_len=24)
    assert batch["input_ids"].shape[0] == 2 and batch["packed"] is False

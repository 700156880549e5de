import pytest
import torch
import torch.nn.functional as F

from tests.model.tiny import IMG, RUN, ids_with_images, tiny_config
from vlm.model.vision_encoder import load_vision_encoder
from vlm.model.vlm import ImagePlaceholderError, MiniMindVLM


@pytest.fixture
def model(tiny_vision_dir):
    return MiniMindVLM(tiny_config(), load_vision_encoder(tiny_vision_dir)).eval()


def test_features_land_exactly_at_placeholders_in_order(model):
    row0 = ids_with_images([9, 10, "I", 11, "I", 12])
    row1 = ids_with_images([13, "I"]) + [14] * (len(row0) - RUN - 1)
    input_ids = torch.tensor([row0, row1])
    pixels = torch.randn(2, 2, 3, 32, 32)  # sample 1 has one real image; slot 1 is padding
    embeds = model.model.embed_tokens(input_ids)
    merged = model.merge_image_features(input_ids, embeds, pixels)
    with torch.no_grad():
        feats = model.image_features(pixels.flatten(0, 1)).view(2, 2, RUN, -1)
    assert torch.equal(merged[0, 2 : 2 + RUN], feats[0, 0])
    assert torch.equal(merged[0, 3 + RUN : 3 + 2 * RUN], feats[0, 1])
    assert torch.equal(merged[1, 1 : 1 + RUN], feats[1, 0])
    text = input_ids != IMG
    assert torch.equal(merged[text], embeds[text])


def test_text_only_sample_in_a_batch_with_images_and_batch_of_one(model):
    with_image = ids_with_images([9, "I", 10])
    text_only = [11] * len(with_image)
    input_ids = torch.tensor([with_image, text_only])
    pixels = torch.randn(2, 1, 3, 32, 32)
    batched = model(input_ids=input_ids, pixel_values=pixels).logits
    alone = model(input_ids=input_ids[:1], pixel_values=pixels[:1]).logits
    text_alone = model(input_ids=input_ids[1:]).logits
    assert torch.allclose(batched[0], alone[0], atol=1e-5)
    assert torch.allclose(batched[1], text_alone[0], atol=1e-5)


def test_cut_placeholder_run_is_a_clear_error(model):
    input_ids = torch.tensor([[9] + [IMG] * (RUN - 1) + [10]])
    with pytest.raises(ImagePlaceholderError, match="not multiples of image_token_len"):
        model(input_ids=input_ids, pixel_values=torch.randn(1, 1, 3, 32, 32))


def test_more_runs_than_images_is_a_clear_error(model):
    input_ids = torch.tensor([ids_with_images(["I", 9, "I"])])
    with pytest.raises(ImagePlaceholderError, match="image slots"):
        model(input_ids=input_ids, pixel_values=torch.randn(1, 1, 3, 32, 32))


def test_loss_is_mean_ce_over_labelled_tokens_plus_separate_aux(model):
    input_ids = torch.tensor([ids_with_images([9, "I", 10, 11, 12, 13])])
    labels = input_ids.clone()
    labels[:, : RUN + 3] = -100
    out = model(input_ids=input_ids, pixel_values=torch.randn(1, 1, 3, 32, 32), labels=labels)
    expected = F.cross_entropy(out.logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert float(out.aux_loss) == 0.0


def test_frozen_encoder_is_outside_state_dict_and_optimizer_but_follows_dtype(model):
    assert not any(k.startswith("vision_encoder.") for k in model.state_dict())
    assert not any(n.startswith("vision_encoder.") for n, _ in model.named_parameters())
    assert "vision_proj.vision_proj.0.weight" in model.state_dict()
    model.to(torch.bfloat16)
    assert next(model.get_vision_encoder().parameters()).dtype == torch.bfloat16


def test_gradients_reach_projector_not_frozen_encoder(model):
    model.train()
    input_ids = torch.tensor([ids_with_images([9, "I", 10, 11])])
    out = model(input_ids=input_ids, pixel_values=torch.randn(1, 1, 3, 32, 32), labels=input_ids)
    out.loss.backward()
    assert model.vision_proj.vision_proj[0].weight.grad is not None
    assert all(p.grad is None for p in model.get_vision_encoder().parameters())
    assert not model.get_vision_encoder().training


def test_trainable_encoder_is_a_registered_part(tiny_vision_dir):
    model = MiniMindVLM(tiny_config(), load_vision_encoder(tiny_vision_dir), trainable_vision=True).train()
    assert any(n.startswith("vision_encoder.") for n, _ in model.named_parameters())
    input_ids = torch.tensor([ids_with_images([9, "I", 10, 11])])
    model(input_ids=input_ids, pixel_values=torch.randn(1, 1, 3, 32, 32), labels=input_ids).loss.backward()
    assert model.vision_encoder.embeddings.patch_embedding.weight.grad is not None


def test_geometry_mismatch_is_reported(tiny_vision_dir):
    with pytest.raises(ValueError, match="image_token_len"):
        MiniMindVLM(tiny_config(image_token_len=196), load_vision_encoder(tiny_vision_dir))


def test_generate_with_image_and_cache_equals_greedy_full_forward(model):
    prompt = torch.tensor([ids_with_images([9, "I", 10])])
    pixels = torch.randn(1, 1, 3, 32, 32)
    generated = model.generate(prompt, pixel_values=pixels, max_new_tokens=6, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
    ids = prompt
    for _ in range(6):  # greedy decoding by full forward passes, no cache
        next_id = model(input_ids=ids, pixel_values=pixels).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("pack", [False, True])
def test_the_collators_image_index_is_the_checked_layout_and_gives_the_same_logits(model, pack):
    from vlm.data.collate import pack_collate, pad_collate

    patterns = [[9, "I", 10], [11, 12], [13, "I", 14, "I", 15], [16, "I"]]
    samples = []
    for pattern in patterns:
        ids = torch.tensor(ids_with_images(pattern))
        n = pattern.count("I")
        samples.append({"input_ids": ids, "labels": ids.clone(),
                        "pixel_values": torch.randint(0, 255, (n, 3, 32, 32), dtype=torch.uint8)})
    batch = pack_collate(samples, 0, max_len=64) if pack else pad_collate(samples, 0)
    assert batch["num_images"] == 4 == batch["image_index"].numel()
    torch.testing.assert_close(batch["image_index"], model.image_slots(batch["input_ids"], batch["pixel_values"]))
    pixels = batch["pixel_values"].float() / 255
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "pixel_values": pixels}
    with torch.no_grad():
        checked = model(**inputs, labels=batch["labels"])
        trusted = model(**inputs, image_index=batch["image_index"])
        scored = model(**inputs, image_index=batch["image_index"], loss_index=batch["loss_index"],
                       loss_targets=batch["loss_targets"])
    assert torch.equal(checked.logits, trusted.logits)
    # The head on the scored positions only: the same logits there, the same loss.
    assert scored.logits.shape == (batch["loss_index"].numel(), checked.logits.shape[-1])
    torch.testing.assert_close(scored.logits, checked.logits.flatten(0, 1)[batch["loss_index"]])
    torch.testing.assert_close(scored.loss, checked.loss)


def test_compiled_blocks_give_eager_results_without_graph_breaks_as_lengths_change(model):
    """`compile_blocks` (train.compile): each decoder block stays one graph when the row length changes
    between batches (dynamic padding), and computes what eager does."""
    import copy
    import shutil

    from torch._dynamo.utils import counters

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    compiled = copy.deepcopy(model).train()
    eager = model.train()
    assert compiled.compile_blocks() == len(compiled.model.layers) + 1  # the blocks and the frozen tower
    counters.clear()
    for length in (24, 40, 56):
        ids = torch.randint(6, 64, (2, length))
        torch.testing.assert_close(compiled(input_ids=ids, labels=ids).loss, eager(input_ids=ids, labels=ids).loss,
                                   atol=1e-5, rtol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_an_export_writes_a_frozen_tower_as_loaded_not_as_the_run_cast_it(model, tiny_vision_dir, tmp_path):
    """A bf16 run computes the frozen tower in bf16 (match_vision_dtype); its export keeps the source's fp32."""
    from safetensors.torch import load_file

    from vlm.model.pretrained import save_vlm_folder

    model.to(torch.bfloat16)
    assert model.match_vision_dtype() == torch.bfloat16
    assert next(model.get_vision_encoder().parameters()).dtype == torch.bfloat16
    folder = save_vlm_folder(model, tmp_path / "export", vision_source=tiny_vision_dir)
    saved, source = (load_file(f / "model.safetensors") for f in (folder / "vision_model", tiny_vision_dir))
    assert saved.keys() == source.keys() and all(torch.equal(saved[k], source[k]) for k in source)


def test_a_training_batch_without_images_still_runs_the_projector_with_zero_weight(model):
    """Every rank makes the same collectives whatever its micro-batch holds (ZeRO-3 gathers the projector in
    its forward): a text-only micro-batch runs the projector on no rows, giving it zero gradients."""
    calls = []
    handle = model.vision_proj.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.randint(6, 64, (2, 12))
    model.train()
    out = model(input_ids=ids, labels=ids)
    (out.loss + out.aux_loss).backward()  # the trainer's loss: the idle term rides in aux_loss
    assert calls == [1] and all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.vision_proj.parameters())
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    assert calls == [1]  # not outside training

"""The FLOPs behind MFU: hand-computed micro-batches, and the count of a real tiny model against torch's counter."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionModel

from tests.model.tiny import ids_with_images, tiny_config
from vlm.model.vision_encoder import tiny_vision_config
from vlm.model.vlm import MiniMindVLM
from vlm.train.freeze import apply_trainable_policy
from vlm.train.metrics import FlopShape, Stage, flop_shape, micro_batch_flops

BLOCK, HEAD, WIDTH = 10, 6, 2  # weights per decoder block and of the output head; attention width


def lm(trained_blocks: tuple[bool, bool], head_trained: bool, embedding_trained: bool, **vision) -> FlopShape:
    """Two decoder blocks of 10 weights and a head of 6, each all trained or all frozen."""
    blocks = [Stage(BLOCK * t, BLOCK * (not t), t, attention=True) for t in trained_blocks]
    head = Stage(HEAD * head_trained, HEAD * (not head_trained), head_trained, attention=False)
    return FlopShape((*blocks, head), WIDTH, embedding_trained, **vision)


def test_a_fully_trained_language_model_is_palms_6n_plus_12lht():
    shape = lm((True, True), head_trained=True, embedding_trained=True)
    rows, row_len = 3, 4
    # per token: blocks 2 x (6 x 10 + 12 x 2 x 4) = 312, head 6 x 6 = 36
    assert micro_batch_flops(shape, rows, row_len, images=0) == 348 * 12 == 4176
    n, layers = 2 * BLOCK + HEAD, 2
    assert micro_batch_flops(shape, rows, row_len, images=0) == (6 * n + 12 * layers * WIDTH * row_len) * rows * row_len
    # Scoring 5 of the 12 positions runs the head on those 5 only (the trainer's loss_index).
    assert micro_batch_flops(shape, rows, row_len, images=0, head_positions=5) == 312 * 12 + 36 * 5


def test_frozen_parts_and_the_vision_tower_change_the_count_as_the_formula_says():
    # A frozen language model under a trained projector; a frozen tower of 5 Linear weights on 4 patches + the
    # class token, one 2-wide layer, a 7-weight patch embedding; a 3-weight projector. One row of 8 tokens.
    vision = dict(projector=3, projector_trained=True, image_tokens=4, vision_weights=5, vision_patch_weights=7,
                  vision_layers=1, vision_width=2, vision_tokens=5, vision_patches=4)
    frozen_lm = lm((False, False), head_trained=False, embedding_trained=False, **vision)
    # With 2 images, gradients run down through every frozen block to the projector: 4W, attention 12 x 2 x 8.
    lm_part = ((4 * BLOCK + 12 * WIDTH * 8) * 2 + 4 * HEAD) * 8  # 3904
    projector = 2 * 3 * (2 * 4) * 2  # forward + weight gradient on 8 image rows: 96
    tower = 2 * (2 * 5 * 5 + 4 * 1 * 2 * 5**2 + 2 * 7 * 4)  # forward only, per image 306: 612
    assert micro_batch_flops(frozen_lm, 1, 8, images=2) == lm_part + projector + tower == 4612
    # Without images nothing trained is used: forward only (2W, attention 4 x 2 x 8).
    assert micro_batch_flops(frozen_lm, 1, 8, images=0) == ((2 * BLOCK + 4 * WIDTH * 8) * 2 + 2 * HEAD) * 8 == 1440
    # A trained tower: 3x its forward (the patch embedding 2x), and the projector's input gradient too.
    trained_tower = lm((False, False), False, False, **{**vision, "vision_trained": True})
    tower_trained = 2 * (3 * (2 * 5 * 5 + 4 * 1 * 2 * 5**2) + 2 * (2 * 7 * 4))
    assert micro_batch_flops(trained_tower, 1, 8, images=2) == lm_part + 2 * 3 * 8 * 3 + tower_trained
    # Only the last block trains, text only: the first block runs forward only, the head behind it backward.
    last_layer = lm((False, True), head_trained=False, embedding_trained=False, **vision)
    expected = ((2 * BLOCK + 4 * WIDTH * 8) + (6 * BLOCK + 12 * WIDTH * 8) + 4 * HEAD) * 8
    assert micro_batch_flops(last_layer, 1, 8, images=0) == expected == 2880
    # Padding is computed, so it counts: 2 rows of 8 are twice one.
    assert micro_batch_flops(last_layer, 2, 8, images=0) == 2 * expected


VISION = tiny_vision_config(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4)  # 16 patches, as tests.model.tiny


def tiny_model(policy: str, trainable_vision: bool = False, **config) -> MiniMindVLM:
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(**config), CLIPVisionModel(VISION), trainable_vision=trainable_vision)
    apply_trainable_policy(model, policy, ["model.layers.1.*"] if policy == "patterns" else None)
    return model


@pytest.mark.parametrize("policy, images, options", [
    ("projector", True, {}),
    ("projector+last_layer", True, {}),
    ("projector+last_layer", False, {}),
    ("projector+lm", True, {}),
    ("projector+lm", True, {"use_moe": True}),
    ("patterns", False, {}),
    ("all", True, {"trainable_vision": True}),
])
def test_the_count_is_what_torch_counts_in_a_real_forward_and_backward(policy, images, options):
    """torch's FlopCounterMode counts every matmul, convolution and (on SDPA's math kernel) attention product
    that autograd really runs: frozen weights get no weight gradient, nothing below a trained part gets an
    input gradient, the frozen tower runs under no_grad."""
    model = tiny_model(policy, **options)
    if images:
        ids = torch.tensor([ids_with_images([7, "I", 8, 9]), ids_with_images([7, 8, "I", 9])])
        pixels = torch.randn(2, 1, 3, 32, 32)
    else:
        ids, pixels = torch.randint(6, 60, (3, 11)), None
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, pixel_values=pixels, labels=ids)
        (out.loss + out.aux_loss).backward()
    expected = counter.get_total_flops()
    assert micro_batch_flops(flop_shape(model), *ids.shape, images=2 if images else 0) == expected


def test_the_shape_comes_from_layer_sizes_so_zero3_partitioned_weights_count_in_full():
    model = tiny_model("projector")
    before = flop_shape(model)
    for param in model.parameters():
        param.data = torch.empty(0)  # what ZeRO-3 leaves on a rank outside a forward
    assert flop_shape(model) == before
    assert before.embedding_trained is False and before.projector_trained and not before.vision_trained
    hidden, vocab = 32, 64
    assert before.stages[-1] == Stage(0, hidden * vocab, False, attention=False)  # the tied head, frozen
    assert before.vision_tokens == 17 and before.image_tokens == 16 and before.vision_patch_weights == 3 * 8 * 8 * 32
    assert before.vision_patches == 16

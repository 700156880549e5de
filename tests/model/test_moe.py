"""MiniMind's mixture-of-experts MLP: routing, the balance loss (hand-computed), dispatch, gradients.

.venv/bin/python -m pytest tests/model/test_moe.py -q
"""

import math

import pytest
import torch

from vlm.model.config import MiniMindConfig
from vlm.model.moe import MoEFeedForward, MoEGate


def moe_config(**overrides) -> MiniMindConfig:
    fields = dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_moe=True,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        aux_loss_alpha=0.1,
    )
    fields.update(overrides)
    return MiniMindConfig(**fields)


def test_each_token_gets_k_distinct_experts_with_normalised_weights():
    torch.manual_seed(0)
    gate = MoEGate(moe_config(num_experts_per_tok=3)).eval()
    idx, weight, aux = gate(torch.randn(2, 7, 16))
    assert idx.shape == weight.shape == (14, 3)
    assert all(len(set(row.tolist())) == 3 for row in idx)
    torch.testing.assert_close(weight.sum(-1), torch.ones(14))
    assert aux.item() == 0.0  # no balance loss outside training


def test_unnormalised_weights_are_the_router_probabilities():
    torch.manual_seed(0)
    gate = MoEGate(moe_config(norm_topk_prob=False)).eval()
    x = torch.randn(1, 5, 16)
    idx, weight, _ = gate(x)
    probs = (x.view(5, 16) @ gate.weight.T).softmax(-1)
    torch.testing.assert_close(weight, probs.gather(1, idx))
    assert (weight.sum(-1) < 1).all()


def two_expert_gate(seq_aux: bool, alpha: float = 0.1) -> MoEGate:
    """Gate over hidden size 2 whose logits are (ln 3 * x0, ln 3 * x1): x = e0 gives probabilities (3/4, 1/4)."""
    cfg = moe_config(hidden_size=2, num_attention_heads=1, num_key_value_heads=1, n_routed_experts=2)
    cfg.num_experts_per_tok, cfg.seq_aux, cfg.aux_loss_alpha = 1, seq_aux, alpha
    gate = MoEGate(cfg).train()
    with torch.no_grad():
        gate.weight.copy_(torch.eye(2) * math.log(3))
    return gate


def test_aux_loss_by_hand_sequence_and_batch_level():
    # Sequence 0's token picks expert 0 with p = (3/4, 1/4); sequence 1's picks expert 1 with p = (1/4, 3/4).
    x = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (B=2, T=1, D=2)
    # Per sequence: load f = (2, 0) and (0, 2), so each sequence scores 2 * 3/4 = 1.5; mean 1.5 * alpha.
    torch.testing.assert_close(two_expert_gate(seq_aux=True)(x)[2], torch.tensor(0.15))
    # Over the batch: load f = (1, 1), mean probability (1/2, 1/2): 1.0 * alpha.
    torch.testing.assert_close(two_expert_gate(seq_aux=False)(x)[2], torch.tensor(0.1))
    # Both tokens on expert 0 in one sequence: f = (2, 0), P = (3/4, 1/4): 1.5 * alpha either way.
    same = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    for seq_aux in (True, False):
        torch.testing.assert_close(two_expert_gate(seq_aux)(same)[2], torch.tensor(0.15))


def reference_aux(scores: torch.Tensor, idx: torch.Tensor, bsz: int, alpha: float, seq_aux: bool) -> float:
    """The balance loss with explicit loops: alpha * sum_e f_e * P_e, f_e = share of slots on e times E."""
    n_experts, k = scores.shape[1], idx.shape[1]
    per_seq = len(scores) // bsz  # tokens are flattened sequence by sequence
    groups = [range(b * per_seq, (b + 1) * per_seq) for b in range(bsz)] if seq_aux else [range(len(scores))]
    total = 0.0
    for tokens in groups:
        for e in range(n_experts):
            chosen = sum(int(e in idx[t].tolist()) for t in tokens)
            f = chosen / (len(tokens) * k) * n_experts
            total += f * sum(scores[t, e].item() for t in tokens) / len(tokens)
    return alpha * total / len(groups)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_matches_loop_reference(seq_aux):
    torch.manual_seed(1)
    gate = MoEGate(moe_config(seq_aux=seq_aux, n_routed_experts=5, num_experts_per_tok=2)).train()
    x = torch.randn(3, 4, 16)
    idx, _, aux = gate(x)
    scores = (x.view(12, 16) @ gate.weight.T).softmax(-1)
    assert aux.item() >= 0
    assert aux.item() == pytest.approx(reference_aux(scores, idx, 3, 0.1, seq_aux), rel=1e-5)


def test_aux_loss_zero_when_alpha_is_zero():
    gate = MoEGate(moe_config(aux_loss_alpha=0.0)).train()
    assert gate(torch.randn(2, 3, 16))[2].item() == 0.0


@pytest.mark.parametrize("seq_aux", [True, False])
def test_balanced_routing_gives_the_floor_and_collapse_costs_more(seq_aux):
    # Uniform router probabilities: any load gives sum_e f_e / E = 1, the value of a perfectly balanced router.
    gate = MoEGate(moe_config(seq_aux=seq_aux)).train()
    with torch.no_grad():
        gate.weight.zero_()
    torch.testing.assert_close(gate(torch.randn(2, 6, 16))[2], torch.tensor(0.1))
    # Every token confidently on experts 0 and 1: f = (2, 2, 0, 0), P ~ (1/2, 1/2, 0, 0) -> ~2 * alpha.
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:2, 0] = 20.0
    x = torch.randn(2, 6, 16)
    x[..., 0] = 1.0
    assert gate(x)[2].item() == pytest.approx(0.2, rel=1e-3)


def naive_moe(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop: sum_k w_k * expert_k(token) + shared experts."""
    flat = x.reshape(-1, x.shape[-1])
    idx, weight, _ = moe.gate(x)
    rows = []
    for t in range(flat.shape[0]):
        y = sum(weight[t, j] * moe.experts[int(idx[t, j])](flat[t]) for j in range(idx.shape[1]))
        rows.append(y + sum(s(flat[t]) for s in moe.shared_experts))
    return torch.stack(rows).view(x.shape)


@pytest.mark.parametrize("training", [False, True])
def test_dispatch_equals_per_token_reference(training):
    torch.manual_seed(2)
    moe = MoEFeedForward(moe_config(n_shared_experts=2)).train(training)
    x = torch.randn(2, 5, 16)
    out, aux = moe(x)
    torch.testing.assert_close(out, naive_moe(moe, x), atol=1e-6, rtol=1e-5)
    assert (aux.item() > 0) == training


def test_every_expert_gets_a_gradient_even_when_idle():
    torch.manual_seed(3)
    moe = MoEFeedForward(moe_config(n_routed_experts=6, num_experts_per_tok=1)).train()
    x = torch.randn(1, 2, 16, requires_grad=True)  # 2 tokens, 6 experts: at least 4 stay idle
    out, aux = moe(x)
    (out.sum() + aux).backward()
    grads = [p.grad for p in moe.parameters()]
    assert all(g is not None for g in grads)
    idle = [e for e in range(6) if e not in moe.gate(x)[0].view(-1).tolist()]
    assert idle and all(p.grad.abs().sum() == 0 for e in idle for p in moe.experts[e].parameters())
    assert x.grad is not None and moe.gate.weight.grad.abs().sum() > 0

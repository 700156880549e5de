"""MiniMind's feed-forward blocks: the dense SwiGLU MLP and the mixture-of-experts MLP built from it.

Parameter names match MiniMind (`gate_proj`/`up_proj`/`down_proj`; MoE `gate.weight` of shape
(experts, hidden), `experts.{e}.*`, `shared_experts.{s}.*`) so MiniMind's `.pth` files load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from vlm.model.config import MiniMindConfig

# MiniMind adds this to the top-k weight sum before normalising; kept so routed outputs match bit for bit.
TOPK_NORM_EPS = 1e-20


class FeedForward(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), then dropout (MiniMind's position for it)."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D): the SwiGLU MLP, dropout on its output."""
        return self.dropout(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class MoEGate(nn.Module):
    """Softmax router: returns each token's top-k experts, their weights, and the balance loss.

    The balance loss (computed only in training and when `aux_loss_alpha` > 0, as in MiniMind) is
    `alpha * sum_e f_e * P_e` where P_e is the mean router probability of expert e and f_e the fraction of
    routed slots that chose e, scaled so perfectly even routing gives f_e = 1 (and the loss `alpha`).
    `seq_aux=True` computes it per sequence and averages over the batch; `seq_aux=False` over all tokens.
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.norm_topk_prob = config.norm_topk_prob and (config.num_experts_per_tok > 1 or config.moe_normalize_top1)
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> top-k indices (B*T, k), top-k weights (B*T, k), aux loss (scalar)."""
        bsz, seq_len, hidden = x.shape
        scores = F.linear(x.reshape(-1, hidden), self.weight).softmax(dim=-1)  # (N, E)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + TOPK_NORM_EPS)
        if self.training and self.alpha > 0.0:
            aux_loss = self.balance_loss(scores, topk_idx, bsz, seq_len)
        else:
            aux_loss = scores.new_zeros(())
        return topk_idx, topk_weight, aux_loss

    def balance_loss(
        self, scores: torch.Tensor, topk_idx: torch.Tensor, bsz: int, seq_len: int
    ) -> torch.Tensor:
        """Scalar balance loss from router probabilities `scores` (B*T, E) and choices `topk_idx` (B*T, k).

        `alpha * sum_e f_e * P_e` (see the class docstring), per sequence and averaged over the batch when
        `seq_aux`, else over all B*T tokens at once; as MiniMind's MoEGate in model/model_minimind.py.
        """
        if self.seq_aux:
            slots = topk_idx.view(bsz, -1)  # (B, T*k)
            counts = torch.zeros(bsz, self.n_experts, device=scores.device)
            counts.scatter_add_(1, slots, torch.ones(slots.shape, device=scores.device))
            load = counts / (seq_len * self.top_k / self.n_experts)  # (B, E), 1 = even
            mean_prob = scores.view(bsz, seq_len, -1).mean(dim=1)  # (B, E)
            return (load * mean_prob).sum(dim=1).mean() * self.alpha
        load = F.one_hot(topk_idx.view(-1), num_classes=self.n_experts).float().mean(0) * self.n_experts
        return (scores.mean(0) * load).sum() * self.alpha


class MoEFeedForward(nn.Module):
    """Routed experts plus always-on shared experts; returns (output, aux_loss).

    Dispatch sorts the (token, slot) pairs by expert once and runs each expert on its tokens in one batch
    (a loop over experts, not tokens); outputs are weighted and summed back with `index_add`. The same
    code serves training and inference.
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_routed_experts))
        self.gate = MoEGate(config)
        self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (output (B, T, D), aux loss scalar).

        The output is the router-weighted sum of each token's top-k experts (`dispatch`) plus every shared
        expert; the aux loss is the gate's balance loss (zero outside training or with aux_loss_alpha 0).
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        topk_idx, topk_weight, aux_loss = self.gate(x)
        y = self.dispatch(flat, topk_idx, topk_weight)
        for expert in self.shared_experts:
            y = y + expert(flat)
        return y.view(shape), aux_loss

    def dispatch(self, flat: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """flat (N, D), topk_idx/topk_weight (N, k) -> sum_k weight * expert_k(token), shape (N, D)."""
        slot_expert = topk_idx.reshape(-1)  # (N*k,)
        order = slot_expert.argsort(stable=True)
        token_of_slot = order // self.top_k  # (N*k,) token index of each sorted slot
        weight_of_slot = topk_weight.reshape(-1)[order].unsqueeze(-1)  # (N*k, 1)
        counts = torch.bincount(slot_expert, minlength=len(self.experts)).tolist()  # one host sync
        out = torch.zeros_like(flat)
        start = 0
        for expert, count in zip(self.experts, counts):
            # In training an idle expert still runs, on zero tokens: its weights then get zero gradients
            # instead of none, so data-parallel reducers (DDP, ZeRO) see the same gradients on every rank,
            # and under ZeRO-3 the call goes through the module, which gathers its partitioned weights.
            if count == 0 and not self.training:
                continue
            tokens = token_of_slot[start : start + count]
            routed = expert(flat[tokens]) * weight_of_slot[start : start + count]  # (count, D)
            out = out.index_add(0, tokens, routed.to(out.dtype))
            start += count
        return out

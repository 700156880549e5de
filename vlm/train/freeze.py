"""Named policies for what trains; everything else is frozen in place.

    projector                      vision_proj only (both MiniMind-V generations' pretraining)
    projector+last_layer           + the last decoder layer
    projector+first_last_layers    + the first and the last decoder layer (MiniMind-V 3v's SFT)
    projector+lm                   + the whole language model (MiniMind-V 623a130's SFT)
    all / patterns                 everything / parameters whose names match fnmatch patterns
"""

from __future__ import annotations

from fnmatch import fnmatch

from torch import nn


def _trainable_by_policy(name: str, policy: str, last_layer: int, patterns: list[str]) -> bool:
    if policy == "all":
        return True
    if policy == "patterns":
        return any(fnmatch(name, p) for p in patterns)
    if name.startswith("vision_proj."):
        return True
    if policy == "projector+last_layer":
        return name.startswith(f"model.layers.{last_layer}.")
    if policy == "projector+first_last_layers":
        return name.startswith(("model.layers.0.", f"model.layers.{last_layer}."))
    if policy == "projector+lm":
        return name.startswith(("model.", "lm_head."))
    return False  # "projector"


def apply_trainable_policy(model: nn.Module, policy: str, patterns: list[str] | None = None) -> dict[str, int]:
    """Set requires_grad per the policy; return parameter counts (the frozen vision encoder included in total)."""
    last_layer = model.config.num_hidden_layers - 1
    for name, param in model.named_parameters():
        param.requires_grad_(_trainable_by_policy(name, policy, last_layer, patterns or []))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    encoder = model.get_vision_encoder() if hasattr(model, "get_vision_encoder") else None
    if encoder is not None and not getattr(model, "vision_trainable", False):
        total += sum(p.numel() for p in encoder.parameters())
    if policy == "patterns" and trainable == 0:
        raise ValueError(f"train.trainable_patterns {patterns} match no parameter name (e.g. 'vision_proj.*')")
    return {"total": total, "trainable": trainable}

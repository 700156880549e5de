"""MiniMind / MiniMind-V `.pth` weights: strict loading through an explicit name map, and saving.

Files users already have:
- `lm_512.pth` / `llm_512.pth` (MiniMind language model): `model.*` + `lm_head.weight`; no projector.
- `pretrain_vlm_512.pth` / `sft_vlm_512.pth` (MiniMind-V): language model + `vision_proj.*`, fp16.
Neither contains `vision_encoder.*` (MiniMind-V strips it before saving); we never write it either.

Loading is strict: every key of the file must exist in the model with the same shape, and every model
key must be in the file, except the prefixes a caller explicitly allows to be missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

# Wrappers some trainers leave in front of every key (DDP's `module.`, torch.compile's `_orig_mod.`).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
VISION_ENCODER_PREFIX = "vision_encoder."


class WeightsMismatchError(ValueError):
    """A weights file does not fit the model; the message lists the offending keys."""


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `.pth` state dict as data (weights_only: no pickled code runs).

    Raises FileNotFoundError, and WeightsMismatchError for a file that does not read as a state dict of
    tensors (truncated, another format, a pickle with code), naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, ...: all mean "not usable weights"
        raise WeightsMismatchError(f"{path} cannot be read as PyTorch weights ({type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}); is the file complete?") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path} is not a state dict of tensors (got {type(state).__name__})")
    return {_strip_wrappers(k): v for k, v in state.items()}


def _expected_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(VISION_ENCODER_PREFIX)}


def _format_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_minimind_weights(
    model: nn.Module, path: str | Path, allow_missing: Iterable[str] = ()
) -> list[str]:
    """Load a MiniMind(-V) `.pth` into `model` strictly; return the keys left at their current values.

    `allow_missing`: key prefixes that may be absent from the file, e.g. `("vision_proj.",)` for a language-
    model-only `lm_512.pth`. `lm_head.weight` may be absent when it is tied to the embeddings.
    """
    return load_state_strict(model, read_state_dict(path), str(path), allow_missing)


def load_state_strict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, allow_missing: Iterable[str] = ()
) -> list[str]:
    """Copy `state` (MiniMind-V names, no vision encoder) into `model`; every mismatch raises, naming keys."""
    path = source
    state = {k: v for k, v in state.items() if not k.startswith(VISION_ENCODER_PREFIX)}
    expected = _expected_state(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]

    unexpected = set(state) - set(expected)
    missing = {k for k in set(expected) - set(state) if not k.startswith(tuple(allow_missing))}
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if tied and head is not None and embed is not None and head.shape == embed.shape and not torch.equal(head, embed):
        problems.append("lm_head.weight differs from model.embed_tokens.weight but this model ties them")
    if unexpected:
        problems.append(f"keys in the file the model does not have: {_format_keys(unexpected)}")
    if missing:
        problems.append(f"model keys missing from the file: {_format_keys(missing)}")
    if wrong_shape:
        problems.append("shape mismatches (check dim/n_layers/use_moe/vocab_size): " + "; ".join(wrong_shape[:12]))
    if problems:
        raise WeightsMismatchError(f"{path} does not fit the model:\n  " + "\n  ".join(problems))

    with torch.no_grad():
        params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
        for key, value in state.items():
            params[key].copy_(value.to(dtype=params[key].dtype))
    return sorted(set(expected) - set(state))


def minimind_state_dict(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The model's weights under MiniMind-V's names, without the vision encoder, cast to `dtype`."""
    return {k: v.detach().to("cpu", dtype=dtype).clone() for k, v in _expected_state(model).items()}


def save_minimind_weights(model: nn.Module, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a `.pth` that MiniMind-V's own code loads (fp16 by default, like its released files)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(minimind_state_dict(model, dtype), tmp)
    tmp.replace(path)
    return path

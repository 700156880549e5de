"""The vision encoder: a CLIP vision tower loaded from a local folder with `transformers`.

Image features are taken exactly as MiniMind-V takes them: the tower's `last_hidden_state` (before the
post-layernorm, which CLIP applies only to the pooled CLS output)
with the CLS token dropped, i.e. (N, num_patches, vision_hidden) — 196 x 768 for CLIP ViT-B/16 at 224 px.

`write_tiny_vision_encoder` builds the offline default: a small, randomly initialised CLIP vision tower
(64-pixel pictures, patch 8 = 64 image tokens) saved like any Hugging Face folder, so runs without a
download still go through the real loading code. It has learned nothing; the demo trains it from scratch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from vlm.formats.constants import CLIP_MEAN, CLIP_STD

TINY_VISION = dict(
    image_size=64,
    patch_size=8,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
)


class VisionEncoderError(RuntimeError):
    """A configured vision encoder folder is missing or does not load."""


def tiny_vision_config(**overrides) -> CLIPVisionConfig:
    """The built-in tiny CLIP vision geometry (random init, for offline runs and tests)."""
    return CLIPVisionConfig(**{**TINY_VISION, **overrides})


def write_tiny_vision_encoder(folder: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny CLIP vision tower + its preprocessor config to `folder`."""
    config = tiny_vision_config(**overrides)
    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(seed)
        encoder = CLIPVisionModel(config)
    size = config.image_size
    processor = CLIPImageProcessorPil(  # the PIL flavour of CLIPImageProcessor: same file, no torchvision
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return save_vision_encoder(encoder, folder, processor)


def save_vision_encoder(encoder: CLIPVisionModel, folder: str | Path, processor=None) -> Path:
    """Write a loadable CLIP vision folder on any rank (`save_pretrained` writes on rank 0 only)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder.config.save_pretrained(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


def _read_model_type(folder: Path) -> str:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise VisionEncoderError(
            f"vision encoder folder {folder} has no config.json; point model.vision_model at a CLIP "
            "folder saved with save_pretrained (e.g. a copy of openai/clip-vit-base-patch16)"
        )
    try:
        return json.loads(config_file.read_text()).get("model_type", "")
    except (OSError, json.JSONDecodeError) as err:
        raise VisionEncoderError(f"cannot read {config_file}: {err}") from err


def read_vision_config(path: str | Path) -> CLIPVisionConfig:
    """The vision tower's config of a CLIP folder (full `CLIPModel` or `CLIPVisionModel`), without its weights.

    Raises VisionEncoderError naming the folder.
    """
    folder = Path(path).expanduser()
    model_type = _checked_model_type(folder)
    try:
        if model_type == "clip":
            return CLIPConfig.from_pretrained(folder).vision_config
        return CLIPVisionConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise VisionEncoderError(f"cannot read the vision config in {folder}: {err}") from err


def _checked_model_type(folder: Path) -> str:
    if not folder.is_dir():
        raise VisionEncoderError(
            f"vision encoder folder {folder} does not exist; download CLIP ViT-B/16 there "
            "(see README) or set model.vision_model"
        )
    model_type = _read_model_type(folder)
    if model_type not in ("clip", "clip_vision_model"):
        raise VisionEncoderError(
            f"{folder} holds a {model_type!r} model; a CLIP vision model ('clip' or 'clip_vision_model') is needed"
        )
    return model_type


def load_vision_encoder(path: str | Path) -> CLIPVisionModel:
    """Load the vision tower of a CLIP folder (`CLIPVisionModel` or a full `CLIPModel`), frozen, in eval mode.

    Every vision weight must be present in the folder: a checkpoint that leaves part of the tower randomly
    initialised is an error, not a warning.
    """
    folder = Path(path).expanduser()
    model_type = _checked_model_type(folder)
    try:
        if model_type == "clip":  # a full CLIPModel folder: keep its vision tower, drop the text side
            full, info = CLIPModel.from_pretrained(folder, output_loading_info=True)
            encoder = full.vision_model
        else:
            encoder, info = CLIPVisionModel.from_pretrained(folder, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise VisionEncoderError(f"cannot load the vision encoder from {folder}: {err}") from err
    missing = [k for k in info["missing_keys"] if "text_model" not in k and not k.endswith("position_ids")]
    if missing or info.get("mismatched_keys"):
        raise VisionEncoderError(
            f"vision encoder weights in {folder} are incomplete: missing {missing[:8]}, "
            f"mismatched {list(info.get('mismatched_keys') or [])[:8]}"
        )
    return freeze_vision_encoder(encoder)


def freeze_vision_encoder(encoder: nn.Module) -> nn.Module:
    """No gradients, eval mode (no dropout): the frozen tower's state. Returns `encoder`."""
    encoder.requires_grad_(False)
    return encoder.eval()


def num_image_tokens(config: CLIPVisionConfig) -> int:
    """Patches per image = image tokens per placeholder run (CLS excluded)."""
    return (config.image_size // config.patch_size) ** 2


def encode_images(encoder: CLIPVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, num_patches, vision_hidden): last hidden state without the CLS token."""
    pixel_values = pixel_values.to(dtype=encoder.dtype)
    hidden = encoder(pixel_values=pixel_values).last_hidden_state  # (N, 1 + P, Dv), before post_layernorm
    return hidden[:, 1:, :]

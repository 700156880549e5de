"""The vision encoder: a CLIP or SigLIP vision tower loaded from a local folder with `transformers`.

Supported folders (their config.json's `model_type`): a whole CLIP or SigLIP model (`clip`, `siglip`: the
vision side is kept) or its vision tower alone (`clip_vision_model`, `siglip_vision_model`). SigLIP2's
fixed-resolution checkpoints (e.g. siglip2-base-patch32-256, MiniMind-V 3v's tower) are SigLIP
folders; its variable-resolution "naflex" ones (`siglip2`) are not supported. Any other fixed-resolution vision
tower transformers' Auto classes load (its config, or its `vision_config`, has `image_size` and
`patch_size`; its output `last_hidden_state`) works too: how many tokens come before its patches (a CLS,
registers) is counted once at load by running it on a blank picture. Its pictures must be of the config's
`image_size` (a tower whose processor crops to another size, e.g. DINOv2's, is not supported).

Image features are taken as MiniMind-V takes them: by default the tower's `last_hidden_state` (CLIP: before
its post-layernorm, which CLIP applies only to the pooled output; SigLIP: after it) without the tokens that
come before the patches (CLIP's CLS; SigLIP has none), i.e. (N, num_patches, vision_hidden): 196 x 768 for
CLIP ViT-B/16 at 224 px, 64 x 768 for SigLIP2 base patch 32 at 256 px. `feature_layer` picks another layer
(LLaVA takes the second to last), `drop_leading` = 0 keeps CLIP's CLS as an image token.

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
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    SiglipModel,
    SiglipVisionModel,
)

from vlm.formats.constants import CLIP_MEAN, CLIP_STD

TINY_VISION = dict(
    image_size=64,
    patch_size=8,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
)


# model_type of a folder's config.json -> (tower family, the transformers class that loads the folder)
TOWERS = {
    "clip": ("clip", CLIPModel),
    "clip_vision_model": ("clip", CLIPVisionModel),
    "siglip": ("siglip", SiglipModel),
    "siglip_vision_model": ("siglip", SiglipVisionModel),
}
# Tokens before the patches in a family's last_hidden_state: CLIP's CLS; SigLIP has none.
LEADING_TOKENS = {"clip": 1, "siglip": 0}


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
            f"vision encoder folder {folder} has no config.json; point model.vision_model at a CLIP or SigLIP "
            "folder saved with save_pretrained (e.g. a copy of openai/clip-vit-base-patch16 or "
            "google/siglip2-base-patch32-256)"
        )
    try:
        return json.loads(config_file.read_text()).get("model_type", "")
    except (OSError, json.JSONDecodeError) as err:
        raise VisionEncoderError(f"cannot read {config_file}: {err}") from err


def read_vision_config(path: str | Path) -> PretrainedConfig:
    """The vision tower's config of a supported folder (see the module docstring), without its weights.

    Raises VisionEncoderError naming the folder.
    """
    folder = Path(path).expanduser()
    _checked_model_type(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise VisionEncoderError(f"cannot read the vision config in {folder}: {err}") from err
    return getattr(config, "vision_config", None) or config


def _checked_model_type(folder: Path) -> str:
    if not folder.is_dir():
        raise VisionEncoderError(
            f"vision encoder folder {folder} does not exist; download CLIP ViT-B/16 there "
            "(see README) or set model.vision_model"
        )
    model_type = _read_model_type(folder)
    if model_type in TOWERS:
        return model_type
    try:
        config = AutoConfig.from_pretrained(folder) if model_type != "siglip2" else None
    except (OSError, ValueError) as err:
        raise VisionEncoderError(f"{folder} holds a {model_type!r} model that transformers cannot read: {err}") from err
    vision = getattr(config, "vision_config", None) or config
    if vision is None or not all(isinstance(getattr(vision, k, None), int) for k in ("image_size", "patch_size")):
        raise VisionEncoderError(
            f"{folder} holds a {model_type!r} model, not a fixed-resolution vision tower (its config has no image_size "
            f"and patch_size); use a vision tower: {sorted(TOWERS)} or another transformers one (SigLIP2's "
            "fixed-resolution checkpoints are 'siglip'; its naflex 'siglip2' ones are not supported)"
        )
    return model_type


def load_vision_encoder(path: str | Path) -> nn.Module:
    """Load the vision tower of a supported folder (see the module docstring), frozen, in eval mode.

    Every vision weight must be present in the folder: a checkpoint that leaves part of the tower randomly
    initialised is an error, not a warning. Raises VisionEncoderError naming the folder.
    """
    folder = Path(path).expanduser()
    model_type = _checked_model_type(folder)
    _, model_class = TOWERS.get(model_type, (None, AutoModel))
    try:
        encoder, info = model_class.from_pretrained(folder, output_loading_info=True)
        if model_type in ("clip", "siglip") or (
                model_class is AutoModel and hasattr(encoder, "vision_model") and hasattr(encoder.config, "vision_config")):
            encoder = encoder.vision_model  # a whole model's folder: keep its vision tower, drop the text side
    except Exception as err:  # a damaged weights file raises anything (SafetensorError, ...)
        files = ", ".join(sorted(p.name for p in folder.glob("*.safetensors")) + sorted(p.name for p in folder.glob("*.bin")))
        raise VisionEncoderError(f"cannot load the vision tower from {folder} ({files or 'no weights file'}): "
                                 f"{type(err).__name__}: {err}; is the download complete?") from err
    missing = [k for k in info["missing_keys"] if "text_model" not in k and not k.endswith("position_ids")]
    if missing or info.get("mismatched_keys"):
        raise VisionEncoderError(
            f"vision encoder weights in {folder} are incomplete: missing {missing[:8]}, "
            f"mismatched {list(info.get('mismatched_keys') or [])[:8]}"
        )
    if _family(encoder.config) not in LEADING_TOKENS:
        _count_leading_tokens(encoder, folder)
    return freeze_vision_encoder(encoder)


def _family(config: PretrainedConfig) -> str:
    return TOWERS.get(config.model_type, (config.model_type.removesuffix("_vision_model"),))[0]


def _count_leading_tokens(encoder: nn.Module, folder: Path) -> None:
    """Run a tower of another family once on a blank picture: its output tokens less its patches are the tokens
    before the patches; recorded on its config (`vlm_leading_tokens`). VisionEncoderError when it does not fit."""
    config = encoder.config
    patches = (config.image_size // config.patch_size) ** 2
    channels = getattr(config, "num_channels", 3)
    try:
        with torch.no_grad():
            out = encoder(pixel_values=torch.zeros(1, channels, config.image_size, config.image_size))
        tokens = out.last_hidden_state.shape[1]
    except Exception as err:  # any failure here means the tower does not work the way this loader needs
        raise VisionEncoderError(f"the vision tower in {folder} does not give last_hidden_state for a picture: "
                                 f"{type(err).__name__}: {err}") from err
    if channels != 3 or tokens < patches:
        raise VisionEncoderError(f"the vision tower in {folder} gives {tokens} tokens for {patches} patches of a "
                                 f"{channels}-channel picture; an RGB tower with one token per patch is needed")
    config.vlm_leading_tokens = tokens - patches


def freeze_vision_encoder(encoder: nn.Module) -> nn.Module:
    """No gradients, eval mode (no dropout): the frozen tower's state. Returns `encoder`."""
    encoder.requires_grad_(False)
    return encoder.eval()


def build_vision_encoder(config: PretrainedConfig) -> nn.Module:
    """A randomly initialised tower of a vision config (`read_vision_config`'s), e.g. on the meta device."""
    if config.model_type in TOWERS:
        return TOWERS[config.model_type][1](config)
    return AutoModel.from_config(config)


def leading_tokens(config: PretrainedConfig) -> int:
    """How many tokens come before the patches in the tower's output (CLIP: 1, its CLS; SigLIP: 0; another
    family: as counted by `load_vision_encoder`). VisionEncoderError for a tower of another family not loaded so."""
    family = _family(config)
    if family in LEADING_TOKENS:
        return LEADING_TOKENS[family]
    counted = getattr(config, "vlm_leading_tokens", None)
    if counted is None:
        raise VisionEncoderError(f"the tokens before the patches of a {config.model_type!r} tower are counted when "
                                 "it is loaded (load_vision_encoder); this one was not")
    return counted


def num_image_tokens(config: PretrainedConfig, drop_leading: int | None = None) -> int:
    """Image tokens per placeholder run: the tower's output tokens less the `drop_leading` first ones (default:
    all of `leading_tokens`, i.e. the patches only)."""
    lead = leading_tokens(config)
    drop = lead if drop_leading is None else drop_leading
    if not 0 <= drop <= lead:
        raise VisionEncoderError(f"a {config.model_type} tower has {lead} token(s) before its patches; cannot drop {drop}")
    return (config.image_size // config.patch_size) ** 2 + lead - drop


def encode_images(encoder: nn.Module, pixel_values: torch.Tensor, feature_layer: int = -1,
                  drop_leading: int | None = None) -> torch.Tensor:
    """(N, 3, H, W) -> (N, image tokens, vision_hidden): the tower's features for a placeholder run.

    `feature_layer` -1 takes `last_hidden_state` (see the module docstring); any other value indexes
    `hidden_states` (0 = the embeddings, i = after layer i, -2 = the second to last layer's output).
    `drop_leading` first tokens are dropped (default: all before the patches, `leading_tokens`).
    """
    drop = leading_tokens(encoder.config) if drop_leading is None else drop_leading
    pixel_values = pixel_values.to(dtype=next(encoder.parameters()).dtype)
    if feature_layer == -1:
        hidden = encoder(pixel_values=pixel_values).last_hidden_state  # (N, lead + P, Dv)
    else:
        hidden = encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[feature_layer]
    return hidden[:, drop:, :]

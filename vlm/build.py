"""Build the model, tokenizer and image preprocessing from a `Config` (shared by train, eval, chat, export).

Starting weights (`model.init_weights`): a MiniMind(-V) `.pth` (language model, plus the projector when
present; list absent prefixes in `model.init_allow_missing`) or a folder exported by `vlm.export --format hf`
(or a previous stage's `out_dir/export`), whose own vision tower then replaces `model.vision_model`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vlm.config import BUILTIN_TINY_VISION, Config, ConfigError, DataConfig
from vlm.data.image import ImagePreprocessConfig
from vlm.data.stages import SampleFormat
from vlm.model.config import VLMConfig
from vlm.model.pretrained import VISION_SUBFOLDER, load_vlm_folder
from vlm.model.projector import shuffled_tokens
from vlm.model.vision_encoder import load_vision_encoder, num_image_tokens, write_tiny_vision_encoder
from vlm.model.vlm import MiniMindVLM
from vlm.model.weights import load_minimind_weights, load_state_strict
from vlm.tokenizer import image_placeholder_id, load_tokenizer


@dataclass
class Built:
    """A model with what feeds it: tokenizer, the vision tower's image preprocessing, its folder, the
    placeholder token id."""

    model: MiniMindVLM
    tokenizer: object
    image_config: ImagePreprocessConfig
    vision_folder: Path
    image_token_id: int

    def sample_format(self, data: DataConfig) -> SampleFormat:
        """How the data pipeline must turn samples into tensors for this model (data.max_seq_len, ...)."""
        return SampleFormat(self.tokenizer, self.image_config, self.image_token_id,
                            self.model.config.image_token_len, data.max_seq_len, data.batching, data.max_pixels)


def tiny_vision_folder(out_dir: str | Path, seed: int) -> Path:
    """The built-in tiny encoder's folder in out_dir, written once (atomically: ranks may race to write it)."""
    target = Path(out_dir) / "vision_model_init"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".vision_tmp"))
        write_tiny_vision_encoder(tmp, seed=seed)
        try:
            os.rename(tmp, target)
        except OSError:  # another rank got there first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def configured_vision_folder(cfg: Config) -> Path | None:
    """Where the vision tower comes from: the initial weights' own vision_model/ (an earlier stage's export),
    else model.vision_model; None for the built-in tiny one (written at start-up). Reads nothing."""
    init = cfg.model.init_weights
    if init is not None and (Path(init) / VISION_SUBFOLDER).is_dir():
        return Path(init) / VISION_SUBFOLDER
    return None if cfg.model.vision_model == BUILTIN_TINY_VISION else Path(cfg.model.vision_model)


def resolve_vision_folder(cfg: Config) -> Path:
    """`configured_vision_folder`, with the built-in tiny encoder written to out_dir when that is the choice."""
    folder = configured_vision_folder(cfg)
    return tiny_vision_folder(cfg.train.out_dir, cfg.train.seed) if folder is None else folder


def model_config(cfg: Config, tokenizer, image_token_id: int, vision_config) -> VLMConfig:
    """The model's config: the YAML's architecture fields as they are, plus what the tokenizer and the
    vision tower decide (vocabulary, placeholder id, image tokens per picture, special token ids). Raises
    ConfigError when the vision settings do not fit the tower (a feature layer it does not have, a pixel
    shuffle its patch grid does not divide)."""
    drop = None if cfg.model.vision_cls == "drop" else 0  # None: every token before the patches
    layers, layer = getattr(vision_config, "num_hidden_layers", None), cfg.model.vision_feature_layer
    problems = [] if layers is None or -(layers + 1) <= layer <= layers else [
        f"model.vision_feature_layer {layer} is not a layer of the vision tower ({layers} layers: -{layers + 1}..{layers})"]
    try:
        image_tokens = shuffled_tokens(num_image_tokens(vision_config, drop), cfg.model.pixel_shuffle)
    except ValueError as err:
        problems.append(f"model.pixel_shuffle: {err}")
    if problems:
        raise ConfigError(problems)
    return VLMConfig(
        **cfg.model.architecture(),
        vocab_size=cfg.model.vocab_size or len(tokenizer),
        image_token_id=image_token_id,
        image_token_len=image_tokens,
        projector=cfg.model.projector,
        pixel_shuffle=cfg.model.pixel_shuffle,
        vision_hidden_size=vision_config.hidden_size,
        vision_feature_layer=cfg.model.vision_feature_layer,
        vision_drop_leading=drop,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )


def build(cfg: Config) -> Built:
    """Tokenizer -> vision encoder -> model (random init) -> starting weights, each failure naming its path."""
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    image_token_id = image_placeholder_id(tokenizer, cfg.model.image_placeholder)
    vision_folder = resolve_vision_folder(cfg)
    encoder = load_vision_encoder(vision_folder)
    config = model_config(cfg, tokenizer, image_token_id, encoder.config)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"model.vocab_size {config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    model = MiniMindVLM(config, encoder, trainable_vision=cfg.model.vision_trainable)
    init = cfg.model.init_weights
    if init is not None and Path(init).is_dir():
        source, _ = load_vlm_folder(init)  # its vision tower is already ours, via resolve_vision_folder
        load_state_strict(model, source.state_dict(), init)
    elif init is not None:
        load_minimind_weights(model, init, allow_missing=cfg.model.init_allow_missing)
    if cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable()
    image_config = ImagePreprocessConfig.from_folder(vision_folder)
    size = getattr(encoder.config, "image_size", None)
    if image_config.output_shape is not None and size is not None and image_config.output_shape[1:] != (size, size):
        raise ConfigError([f"the preprocessor config in {vision_folder} makes {image_config.output_shape[1]} x "
                           f"{image_config.output_shape[2]} pictures but the vision tower takes {size} x {size}"])
    return Built(model, tokenizer, image_config, vision_folder, image_token_id)

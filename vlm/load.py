"""Every kind of trained model, loaded as data: the one place that reads checkpoints for export and inference.

    from vlm.load import load_any
    model, tokenizer, image_config, kind = load_any("out/sft")              # a training out_dir (newest)
    model, tokenizer, image_config, kind = load_any("out/sft/export")       # an exported Hugging Face folder
    model, tokenizer, image_config, kind = load_any("out/sft_vlm_512.pth", tokenizer="model/tokenizer",
                                                    vision_model="model/vision_model", dim=512, n_layers=8)

Kinds (`checkpoint_kind`): `hf` (config.json + model.safetensors + vision_model/, written by `vlm.export
--format hf` or at the end of training), `training` (an out_dir with checkpoints/, or one checkpoint folder:
rebuilt from the resolved config in its meta.json, weights loaded strictly) and `minimind` (a MiniMind-V
.pth: language model + projector, built from the size flags). ZeRO-1/2 checkpoints are read with
`weights_only=True`; ZeRO-3 partitions are consolidated by DeepSpeed's own utility (through
`vlm.train.distributed`), which unpickles DeepSpeed's files: load only checkpoints you wrote.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from vlm.build import Built, build
from vlm.config import Config, ConfigError, ModelConfig, config_from_dict, config_problems, load_config
from vlm.data.image import ImagePreprocessConfig
from vlm.model.pretrained import VISION_SUBFOLDER, WEIGHTS, load_vlm_folder
from vlm.model.vlm import MiniMindVLM
from vlm.model.weights import load_state_strict
from vlm.tokenizer import load_tokenizer
from vlm.train.checkpoint import CheckpointError, read_meta, resolve_resume


class CheckpointKindError(ValueError):
    """A --checkpoint that is none of the supported kinds, or lacks the flags its kind needs."""


def checkpoint_kind(path: str | Path) -> str:
    """'hf' (exported folder), 'training' (out_dir or one checkpoint folder) or 'minimind' (.pth file)."""
    path = Path(path)
    if path.is_file():
        return "minimind"
    if (path / "config.json").is_file() and (path / WEIGHTS).is_file():
        return "hf"
    if (path / "checkpoints").is_dir() or (path / "meta.json").is_file():
        return "training"
    raise CheckpointKindError(
        f"--checkpoint {path} is neither an exported folder (config.json + {WEIGHTS}), a training out_dir "
        "(with checkpoints/), a checkpoint folder, nor a MiniMind-V .pth file"
    )


def find_checkpoint(path: str, tag: str | None) -> Path:
    """The checkpoint folder: `tag` under path/checkpoints (or path itself), else the newest complete one.

    Raises CheckpointError when there is none.
    """
    if tag is not None:
        candidate = Path(path) / "checkpoints" / tag
        return candidate if candidate.is_dir() else Path(path) / tag
    found = resolve_resume(path, path)
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {path}")
    return found


def checkpoint_state_dict(checkpoint: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full model weights (MiniMind-V names, vision encoder included when it was trained)."""
    if zero_stage == 3:
        from vlm.train.distributed import consolidated_zero3_state_dict

        return consolidated_zero3_state_dict(checkpoint)
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return dict(states["module"])


def load_trained_model(checkpoint: Path) -> tuple[Built, dict]:
    """(built, meta): the model of a checkpoint rebuilt from its resolved config, weights loaded strictly."""
    meta = read_meta(checkpoint)
    cfg = config_from_dict(meta["config"])
    cfg.model.init_weights = None  # the checkpoint's own weights replace any starting weights
    built = build(cfg)
    state = checkpoint_state_dict(checkpoint, meta["zero_stage"])
    encoder_state = {k[len("vision_encoder."):]: v for k, v in state.items() if k.startswith("vision_encoder.")}
    if encoder_state:
        built.model.get_vision_encoder().load_state_dict(encoder_state, strict=True)
    load_state_strict(built.model, state, str(checkpoint))
    return built, meta


def load_any(checkpoint: str | Path, tokenizer: str | None = None, vision_model: str | None = None,
             dim: int | None = None, n_layers: int | None = None, use_moe: bool | None = None,
             image_placeholder: str | None = None, config: str | Path | None = None
             ) -> tuple[MiniMindVLM, Any, ImagePreprocessConfig, str]:
    """(model, tokenizer, image preprocessing, kind) of any checkpoint kind (see `checkpoint_kind`).

    The .pth kind is described by `config` (a training YAML: its model section, e.g.
    launch/configs/minimind3v_sft.yaml) or by `vision_model` and the sizes it was trained with; the other
    arguments override the YAML's. Raises CheckpointKindError, CheckpointError, ConfigError,
    FileNotFoundError or ValueError naming what to change.
    """
    kind = checkpoint_kind(checkpoint)
    if kind == "hf":
        model, tok = load_vlm_folder(checkpoint)
        if tokenizer is not None or tok is None:
            tok = load_tokenizer(tokenizer)
        image_config = ImagePreprocessConfig.from_folder(Path(checkpoint) / VISION_SUBFOLDER)
    elif kind == "training":
        built, _ = load_trained_model(find_checkpoint(str(checkpoint), None))
        model, tok, image_config = built.model, built.tokenizer, built.image_config
    else:
        built = load_minimind_pth(checkpoint, tokenizer, vision_model, dim, n_layers, use_moe, image_placeholder,
                                  config)
        model, tok, image_config = built.model, built.tokenizer, built.image_config
    if model.get_vision_encoder() is None:
        raise CheckpointKindError(f"{checkpoint} has no vision encoder; give --vision_model")
    return model, tok, image_config, kind


def load_minimind_pth(pth: str | Path, tokenizer: str | None, vision_model: str | None, dim: int | None,
                      n_layers: int | None, use_moe: bool | None, image_placeholder: str | None,
                      config: str | Path | None = None) -> Built:
    """A MiniMind-V .pth: build the model from `config`'s model section (or the defaults) with the given
    overrides, then load the weights strictly. The image placeholder is found from the tokenizer unless given."""
    if vision_model is None and config is None:
        raise CheckpointKindError(f"{pth} is a MiniMind-V .pth: give --config (the training YAML its model was "
                                  "built with, e.g. launch/configs/minimind3v_sft.yaml), or --vision_model (a CLIP "
                                  "or SigLIP folder) and the model size flags --dim --n_layers [--use_moe]")
    model = load_config(config).model if config is not None else ModelConfig()
    overrides = {"hidden_size": dim, "num_hidden_layers": n_layers, "use_moe": use_moe, "tokenizer": tokenizer,
                 "vision_model": None if vision_model is None else str(vision_model),
                 "image_placeholder": image_placeholder}
    model = dataclasses.replace(model, **{k: v for k, v in overrides.items() if v is not None},
                                init_weights=str(pth), init_allow_missing=[])
    cfg = Config(model=model)
    # Only the model section matters here: no training data is involved.
    problems = [p for p in config_problems(cfg) if not p.startswith("data.")]
    if problems:
        raise ConfigError(problems)
    return build(cfg)

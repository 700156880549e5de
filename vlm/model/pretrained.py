"""A self-contained model folder (the Hugging Face export, also usable as starting weights).

    FOLDER/config.json            VLMConfig (model_type "minimind-v")
    FOLDER/model.safetensors      language model + projector under MiniMind-V's names (no vision encoder)
    FOLDER/vision_model/          the vision tower as trained or used (config, weights, preprocessor config)
    FOLDER/tokenizer*.json        the tokenizer, with its chat template

`MiniMindVLM.from_pretrained(FOLDER)` loads it, vision tower included; `load_vlm_folder` does the same
strictly (every key checked) and returns the tokenizer too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlm.model.config import VLMConfig
from vlm.model.remote_code import add_transformers_files
from vlm.model.vision_encoder import load_vision_encoder, save_vision_encoder
from vlm.model.vlm import MiniMindVLM
from vlm.model.weights import WeightsMismatchError, load_state_strict, minimind_state_dict

WEIGHTS = "model.safetensors"
VISION_SUBFOLDER = "vision_model"


def save_vlm_folder(
    model: MiniMindVLM, folder: str | Path, tokenizer=None, vision_source: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the folder, loadable by this project and by plain transformers (`add_transformers_files`).
    `vision_source`: the vision folder the encoder came from (for its preprocessor config)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict() | {"vision_model_path": VISION_SUBFOLDER}
    VLMConfig.from_dict(config).save_pretrained(folder)
    save_file(minimind_state_dict(model, dtype), folder / WEIGHTS, metadata={"format": "pt"})
    encoder = model.get_vision_encoder()
    if encoder is not None and vision_source is not None and not model.vision_trainable:
        # A frozen tower is written as it was loaded, not in the precision the run cast it to (a bf16 run
        # computes it in bf16; its weights on disk stay the source's).
        encoder = load_vision_encoder(vision_source)
    if encoder is not None:
        save_vision_encoder(encoder, folder / VISION_SUBFOLDER)
        if vision_source is not None and (Path(vision_source) / "preprocessor_config.json").is_file():
            shutil.copy(Path(vision_source) / "preprocessor_config.json", folder / VISION_SUBFOLDER)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return add_transformers_files(folder, model, tokenizer)


def load_vlm_folder(folder: str | Path, trainable_vision: bool = False, device: str | torch.device = "cpu"):
    """(model, tokenizer or None) from a folder written by `save_vlm_folder`, strictly."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} is not an exported model folder (needs config.json and {WEIGHTS})")
    config = VLMConfig.from_pretrained(folder)
    encoder = load_vision_encoder(folder / VISION_SUBFOLDER) if (folder / VISION_SUBFOLDER).is_dir() else None
    model = MiniMindVLM(config, encoder, trainable_vision=trainable_vision)
    try:
        state = load_file(folder / WEIGHTS)
    except Exception as err:  # SafetensorError for a truncated or foreign file, OSError, ...
        raise WeightsMismatchError(f"{folder / WEIGHTS} cannot be read ({type(err).__name__}: {err}); "
                                   "is the file complete?") from err
    load_state_strict(model, state, str(folder / WEIGHTS))
    tokenizer = None
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from vlm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(folder)
    return model.to(device), tokenizer

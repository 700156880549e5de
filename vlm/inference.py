"""A trained model ready to answer: load any checkpoint kind, turn chats and pictures into generated text.

    from vlm.inference import load_model, GenerationSettings
    vlm = load_model("out/demo/sft/export")              # exported Hugging Face folder (vlm.export --format hf)
    vlm = load_model("out/demo/sft")                     # training out_dir (newest complete checkpoint)
    vlm = load_model("out/sft_vlm_512.pth", tokenizer="model/tokenizer", vision_model="model/vision_model",
                     dim=512, n_layers=8)                # MiniMind-V weights (language model + projector)
    text = vlm.generate([{"role": "user", "content": "<image>\\nDescribe the shapes."}], [jpeg_bytes])

Prompts go through the same `ChatEncoder` as training (`encode_prompt`), so the placeholder runs and the
chat template match what the model was trained on; pictures through the same `ImagePreprocessor`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, TextStreamer

from vlm.data.image import ImagePreprocessConfig, ImagePreprocessor
from vlm.data.text import IMAGE_TAG, ChatEncoder
from vlm.model.pretrained import VISION_SUBFOLDER, WEIGHTS, load_vlm_folder
from vlm.model.vlm import MiniMindVLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointKindError(ValueError):
    """A --checkpoint that is none of the supported kinds, or lacks the flags its kind needs."""


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding options; temperature 0 means greedy (the default)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def config(self, tokenizer: Any, model: MiniMindVLM) -> GenerationConfig:
        sampling = self.temperature > 0
        extra = {"temperature": self.temperature, "top_p": self.top_p} if sampling else {}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=sampling, repetition_penalty=self.repetition_penalty,
            eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id,
            bos_token_id=model.config.bos_token_id, **extra,
        )


class CallbackStreamer(TextStreamer):
    """transformers' TextStreamer, handing each finished piece of the reply to `callback` instead of print."""

    def __init__(self, tokenizer: Any, callback: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.callback(text)


class LoadedVLM:
    """A model in eval mode with its tokenizer, prompt encoder and picture preprocessing."""

    def __init__(self, model: MiniMindVLM, tokenizer: Any, image_config: ImagePreprocessConfig, source: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.source = source
        self.image_token_len = model.config.image_token_len
        self.encoder = ChatEncoder(tokenizer, model.config.image_token_id, self.image_token_len,
                                   max_seq_len=model.config.max_position_embeddings)
        self.preprocess = ImagePreprocessor(image_config)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def prompt_ids(self, conversations: Sequence[dict], num_images: int) -> torch.Tensor:
        """(L,) ids of the conversation plus the assistant header, placeholder runs included."""
        return self.encoder.encode_prompt(conversations, num_images)

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """Encoded bytes or PIL images -> (N, 3, H, W) float32, normalised: what the vision encoder takes."""
        return self.preprocess.normalizer(self.raw_pixels(images))

    def raw_pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """Encoded bytes or PIL images -> (N, 3, H, W) uint8, resized and cropped (the training loader's form)."""
        if not images:
            return torch.zeros((0, *self.preprocess.config.output_shape), dtype=torch.uint8)
        return torch.stack([self.preprocess.pixels(image) for image in images])

    @torch.inference_mode()
    def generate_ids(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     settings: GenerationSettings, streamer: Any = None) -> list[list[int]]:
        """input_ids (B, L) without padding, pixel_values (B, N, 3, H, W) or None -> new ids per row (eos cut)."""
        input_ids = input_ids.to(self.device)
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.device, self.model.lm_head.weight.dtype)
        out = self.model.generate(input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids),
                                  generation_config=settings.config(self.tokenizer, self.model), streamer=streamer)
        eos, rows = self.model.config.eos_token_id, []
        for row in out[:, input_ids.shape[1]:].tolist():
            rows.append(row[: row.index(eos)] if eos in row else row)
        return rows

    def generate(self, conversations: Sequence[dict], images: Sequence[Any] = (),
                 settings: GenerationSettings = GenerationSettings(),
                 on_text: Callable[[str], None] | None = None) -> str:
        """The reply to `conversations` (whose `<image>` tags match `images`); `on_text` receives it as it grows."""
        ids = self.prompt_ids(conversations, len(images))[None]  # (1, L)
        pixels = self.pixels(images)[None] if images else None  # (1, N, 3, H, W)
        streamer = CallbackStreamer(self.tokenizer, on_text) if on_text is not None else None
        (reply,) = self.generate_ids(ids, pixels, settings, streamer)
        return self.tokenizer.decode(reply, skip_special_tokens=True)


def add_image_tags(prompt: str, num_images: int) -> str:
    """Put one `<image>` per picture before the prompt, unless the prompt places its own (counts must match)."""
    tags = prompt.count(IMAGE_TAG)
    if tags == 0:
        return "\n".join([IMAGE_TAG] * num_images + [prompt]) if num_images else prompt
    if tags != num_images:
        raise ValueError(f"the prompt has {tags} {IMAGE_TAG} placeholder(s) but {num_images} --image file(s) "
                         f"were given; give one --image per {IMAGE_TAG}, or leave {IMAGE_TAG} out of the prompt")
    return prompt


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


def load_model(checkpoint: str | Path, tokenizer: str | None = None, vision_model: str | None = None,
               dim: int = 512, n_layers: int = 8, use_moe: bool = False, image_placeholder: str | None = None,
               device: str = "cpu", dtype: str = "float32") -> LoadedVLM:
    """Load any checkpoint kind (see `checkpoint_kind`); the .pth kind needs `vision_model` and the sizes."""
    kind = checkpoint_kind(checkpoint)
    if kind == "hf":
        model, tok = load_vlm_folder(checkpoint)
        vision = Path(checkpoint) / VISION_SUBFOLDER
        if tokenizer is not None or tok is None:
            from vlm.tokenizer import load_tokenizer

            tok = load_tokenizer(tokenizer)
        image_config = ImagePreprocessConfig.from_folder(vision)
    elif kind == "training":
        from vlm.export import find_checkpoint, load_trained_model

        built, _ = load_trained_model(find_checkpoint(str(checkpoint), None))
        model, tok, image_config = built.model, built.tokenizer, built.image_config
    else:
        model, tok, image_config = _load_minimind(checkpoint, tokenizer, vision_model, dim, n_layers, use_moe,
                                                  image_placeholder)
    if model.get_vision_encoder() is None:
        raise CheckpointKindError(f"{checkpoint} has no vision encoder; give --vision_model")
    model = model.to(device=torch.device(device), dtype=DTYPES[dtype])
    return LoadedVLM(model, tok, image_config, f"{kind}:{checkpoint}")


def _load_minimind(pth, tokenizer, vision_model, dim, n_layers, use_moe, image_placeholder):
    """A MiniMind-V .pth: build the model from the size flags, then load the weights strictly."""
    if vision_model is None:
        raise CheckpointKindError(f"{pth} is a MiniMind-V .pth: give --vision_model (a CLIP folder) and the model "
                                  "size flags --dim --n_layers [--use_moe] it was trained with")
    from vlm.build import build
    from vlm.config import Config, ConfigError, ModelConfig, config_problems
    from vlm.tokenizer import DEFAULT_PLACEHOLDER, MINIMIND_PLACEHOLDER, load_tokenizer

    if image_placeholder is None and tokenizer is not None:
        # MiniMind's own tokenizer has no <|image|> token; its placeholder is '@'.
        has_ours = DEFAULT_PLACEHOLDER in load_tokenizer(tokenizer).get_vocab()
        image_placeholder = None if has_ours else MINIMIND_PLACEHOLDER
    cfg = Config(model=ModelConfig(hidden_size=dim, num_hidden_layers=n_layers, use_moe=use_moe,
                                   tokenizer=tokenizer, vision_model=str(vision_model), init_weights=str(pth),
                                   image_placeholder=image_placeholder))
    # Only the model section matters here: no training data is involved.
    problems = [p for p in config_problems(cfg) if not p.startswith("data.")]
    if problems:
        raise ConfigError(problems)
    built = build(cfg)
    return built.model, built.tokenizer, built.image_config

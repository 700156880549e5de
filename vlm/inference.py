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

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TextStreamer

from vlm.config import DTYPES as DTYPE_NAMES
from vlm.data.image import ImagePreprocessConfig, ImagePreprocessor
from vlm.data.text import ChatEncoder
from vlm.formats.constants import DEFAULT_MAX_PIXELS, IMAGE_TAG
from vlm.load import load_any
from vlm.model.generation import GenerationSettings
from vlm.model.vlm import MiniMindVLM

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


class CallbackStreamer(TextStreamer):
    """transformers' TextStreamer, handing each finished piece of the reply to `callback` instead of print."""

    def __init__(self, tokenizer: Any, callback: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Hand a finished piece of text to the callback (empty pieces are dropped)."""
        if text:
            self.callback(text)


class LoadedVLM:
    """A model in eval mode with its tokenizer, prompt encoder and picture preprocessing."""

    def __init__(self, model: MiniMindVLM, tokenizer: Any, image_config: ImagePreprocessConfig, source: str,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.source = source
        self.image_token_len = model.config.image_token_len
        self.encoder = ChatEncoder(tokenizer, model.config.image_token_id, self.image_token_len,
                                   max_seq_len=model.config.max_position_embeddings)
        self.preprocess = ImagePreprocessor(image_config, max_pixels=max_pixels)

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on."""
        return self.model.lm_head.weight.device

    def prompt_ids(self, conversations: Sequence[dict], num_images: int) -> torch.Tensor:
        """(L,) ids of the conversation plus the assistant header, placeholder runs included."""
        return self.encoder.encode_prompt(conversations, num_images)

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """Encoded bytes or PIL images -> (N, 3, H, W) float32, normalised: what the vision encoder takes."""
        return self.preprocess.normalizer(self.raw_pixels(images))

    def raw_pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """Encoded bytes or PIL images -> (N, 3, H, W) uint8, resized (and cropped) as the tower wants (the training
        loader's form)."""
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
                 settings: GenerationSettings | None = None,
                 on_text: Callable[[str], None] | None = None) -> str:
        """The reply to `conversations` (whose `<image>` tags match `images`); `on_text` receives it as it grows.
        `settings` None: greedy, `GenerationSettings()`."""
        settings = settings or GenerationSettings()
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


def load_model(checkpoint: str | Path, tokenizer: str | None = None, vision_model: str | None = None,
               dim: int | None = None, n_layers: int | None = None, use_moe: bool | None = None,
               image_placeholder: str | None = None, device: str = "cpu", dtype: str = "float32",
               max_pixels: int = DEFAULT_MAX_PIXELS, config: str | Path | None = None) -> LoadedVLM:
    """Load any checkpoint kind (see `vlm.load.checkpoint_kind`) ready to answer, on `device` in `dtype`.

    The .pth kind needs `config` (its training YAML) or `vision_model` and the sizes (`vlm.load.load_any`);
    pictures above `max_pixels` are refused.
    """
    model, tok, image_config, kind = load_any(checkpoint, tokenizer, vision_model, dim, n_layers, use_moe,
                                              image_placeholder, config)
    model = model.to(device=torch.device(device), dtype=DTYPES[dtype])
    return LoadedVLM(model, tok, image_config, f"{kind}:{checkpoint}", max_pixels)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Flags for loading any checkpoint kind, plus device, dtype and the pixel limit (eval and chat)."""
    p.add_argument("--config", help=".pth only: the training YAML whose model section built it (e.g. "
                                    "launch/configs/minimind3v_sft.yaml): sizes, tower, tokenizer, projector")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's, the YAML's, or the built-in one)")
    p.add_argument("--vision_model", help="CLIP or SigLIP vision folder (a .pth needs it or --config)")
    p.add_argument("--dim", type=int, help=".pth only: hidden size the weights were trained with (default 512)")
    p.add_argument("--n_layers", type=int, help=".pth only: number of layers (default 8)")
    p.add_argument("--use_moe", choices=("true", "false"), help=".pth only: MoE layers (default false)")
    p.add_argument("--image_placeholder", help=".pth only: placeholder token (default: found from the tokenizer)")
    p.add_argument("--rope_yarn_factor", type=float, help="YaRN-scale RoPE by this factor for prompts beyond the "
                                                         "trained context (MiniMind-V 3v: 16; default: as trained)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse pictures with more pixels (default {DEFAULT_MAX_PIXELS}, as data.max_pixels)")
    p.add_argument("--debug", action="store_true", help="show an error's traceback instead of its one line")


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    """Sampling flags (chat and the chat page): --temperature, --top_p, --max_new_tokens, --repetition_penalty."""
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest reply in tokens")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")


def settings_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> GenerationSettings:
    """The GenerationSettings of `add_generation_flags`; out-of-range values exit through `p.error`."""
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1 or args.repetition_penalty <= 0:
        p.error("need --temperature >= 0, 0 < --top_p <= 1, --max_new_tokens >= 1, --repetition_penalty > 0")
    return GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)


def load_from_args(args: argparse.Namespace) -> LoadedVLM:
    """`load_model` with the flags of `add_model_flags`."""
    use_moe = None if args.use_moe is None else args.use_moe == "true"
    loaded = load_model(args.checkpoint, args.tokenizer, args.vision_model, args.dim, args.n_layers, use_moe,
                        args.image_placeholder, args.device, args.dtype, args.max_pixels, args.config)
    if args.rope_yarn_factor is not None:
        if args.rope_yarn_factor <= 1:
            raise ValueError(f"--rope_yarn_factor must be > 1, got {args.rope_yarn_factor}")
        loaded.model.model.rotary.set_yarn(args.rope_yarn_factor, loaded.model.config.rope_yarn_original)
    return loaded

r"""The exported VLM as transformers' Auto classes load it: `AutoModelForCausalLM`, vision tower included.

Shipped by `python -m vlm.export --format hf` next to flat copies of the project's own code (`vlm/model/vlm.py`
as `vlm_model_vlm.py`, ...; see `vlm.hf`), so that the exported folder needs neither this project nor a second
copy of the model's math:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # 5.x reads config.json
    inputs = model.build_inputs(tokenizer, "<image>\nDescribe the shapes.", [Image.open("a.png")])
    reply = model.generate(**inputs)[0, inputs["input_ids"].shape[1]:]   # greedy, generation_config.json

Loading needs torch and transformers 5 only (the project's model code is written for 5.x); `build_inputs` also
needs pillow and jinja2 (pictures, chat template).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import cached_file

from .vlm_model_config import VLMConfig
from .vlm_model_vision_encoder import load_vision_encoder
from .vlm_model_vlm import MiniMindVLM

VISION_FILES = ("config.json", "model.safetensors")
"""The vision tower's files in its subfolder (`config.vision_model_path`); its preprocessor config is optional."""
PREPROCESSOR_FILE = "preprocessor_config.json"
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")
"""from_pretrained's keyword arguments that also apply to fetching the vision tower's files."""


class MiniMindVLMForCausalLM(MiniMindVLM):
    """`MiniMindVLM` (MiniMind language model + projector + frozen vision tower) for `AutoModelForCausalLM`.

    `forward(input_ids (B, T), pixel_values (B, N, 3, H, W), attention_mask, ...)` and `generate(...,
    pixel_values=...)` are the project's own; `from_pretrained` also attaches the folder's vision tower and
    `build_inputs` makes `generate`'s inputs from a prompt and pictures exactly as `vlm.chat` does.
    """

    config_class = VLMConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """The model with the vision tower of `config.vision_model_path` (a local folder or a Hub repository),
        frozen, on the projector's device and in its dtype. Raises OSError when the tower's files are missing."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        subfolder = model.config.vision_model_path
        files = [cached_file(pretrained_model_name_or_path, f"{subfolder}/{name}", **hub) for name in VISION_FILES]
        model.vision_folder = Path(files[0]).parent
        try:
            cached_file(pretrained_model_name_or_path, f"{subfolder}/{PREPROCESSOR_FILE}", **hub)
        except OSError:
            pass  # build_inputs names the missing file if it is ever needed
        if model.get_vision_encoder() is None:
            model.set_vision_encoder(load_vision_encoder(model.vision_folder))
        model.get_vision_encoder().to(next(model.vision_proj.parameters()).device)
        model.match_vision_dtype()
        return model

    def build_inputs(self, tokenizer: Any, prompt: str | Sequence[dict], images: Sequence[Any] = ()) -> dict:
        """`generate`'s inputs, made as `vlm.chat` makes them: input_ids and attention_mask (1, L) long, and
        pixel_values (1, N, 3, H, W) in the model's dtype when `images` are given.

        `prompt`: the user's message with one `<image>` tag per picture where it goes (`vlm.chat` puts them
        before the text, one per line: "<image>\\nDescribe the shapes."), or a list of {"role", "content"}
        messages ending with the user's. `images`: PIL images or encoded bytes (JPEG, PNG, ...). The chat
        template is the tokenizer's, each tag becomes `image_token_len` placeholder ids, and pictures get the
        tower's preprocessing as in training (upright by EXIF, resized, cropped, normalised).
        """
        from .vlm_data_image import ImagePreprocessConfig, ImagePreprocessor
        from .vlm_data_text import ChatEncoder

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        encoder = ChatEncoder(tokenizer, self.config.image_token_id, self.config.image_token_len,
                              max_seq_len=self.config.max_position_embeddings)
        ids = encoder.encode_prompt(messages, len(images))[None].to(self.device)  # (1, L)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if images:
            preprocess = ImagePreprocessor(ImagePreprocessConfig.from_folder(self.vision_folder))
            pixels = torch.stack([preprocess(image) for image in images])[None]  # (1, N, 3, H, W)
            inputs["pixel_values"] = pixels.to(self.device, self.dtype)
        return inputs

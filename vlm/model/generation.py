"""Decoding options as users give them (chat, the chat page, eval, exports) -> transformers' GenerationConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding options; temperature 0 means greedy (the default)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def config(self, tokenizer: Any, model: Any) -> GenerationConfig:
        """transformers' GenerationConfig for these options and the special token ids of `model.config` (a
        MiniMindVLM's); `tokenizer` is accepted for callers that have one and is not read."""
        sampling = self.temperature > 0
        extra = {"temperature": self.temperature, "top_p": self.top_p} if sampling else {}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=sampling, repetition_penalty=self.repetition_penalty,
            eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id,
            bos_token_id=model.config.bos_token_id, **extra,
        )

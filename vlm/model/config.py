"""Model configuration: MiniMind's language-model names plus the vision fields of MiniMind-V.

The seed's flags map onto these names: `dim` -> `hidden_size`, `n_layers` -> `num_hidden_layers`,
`max_seq_len` -> the data pipeline's truncation length (not a model size), `use_moe` -> `use_moe`.
"""

from __future__ import annotations

import math

from transformers import AutoConfig, PretrainedConfig

from vlm.config import ARCHITECTURE_FIELDS, architecture_defaults, architecture_problems


def default_intermediate_size(hidden_size: int) -> int:
    """MiniMind's SwiGLU width: 8/3 of hidden, rounded up to a multiple of 64."""
    return 64 * math.ceil(hidden_size * 8 / 3 / 64)


class MiniMindConfig(PretrainedConfig):
    """The MiniMind language model (dense or MoE). Field names follow MiniMind's own config.

    The architecture fields of the training YAML (`vlm.config.ARCHITECTURE_FIELDS`: hidden_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads, use_moe, the MoE sizes, ...) are declared
    once, in `vlm.config.ModelConfig`, and taken from there with their defaults; the arguments below are the
    fields the YAML does not expose. Raises ValueError when the shapes do not fit together.
    """

    model_type = "minimind"

    def __init__(
        self,
        vocab_size: int = 6400,
        hidden_act: str = "silu",
        scoring_func: str = "softmax",
        norm_topk_prob: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        for name, default in architecture_defaults().items():
            setattr(self, name, kwargs.pop(name, default))
        self.use_moe = bool(self.use_moe)
        self.vocab_size = vocab_size
        self.intermediate_size = self.intermediate_size or default_intermediate_size(self.hidden_size)
        self.hidden_act = hidden_act
        self.scoring_func = scoring_func
        self.norm_topk_prob = norm_topk_prob
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_shapes()  # before head_dim is derived: a hidden size the heads do not divide is named
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    def validate_shapes(self) -> None:
        """Raise ValueError listing every shape problem (the rules of `vlm.config.architecture_problems`)."""
        problems = architecture_problems({name: getattr(self, name) for name in ARCHITECTURE_FIELDS})
        if self.scoring_func != "softmax":
            problems.append(f"scoring_func {self.scoring_func!r} is not supported (only 'softmax')")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))


class VLMConfig(MiniMindConfig):
    """MiniMind language model + vision encoder + projector.

    `image_token_id` is the placeholder token and `image_token_len` the length of its run per image: it must
    equal the vision encoder's patch count (196 for CLIP ViT-B/16 at 224 px), plus CLIP's CLS when it is
    kept. MiniMind's own tokenizer uses '@' (id 34) x 196; our tokenizer has a dedicated special token.
    `vision_feature_layer` and `vision_drop_leading` say which tower output becomes the image tokens
    (`vision_encoder.encode_images`: -1 = last_hidden_state; None = drop every token before the patches);
    `projector` and `pixel_shuffle` how they reach the language model (`vlm.model.projector`).
    """

    model_type = "minimind-v"

    def __init__(
        self,
        image_token_id: int = 34,
        image_token_len: int = 196,
        vision_hidden_size: int = 768,
        vision_model_path: str | None = None,
        vision_feature_layer: int = -1,
        vision_drop_leading: int | None = None,
        projector: str = "linear",
        pixel_shuffle: int = 1,
        **kwargs,
    ):
        self.projector = projector
        self.pixel_shuffle = pixel_shuffle
        self.vision_feature_layer = vision_feature_layer
        self.vision_drop_leading = vision_drop_leading
        self.image_token_id = image_token_id
        self.image_token_len = image_token_len
        self.vision_hidden_size = vision_hidden_size
        self.vision_model_path = vision_model_path
        super().__init__(**kwargs)


# Lets `AutoConfig` (and AutoTokenizer, which reads config.json) recognise exported folders.
AutoConfig.register(MiniMindConfig.model_type, MiniMindConfig)
AutoConfig.register(VLMConfig.model_type, VLMConfig)

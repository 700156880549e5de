"""Model configuration: MiniMind's language-model names plus the vision fields of MiniMind-V.

The seed's flags map onto these names: `dim` -> `hidden_size`, `n_layers` -> `num_hidden_layers`,
`max_seq_len` -> the data pipeline's truncation length (not a model size), `use_moe` -> `use_moe`.
"""

from __future__ import annotations

import math

from transformers import AutoConfig, PretrainedConfig

# Names of the seed's model flags and the config fields they set.
SEED_MODEL_ALIASES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "use_moe": "use_moe"}


def default_intermediate_size(hidden_size: int) -> int:
    """MiniMind's SwiGLU width: 8/3 of hidden, rounded up to a multiple of 64."""
    return 64 * math.ceil(hidden_size * 8 / 3 / 64)


class MiniMindConfig(PretrainedConfig):
    """The MiniMind language model (dense or MoE). Field names follow MiniMind's own config."""

    model_type = "minimind"

    def __init__(
        self,
        vocab_size: int = 6400,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 2,
        intermediate_size: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        rope_theta: float = 1e6,
        rms_norm_eps: float = 1e-5,
        dropout: float = 0.0,
        use_moe: bool = False,
        n_routed_experts: int = 4,
        num_experts_per_tok: int = 2,
        n_shared_experts: int = 1,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.1,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size or default_intermediate_size(hidden_size)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.dropout = dropout
        self.use_moe = bool(use_moe)
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.norm_topk_prob = norm_topk_prob
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_shapes()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_shapes(self) -> None:
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            problems.append(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..n_routed_experts {self.n_routed_experts}"
            )
        if self.scoring_func != "softmax":
            problems.append(f"scoring_func {self.scoring_func!r} is not supported (only 'softmax')")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))


class VLMConfig(MiniMindConfig):
    """MiniMind language model + vision encoder + projector.

    `image_token_id` is the placeholder token and `image_token_len` the length of its run per image: it must
    equal the vision encoder's patch count (196 for CLIP ViT-B/16 at 224 px). MiniMind's own tokenizer uses
    '@' (id 34) x 196; our tokenizer has a dedicated special token.
    """

    model_type = "minimind-v"

    def __init__(
        self,
        image_token_id: int = 34,
        image_token_len: int = 196,
        vision_hidden_size: int = 768,
        vision_model_path: str | None = None,
        **kwargs,
    ):
        self.image_token_id = image_token_id
        self.image_token_len = image_token_len
        self.vision_hidden_size = vision_hidden_size
        self.vision_model_path = vision_model_path
        super().__init__(**kwargs)


# Lets `AutoConfig` (and AutoTokenizer, which reads config.json) recognise exported folders.
AutoConfig.register(MiniMindConfig.model_type, MiniMindConfig)
AutoConfig.register(VLMConfig.model_type, VLMConfig)

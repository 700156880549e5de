"""The composite vision-language model: it only wires the parts together.

`MiniMindVLM` is the MiniMind language model (whose state-dict names it inherits) plus a projector
`vision_proj` and a vision encoder. Image features are written into the token embeddings at the image
placeholder positions with one boolean mask; the language model then runs on `inputs_embeds`.

A frozen vision encoder is deliberately *not* a registered submodule: it stays out of `state_dict()`,
out of the optimizer and out of ZeRO-3 partitioning, yet follows the model through `.to()`/dtype casts.
A trainable one (`trainable=True`, the from-scratch demo) is registered as `vision_encoder` like any part.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlm.model.config import VLMConfig
from vlm.model.language_model import MiniMindForCausalLM
from vlm.model.projector import VisionProjector, pixel_shuffle, shuffled_tokens
from vlm.model.vision_encoder import (
    encode_images,
    freeze_vision_encoder,
    load_vision_encoder,
    num_image_tokens,
)


class ImagePlaceholderError(ValueError):
    """The image placeholder runs in input_ids do not match the images given."""


class MiniMindVLM(MiniMindForCausalLM):
    """MiniMind language model + `vision_proj` projector + a vision encoder, configured by VLMConfig.

    The encoder is either frozen and unregistered or a trainable submodule (see the module docstring and
    `set_vision_encoder`); image features replace the placeholder tokens' embeddings in `forward`.
    """

    config_class = VLMConfig

    def __init__(self, config: VLMConfig, vision_encoder: nn.Module | None = None, trainable_vision: bool = False):
        super().__init__(config)
        self.vision_proj = VisionProjector(config.vision_hidden_size, config.hidden_size, config.projector,
                                           config.pixel_shuffle)
        self.__dict__["_frozen_vision_encoder"] = None
        if vision_encoder is not None:
            self.set_vision_encoder(vision_encoder, trainable=trainable_vision)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Also attaches the exported folder's `vision_model/` (see vlm.model.pretrained)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        vision = Path(pretrained_model_name_or_path) / "vision_model"
        if model.get_vision_encoder() is None and vision.is_dir():
            model.set_vision_encoder(load_vision_encoder(vision))
        return model

    def set_vision_encoder(self, encoder: nn.Module, trainable: bool = False) -> None:
        """Attach a vision encoder; check that its geometry matches the placeholder run and the projector."""
        vcfg = encoder.config
        problems = []
        tokens = shuffled_tokens(num_image_tokens(vcfg, self.config.vision_drop_leading), self.config.pixel_shuffle)
        if tokens != self.config.image_token_len:
            problems.append(
                f"the vision encoder gives {tokens} tokens per image "
                f"({vcfg.image_size}px / patch {vcfg.patch_size}) but image_token_len is {self.config.image_token_len}"
            )
        if vcfg.hidden_size != self.config.vision_hidden_size:
            problems.append(
                f"the vision encoder's hidden size is {vcfg.hidden_size} but vision_hidden_size is "
                f"{self.config.vision_hidden_size}"
            )
        if problems:
            raise ValueError("vision encoder does not fit the model config: " + "; ".join(problems))
        self._modules.pop("vision_encoder", None)
        if trainable:
            encoder.requires_grad_(True)
            self.vision_encoder = encoder.train(self.training)
            self.__dict__["_frozen_vision_encoder"] = None
        else:
            self.__dict__["_frozen_vision_encoder"] = freeze_vision_encoder(encoder)

    def get_vision_encoder(self) -> nn.Module | None:
        """The attached vision encoder (trainable submodule or frozen one), or None when none is attached."""
        return self._modules.get("vision_encoder") or self.__dict__["_frozen_vision_encoder"]

    @property
    def vision_trainable(self) -> bool:
        """True when the vision encoder is a trainable submodule (attached with trainable=True)."""
        return "vision_encoder" in self._modules

    def _apply(self, fn, recurse=True):
        # Devices and dtypes reach the unregistered frozen encoder too.
        super()._apply(fn, recurse)
        frozen = self.__dict__.get("_frozen_vision_encoder")
        if frozen is not None:
            frozen._apply(fn, recurse)
        return self

    def match_vision_dtype(self) -> torch.dtype:
        """Cast a frozen (unregistered) vision encoder to the dtype of the projector's weights; returns it.

        Needed after DeepSpeed builds the engine: under bf16/fp16 it casts only registered parameters, which
        would leave the frozen tower computing in fp32 (several times slower on a GPU). A trainable encoder
        is registered and cast with the rest; `.to()` on the model reaches the frozen one too (`_apply`).
        """
        dtype = self.vision_proj.dtype
        frozen = self.__dict__.get("_frozen_vision_encoder")
        if frozen is not None:
            frozen.to(dtype=dtype)
        return dtype

    def compile_blocks(self, **compile_kwargs) -> int:
        """`torch.compile` every decoder block and a frozen vision encoder in place (`nn.Module.compile`: the
        modules, their names and state-dict keys stay as they are); returns how many modules were compiled.

        Per block rather than the whole model: one small graph compiled once serves every layer, shapes that
        change between batches (dynamic padding) recompile small graphs, and DeepSpeed's hooks around the
        model stay outside the compiled code. Packed rows then attend through FlexAttention where the
        platform runs it (`vlm.model.flex`: its kernel is fused only under compile).
        """
        modules = list(self.model.layers)
        frozen = self.__dict__.get("_frozen_vision_encoder")
        if frozen is not None:
            modules.append(frozen)
        for module in modules:
            module.compile(**compile_kwargs)
        self.model.packed_attention = "flex"
        return len(modules)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, image_token_len, hidden): encode (no_grad when frozen), pixel-shuffle, project."""
        encoder = self.get_vision_encoder()
        if encoder is None:
            raise ImagePlaceholderError("pixel_values were given but the model has no vision encoder attached")
        if self.vision_trainable:
            features = self._encode(encoder, pixel_values)
        else:
            with torch.no_grad():
                features = self._encode(encoder, pixel_values)
        features = pixel_shuffle(features, self.config.pixel_shuffle)
        return self.vision_proj(features.to(self.vision_proj.dtype))

    def _encode(self, encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return encode_images(encoder, pixel_values, self.config.vision_feature_layer, self.config.vision_drop_leading)

    def image_slots(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """The real images' slots in pixel_values.flatten(0, 1), row-major: (M,) long.

        input_ids (B, T), pixel_values (B, N, 3, H, W). Sample b's k-th placeholder run takes image slot k;
        slots beyond a sample's runs are padding. Checks the runs against the slots (reading them back from
        the device: for inputs nobody checked, e.g. chat; training batches bring `image_index` from the
        collator instead). Raises ImagePlaceholderError when they do not match.
        """
        if pixel_values.dim() != 5:
            raise ImagePlaceholderError(f"pixel_values must be (batch, images, 3, H, W); got {tuple(pixel_values.shape)}")
        run = self.config.image_token_len
        per_sample = (input_ids == self.config.image_token_id).sum(dim=1)  # (B,)
        if bool((per_sample % run).any()):
            bad = per_sample.tolist()
            raise ImagePlaceholderError(
                f"image placeholder tokens per sample {bad} are not multiples of image_token_len {run}: "
                "a placeholder run was cut or the tokenizer merged placeholder characters"
            )
        images_used = per_sample // run  # (B,)
        slots = pixel_values.shape[1]
        if bool((images_used > slots).any()):
            raise ImagePlaceholderError(
                f"samples hold {images_used.tolist()} image placeholder runs but pixel_values has {slots} image slots"
            )
        take = torch.arange(slots, device=input_ids.device)[None, :] < images_used[:, None]  # (B, N)
        return take.flatten().nonzero().squeeze(1)

    def merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, pixel_values: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write image features over the placeholder tokens.

        input_ids (B, T), inputs_embeds (B, T, D), pixel_values (B, N, 3, H, W); `image_index` (M,) long: the
        real images' slots in pixel_values.flatten(0, 1) in placeholder-run order (`vlm.data.collate` makes
        it; trusted, not checked), else found and checked by `image_slots`. Image m's features fill the m-th
        run in row-major order. With `image_index` nothing is read back from the device.
        """
        if image_index is None:
            image_index = self.image_slots(input_ids, pixel_values)
        if image_index.numel() == 0:
            return inputs_embeds
        features = self.image_features(pixel_values.flatten(0, 1)[image_index])  # (M, run, D)
        is_image = (input_ids == self.config.image_token_id).unsqueeze(-1)  # (B, T, 1)
        # Row-major order of the slots and of `is_image` agree: image k of sample b fills sample b's k-th run.
        return inputs_embeds.masked_scatter(is_image, features.to(inputs_embeds.dtype))

    def idle_vision(self, like: torch.Tensor) -> torch.Tensor:
        """A zero scalar (fp32) computed by the trainable vision parts, for a training micro-batch without images:
        the projector on no rows (and a trainable tower on one blank image), so that every rank makes the same
        collectives (ZeRO-3 gathers those parameters in forward and reduces their gradients) whatever its own
        micro-batch holds. `forward` adds it to `aux_loss`, so their (zero) gradients do not pass through the
        language model. `like`: any tensor of the batch, for device and dtype.
        """
        encoder = self.get_vision_encoder()
        if self.vision_trainable and encoder is not None:
            size = encoder.config.image_size
            features = self.image_features(like.new_zeros(1, 3, size, size))
        else:
            features = self.vision_proj(like.new_zeros(0, self.vision_proj.in_features))
        return features.sum().float() * 0

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        **kwargs,
    ):
        """Causal-LM forward with images; returns `MiniMindOutput` (logits, CE loss with `labels`, aux loss).

        input_ids (B, T); pixel_values (B, N, 3, H, W), normalised (`vlm.data.image.PixelNormalizer`):
        their projected features replace the placeholder runs' embeddings (`merge_image_features`, which
        raises ImagePlaceholderError when runs and images do not match; `image_index` (M,), the collator's
        trusted image slots, skips that check and its device reads). In training, a batch without images adds
        `idle_vision`'s zero to `aux_loss` (add `aux_loss` to the loss, as the trainer does). Given
        `inputs_embeds` (B, T, D), `input_ids` and `pixel_values` are not used. Other keyword arguments
        (position_ids, cache, use_cache, logits_to_keep, loss_index, ...) go to `MiniMindForCausalLM.forward`.
        """
        images_used = False
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)  # (B, T, D)
            if pixel_values is not None:
                if image_index is None:
                    image_index = self.image_slots(input_ids, pixel_values)
                images_used = image_index.numel() > 0
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, pixel_values, image_index)
        out = super().forward(
            input_ids=None, inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs
        )
        if self.training and not images_used:
            out.aux_loss = out.aux_loss + self.idle_vision(inputs_embeds)  # zero: see idle_vision
        return out

"""Throughput, MFU (the FLOPs each micro-batch computes), the metrics.jsonl log and the loss-curve plot (rank 0
writes; every rank measures)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vlm.model.vision_encoder import num_image_tokens

# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common training GPUs, matched by substring of the device name.
KNOWN_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "4090": 165e12,
    "3090": 71e12,
    "T4": 65e12,
}


def detect_peak_flops(device_name: str | None) -> float | None:
    """Dense bf16/fp16 peak FLOP/s of the GPU named `device_name` (KNOWN_PEAK_FLOPS), else None."""
    if not device_name:
        return None
    for key, flops in KNOWN_PEAK_FLOPS.items():
        if key in device_name:
            return flops
    return None


@dataclass(frozen=True)
class Stage:
    """One stage of the language model, input side first: a decoder block, or the final norm and output head.

    `trained` / `frozen`: multiply-accumulates per token in the stage's matmuls whose weights train / do not
    (the weights' element counts; MoE experts at their active share top_k / n_routed_experts).
    `has_trained`: any parameter of the stage trains (norms included), so gradients flow on from it; the
    whole stage is then counted with input gradients (exact for the named train.trainable policies; a
    pattern that trains only the MLP of a block also counts its frozen attention's, which are not computed).
    `attention`: a decoder block, whose score and value matmuls also grow with the row length.
    """

    trained: float
    frozen: float
    has_trained: bool
    attention: bool


@dataclass(frozen=True)
class FlopShape:
    """What a micro-batch's FLOPs depend on, read off the model once by `flop_shape`.

    Weights are multiply-accumulates per token (a matmul weight's element count); embeddings are lookups and
    not among them. `stages`: the language model, input side first; `attention_width`: heads x head width of
    its blocks. `projector`: the projector's weights, run on `image_tokens` rows per image (the patches, after
    any pixel shuffle). `vision_weights`: the tower's Linear weights, run on `vision_tokens` (its whole output:
    patches + CLIP's class token) per image; `vision_patch_weights`: its patch embedding, run on the
    `vision_patches`; `vision_layers`, `vision_width`: its attention. `vision_tokens` is 0 without a tower.
    """

    stages: tuple[Stage, ...]
    attention_width: int
    embedding_trained: bool
    projector: float = 0.0
    projector_trained: bool = False
    image_tokens: int = 0
    vision_weights: float = 0.0
    vision_patch_weights: float = 0.0
    vision_layers: int = 0
    vision_width: int = 0
    vision_tokens: int = 0
    vision_patches: int = 0
    vision_trained: bool = False


def micro_batch_flops(shape: FlopShape, rows: int, row_len: int, images: int,
                      head_positions: int | None = None) -> float:
    """Model FLOPs (a multiply-add is 2) of one micro-batch's forward and backward on this rank.

    `rows` x `row_len` is the input_ids tensor (B, T): every position is computed, padding included, so every
    one is counted; `images` is the number of images the vision tower encodes (real ones, not padding slots);
    `head_positions`: the positions the final norm and output head run on when the trainer scores only those
    (`loss_index`), else every position.

    Per token, a matmul with W weights costs 2W forward (Kaplan et al. 2020, "Scaling Laws for Neural Language
    Models", section 2.1 and table 1), and its backward 2W for the weight gradient when W trains plus 2W for
    the input gradient when gradients must reach a trained part nearer the input (the two halves of
    Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
    Megatron-LM"). So a trained weight costs 6W (the 6N rule: Kaplan; Hoffmann et al. 2022, Chinchilla,
    appendix F), a frozen one that gradients pass through 4W (a frozen language model carries them down to a
    trained projector), a frozen one with nothing trained below it 2W. The token embedding is a lookup and
    costs nothing; the output head tied to it is a matmul (Kaplan's "de-embed", 2 x hidden x vocab forward).
    A decoder block's attention scores and values add 4 x width x T per token forward, 12 x width x T with
    its backward, over the full T x T as PaLM counts them (Chowdhery et al. 2022, appendix B: 6N + 12 L H Q T
    per token), T the row length computed. The projector runs on images x image_tokens rows. A frozen vision
    tower runs forward only, under no_grad: 2 W_v per token plus 4 L_v H_v P^2 per image for its attention
    (P tokens per image); a trained one costs 3x that (its patch embedding 2x: the pixels need no gradient).
    Recomputation (activation checkpointing) is not counted, as in PaLM's model FLOPs utilization.
    """
    tokens = rows * row_len
    grad_flows = shape.embedding_trained or (images > 0 and (shape.projector_trained or shape.vision_trained))
    flops = 0.0
    for i, stage in enumerate(shape.stages):
        backward = grad_flows or stage.has_trained  # input gradients are computed in this stage
        weights = stage.trained + stage.frozen
        per_token = 2 * weights + 2 * stage.trained + (2 * weights if backward else 0)
        if stage.attention:
            per_token += (12 if backward else 4) * shape.attention_width * row_len
        head = i == len(shape.stages) - 1 and not stage.attention and head_positions is not None
        flops += per_token * (head_positions if head else tokens)
        grad_flows = backward
    if images > 0:
        rows, seq = shape.image_tokens, shape.vision_tokens
        flops += 2 * shape.projector * images * rows * (1 + shape.projector_trained + shape.vision_trained)
        tower = 2 * shape.vision_weights * seq + 4 * shape.vision_layers * shape.vision_width * seq**2
        patch_embedding = 2 * shape.vision_patch_weights * shape.vision_patches
        if shape.vision_trained:
            tower, patch_embedding = 3 * tower, 2 * patch_embedding
        flops += images * (tower + patch_embedding)
    return flops


def flop_shape(model: nn.Module) -> FlopShape:
    """The FlopShape of a MiniMindVLM as it trains: call it after freezing (`apply_trainable_policy`)."""
    config = model.config
    expert_share = config.num_experts_per_tok / config.n_routed_experts if config.use_moe else 1.0
    stages = []
    for block in model.model.layers:
        trained, frozen = _matmul_weights(block, nn.Linear, expert_share)
        if config.use_moe:  # the router: a bare experts x hidden weight, applied to every token
            router = config.n_routed_experts * config.hidden_size
            if block.mlp.gate.weight.requires_grad:
                trained += router
            else:
                frozen += router
        stages.append(Stage(trained, frozen, _any_trained(block), attention=True))
    head = (model.model.norm, model.lm_head)  # lm_head's weight is the token embedding's, tied
    stages.append(Stage(*_matmul_weights(model.lm_head), any(map(_any_trained, head)), attention=False))
    vision = {}
    encoder = model.get_vision_encoder()
    if encoder is not None:
        vc = encoder.config
        vision = {"vision_weights": sum(_matmul_weights(encoder)),
                  "vision_patch_weights": sum(_matmul_weights(encoder, nn.Conv2d)),
                  "vision_layers": vc.num_hidden_layers, "vision_width": vc.hidden_size,
                  "vision_tokens": num_image_tokens(vc, drop_leading=0),
                  "vision_patches": (vc.image_size // vc.patch_size) ** 2, "vision_trained": _any_trained(encoder)}
    return FlopShape(tuple(stages), config.num_attention_heads * config.head_dim,
                     embedding_trained=model.model.embed_tokens.weight.requires_grad,
                     projector=sum(_matmul_weights(model.vision_proj)),
                     projector_trained=_any_trained(model.vision_proj), image_tokens=config.image_token_len,
                     **vision)


def _any_trained(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _matmul_weights(module: nn.Module, kind: type = nn.Linear, expert_share: float = 1.0) -> tuple[float, float]:
    """(trained, frozen) weights of the `kind` (Linear or Conv2d) layers in `module`, from the layers' sizes
    (ZeRO-3 leaves the parameters themselves empty on each rank); MoE experts (`experts.N.*`) count at
    `expert_share`."""
    trained = frozen = 0.0
    for name, layer in module.named_modules():
        if not isinstance(layer, kind):
            continue
        if isinstance(layer, nn.Conv2d):
            weights = layer.in_channels * layer.out_channels * math.prod(layer.kernel_size) / layer.groups
        else:
            weights = float(layer.in_features * layer.out_features)
        if ".experts." in f".{name}":  # routed experts; shared_experts run for every token
            weights *= expert_share
        if layer.weight.requires_grad:
            trained += weights
        else:
            frozen += weights
    return trained, frozen


class StepTimer:
    """Splits wall time into waiting for data and computing, between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Start a new window now, with the data wait, tokens, samples and FLOPs back at zero."""
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.tokens = 0
        self.samples = 0
        self.flops = 0.0

    def add(self, data_wait: float, tokens: int, samples: int, flops: float) -> None:
        """Count one micro-batch of this rank: `data_wait` in seconds, its tokens, samples and FLOPs."""
        self.data_wait += data_wait
        self.tokens += tokens
        self.samples += samples
        self.flops += flops

    def summary(self, world_size: int, peak_flops: float | None) -> dict[str, float | None]:
        """Rates over the window since `reset`: tokens/s and samples/s, data_wait_share and MFU.

        Tokens and samples are this rank's counts times `world_size`; `data_wait_share` is the fraction
        of wall time spent waiting for data; `mfu` is this rank's FLOP/s over `peak_flops` (FLOP/s), or None
        without a peak.
        """
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        flops_per_s = self.flops / elapsed  # this rank's
        return {
            "tokens_per_s": self.tokens * world_size / elapsed,
            "samples_per_s": self.samples * world_size / elapsed,
            "data_wait_share": self.data_wait / elapsed,
            "mfu": flops_per_s / peak_flops if peak_flops else None,
        }


class MetricsLog:
    """One JSON object per logged step in out_dir/metrics.jsonl (appended across resumes)."""

    def __init__(self, out_dir: str | Path, enabled: bool):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` as one JSON line (sorted keys; NaN and infinities become null, which JSON has);
        does nothing unless enabled (rank 0)."""
        if self.enabled:
            clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            with self.path.open("a") as f:
                f.write(json.dumps(clean, sort_keys=True, allow_nan=False) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl, blank lines skipped; [] when the file does not exist."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict[str, Any]], path: str | Path, title: str = "training loss") -> Path | None:
    """A loss-curve PNG (train loss, and eval loss where logged) from metrics records."""
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)

"""One micro-batch through the engine, and the evaluation loss: the collective-safe parts of the loop.

Every rank must make the same DeepSpeed calls in the same order, or a collective waits forever. So a
micro-batch whose loss is NaN/Inf on ANY rank (agreed by an all-reduce) is replaced on every rank by a
zero-weight backward through a one-row dummy batch, DeepSpeed's accumulation counters and hooks running as
usual, and the whole optimizer step it belongs to is skipped: no parameter, optimizer state or schedule
position changes (the trainer reports the step's samples as skipped). An empty micro-batch (all of its
samples were bad) takes the zero-weight path without skipping the step.

Loader batches carry uint8 `pixel_values`; `model_inputs` moves them to the device first and normalises
them there with the `PixelNormalizer` the trainer builds from the encoder's preprocessor config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm.data.image import PixelNormalizer
from vlm.train import distributed

MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values")


@dataclass
class StepResult:
    """What one micro-batch did on this rank: its loss, whether it was skipped for a NaN/Inf loss, and the
    learning rate of the optimizer step it belongs to (read before the step advances the schedule)."""

    loss: float | None  # this rank's loss for the micro-batch; None when it contributed nothing
    skipped_nonfinite: bool
    lr: float = 0.0


def model_inputs(batch: dict, device: torch.device, normalize_pixels: PixelNormalizer) -> dict:
    """The model's keyword arguments on `device`; uint8 pixel_values (B, N, 3, H, W) become float32 there.

    A batch of right-padded single-sample rows (`packed` False, see `vlm.data.collate`) goes without
    attention_mask and position_ids: plain causal attention, exact for its real tokens, on SDPA's fused
    kernels (a mask would rule out the flash kernel and build a (B, 1, T, T) tensor).
    """
    names = MODEL_INPUTS if batch.get("packed", True) else ("input_ids", "labels", "pixel_values")
    inputs = {k: batch[k].to(device, non_blocking=True) for k in names if k in batch}
    pixels = inputs.get("pixel_values")
    if pixels is not None and pixels.shape[1] == 0:  # no image in any row
        inputs.pop("pixel_values")
    elif pixels is not None:
        inputs["pixel_values"] = normalize_pixels(pixels)  # (B, N, 3, H, W) float32
    return inputs


def _dummy_inputs(engine, device: torch.device) -> dict:
    pad = engine.module.config.pad_token_id or 0
    ids = torch.full((1, 8), pad, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _zero_weight_backward(engine, device: torch.device, skip_step: bool) -> None:
    out = engine(**_dummy_inputs(engine, device))
    engine.backward(out.logits.float().sum() * 0.0 + out.aux_loss.float() * 0.0)
    _step(engine, skip_step)


def run_micro_batch(
    engine, batch: dict, device: torch.device, normalize_pixels: PixelNormalizer, skip_step: bool = False
) -> StepResult:
    """Forward, backward and DeepSpeed step for one micro-batch (the step applies at accumulation boundaries).

    `skip_step`: an earlier micro-batch of this optimizer step had a NaN/Inf loss. Then, and when this one
    has, the step at the boundary changes nothing (`distributed.optimizer_step_skipped`).
    """
    lr = float(engine.get_lr()[0])
    if int(batch["num_samples"]) == 0:
        distributed.all_ranks(True, device)  # keep the all-reduce sequence identical on every rank
        _zero_weight_backward(engine, device, skip_step)
        return StepResult(None, False, lr)
    out = engine(**model_inputs(batch, device, normalize_pixels))
    loss = out.loss.float() + out.aux_loss.float()
    if not distributed.all_ranks(bool(torch.isfinite(loss).item()), device):
        del out, loss  # drop the graph with the bad activations
        _zero_weight_backward(engine, device, skip_step=True)
        return StepResult(None, True, lr)
    engine.backward(loss)
    _step(engine, skip_step)
    return StepResult(float(out.loss.detach()), False, lr)


def _step(engine, skip: bool) -> None:
    if skip:
        with distributed.optimizer_step_skipped(engine):
            engine.step()
    else:
        engine.step()


@torch.no_grad()
def evaluate_loss(
    engine, loader, device: torch.device, normalize_pixels: PixelNormalizer
) -> float | None:
    """Token-weighted mean loss over the eval loader, across ranks (ranks with fewer batches run dummies);
    None when no eval sample could be used on any rank."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        if not distributed.any_rank(batch is not None, device):
            break
        if batch is None or int(batch["num_samples"]) == 0:
            engine(**_dummy_inputs(engine, device))  # ZeRO-3 gathers weights collectively in forward
            continue
        out = engine(**model_inputs(batch, device, normalize_pixels))
        tokens = int(batch["num_label_tokens"])
        total += torch.tensor([float(out.loss) * tokens, tokens], dtype=torch.float64, device=device)
    distributed.all_reduce_sum(total)
    engine.train()
    return float(total[0] / total[1]) if total[1] > 0 else None

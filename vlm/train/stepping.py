"""One micro-batch through the engine, the optimizer step at an accumulation boundary, and the evaluation
loss: the collective-safe parts of the loop, with no host-device sync between log steps but one per
optimizer step.

Every rank must make the same DeepSpeed calls in the same order, or a collective waits forever. Every
micro-batch runs forward and backward whatever its loss; whether the loss was finite is kept on the device
(`nonfinite`, or-ed over the micro-batches of the step). At the accumulation boundary `agree_at_boundary`
reads it once, together with the trainer's own flags, in a single all-reduce: if any rank saw a NaN/Inf
loss, the whole optimizer step is skipped on every rank (`distributed.optimizer_step_skipped`): no
parameter, optimizer state or schedule position changes, and the trainer reports the step's samples as
skipped. (The NaN gradients of that step are zeroed by DeepSpeed after it, like any step's.) An empty
micro-batch (all of its samples were bad) takes a zero-weight backward through a one-row dummy batch.

Losses stay on the device as well; the trainer reads them at log steps only.

Loader batches carry uint8 `pixel_values`; `model_inputs` moves them to the device first and normalises
them there with the `PixelNormalizer` the trainer builds from the encoder's preprocessor config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm.data.image import PixelNormalizer
from vlm.train import distributed

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_index", "loss_index",
                "loss_targets")  # loss_index/loss_targets replace labels: the head runs on scored positions only


@dataclass
class StepResult:
    """What one micro-batch did on this rank: its loss, detached on the device (read at log steps; may be
    NaN/Inf), or None when it computed nothing; and the learning rate of the optimizer step it belongs to
    (read before the step advances the schedule)."""

    loss: torch.Tensor | None
    lr: float = 0.0


def model_inputs(batch: dict, device: torch.device, normalize_pixels: PixelNormalizer) -> dict:
    """The model's keyword arguments on `device`; uint8 pixel_values (B, N, 3, H, W) become float32 there.

    A batch of right-padded single-sample rows (`packed` False, see `vlm.data.collate`) goes without
    attention_mask and position_ids: plain causal attention, exact for its real tokens, on SDPA's fused
    kernels (a mask would rule out the flash kernel and build a (B, 1, T, T) tensor). The collator's
    `image_index` tells the model which image slots are real, so it reads nothing back from the device;
    its `loss_index` / `loss_targets` let the output head run on the scored positions only.
    """
    names = MODEL_INPUTS if "loss_index" in batch else (*MODEL_INPUTS, "labels")  # labels: a batch from elsewhere
    if not batch.get("packed", True):  # right-padded single-sample rows: causal attention needs no mask
        names = [k for k in names if k not in ("attention_mask", "position_ids")]
    inputs = {k: batch[k].to(device, non_blocking=True) for k in names if k in batch}
    pixels = inputs.get("pixel_values")
    if pixels is not None and pixels.shape[1] == 0:  # no image in any row
        inputs.pop("pixel_values")
        inputs.pop("image_index", None)
    elif pixels is not None:
        inputs["pixel_values"] = normalize_pixels(pixels)  # (B, N, 3, H, W) float32
    return inputs


def _dummy_inputs(engine, device: torch.device) -> dict:
    pad = engine.module.config.pad_token_id or 0
    ids = torch.full((1, 8), pad, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run_micro_batch(engine, batch: dict, device: torch.device, normalize_pixels: PixelNormalizer,
                    nonfinite: torch.Tensor) -> StepResult:
    """Forward and backward of one micro-batch (no optimizer step: `step_engine` follows).

    `nonfinite`: a bool scalar on the device, set in place when this loss is NaN/Inf (never read here).
    An empty micro-batch (`num_samples` 0) runs a zero-weight backward through a dummy row, so DeepSpeed's
    hooks and collectives run as on every other rank.
    """
    lr = float(engine.get_lr()[0])  # the schedule's value: a Python float, no device read
    if batch["num_samples"] == 0:
        out = engine(**_dummy_inputs(engine, device))
        engine.backward(out.logits.float().sum() * 0.0 + out.aux_loss.float() * 0.0)
        return StepResult(None, lr)
    out = engine(**model_inputs(batch, device, normalize_pixels))
    loss = out.loss.float() + out.aux_loss.float()
    nonfinite.logical_or_(~torch.isfinite(loss))
    engine.backward(loss)
    return StepResult(out.loss.detach().float(), lr)


def agree_at_boundary(nonfinite: torch.Tensor, flags: list[bool], device: torch.device) -> list[bool]:
    """Collective, once per optimizer step: [any rank saw a NaN/Inf loss in this step, *each of `flags` on
    any rank]; one all-reduce and the step's one read from the device. Resets `nonfinite`."""
    values = torch.cat([nonfinite.reshape(1).float(), torch.tensor(flags, dtype=torch.float32, device=device)])
    nonfinite.zero_()
    return distributed.any_rank_each(values, device)


def step_engine(engine, skip: bool = False) -> None:
    """DeepSpeed's step after every micro-batch (it applies the optimizer at the accumulation boundary); with
    `skip` the optimizer and the schedule do nothing in it (`distributed.optimizer_step_skipped`)."""
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
    None when no eval sample could be used on any rank. Losses are summed on the device, read once."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        if not distributed.any_rank(batch is not None, device):
            break
        if batch is None or batch["num_samples"] == 0:
            engine(**_dummy_inputs(engine, device))  # ZeRO-3 gathers weights collectively in forward
            continue
        out = engine(**model_inputs(batch, device, normalize_pixels))
        tokens = batch["num_label_tokens"]
        total[0] += out.loss.double() * tokens
        total[1] += tokens
    distributed.all_reduce_sum(total)
    engine.train()
    return float(total[0] / total[1]) if total[1] > 0 else None

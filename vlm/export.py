"""Export a training checkpoint as MiniMind-V weights or a Hugging Face folder.

    python -m vlm.export --checkpoint out/sft --format minimind --out out/sft_vlm_512.pth
    python -m vlm.export --checkpoint out/sft --tag step_000001200 --format hf --out out/sft_hf

`--checkpoint` is an out_dir (its newest complete checkpoint, or `--tag`) or one checkpoint folder.
`minimind`: fp16 `.pth` with MiniMind-V's key names, language model + projector, no vision encoder (loads
in MiniMind-V's own code). `hf`: config.json + model.safetensors + vision_model/ + tokenizer, loadable with
`MiniMindVLM.from_pretrained(DIR)`. ZeRO-1/2 checkpoints are read as data (`weights_only=True`); ZeRO-3
partitions are consolidated with DeepSpeed's own utility, which unpickles DeepSpeed's files: export only
checkpoints you wrote.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vlm.build import build
from vlm.config import config_from_dict
from vlm.model.pretrained import save_vlm_folder
from vlm.model.weights import load_state_strict, save_minimind_weights
from vlm.train.checkpoint import CheckpointError, read_meta, resolve_resume


def find_checkpoint(path: str, tag: str | None) -> Path:
    if tag is not None:
        candidate = Path(path) / "checkpoints" / tag
        return candidate if candidate.is_dir() else Path(path) / tag
    found = resolve_resume(path, path)
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {path}")
    return found


def checkpoint_state_dict(checkpoint: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full model weights (MiniMind-V names, vision encoder included when it was trained)."""
    if zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return dict(states["module"])


def load_trained_model(checkpoint: Path):
    """(built, meta): the model of a checkpoint rebuilt from its resolved config, weights loaded strictly."""
    meta = read_meta(checkpoint)
    cfg = config_from_dict(meta["config"])
    cfg.model.init_weights = None  # the checkpoint's own weights replace any starting weights
    built = build(cfg)
    state = checkpoint_state_dict(checkpoint, meta["zero_stage"])
    encoder_state = {k[len("vision_encoder."):]: v for k, v in state.items() if k.startswith("vision_encoder.")}
    if encoder_state:
        built.model.get_vision_encoder().load_state_dict(encoder_state, strict=True)
    load_state_strict(built.model, state, str(checkpoint))
    return built, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm.export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="out_dir or checkpoint folder")
    parser.add_argument("--tag", default=None, help="checkpoint name, e.g. step_000001200 (default: newest)")
    parser.add_argument("--format", choices=("minimind", "hf"), required=True)
    parser.add_argument("--out", required=True, help="a .pth file (minimind) or a folder (hf)")
    args = parser.parse_args(argv)
    try:
        checkpoint = find_checkpoint(args.checkpoint, args.tag)
        built, meta = load_trained_model(checkpoint)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "minimind":
        path = save_minimind_weights(built.model, args.out)
    else:
        path = save_vlm_folder(built.model, args.out, built.tokenizer, built.vision_folder)
    print(f"exported {checkpoint} (step {meta['step']}) as {args.format} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

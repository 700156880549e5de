"""Export a training checkpoint as MiniMind-V weights or a Hugging Face folder.

    python -m vlm.export --checkpoint out/sft --format minimind --out out/sft_vlm_512.pth
    python -m vlm.export --checkpoint out/sft --tag step_000001200 --format hf --out out/sft_hf

`--checkpoint` is an out_dir (its newest complete checkpoint, or `--tag`) or one checkpoint folder.
`minimind`: fp16 `.pth` with MiniMind-V's key names, language model + projector, no vision encoder (loads
in MiniMind-V's own code). `hf`: config.json + model.safetensors + vision_model/ + tokenizer, loadable with
`MiniMindVLM.from_pretrained(DIR)`. Checkpoints are read by `vlm.load` (ZeRO-3 partitions are consolidated
with DeepSpeed's own utility, which unpickles DeepSpeed's files: export only checkpoints you wrote).
"""

from __future__ import annotations

import argparse
import sys

from vlm.load import find_checkpoint, load_trained_model
from vlm.model.pretrained import save_vlm_folder
from vlm.model.weights import save_minimind_weights
from vlm.train.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    """Export one checkpoint; returns the exit code (2: no such checkpoint or unreadable)."""
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

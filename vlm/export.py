"""Export a training checkpoint as MiniMind-V weights or a Hugging Face folder that transformers loads alone.

    python -m vlm.export --checkpoint out/sft --format minimind --out out/sft_vlm_512.pth
    python -m vlm.export --checkpoint out/sft --tag step_000001200 --format hf --out out/sft_hf
    python -m vlm.export --checkpoint out/sft/export --format hf --out out/sft/export   # add the code in place

`--checkpoint` is an out_dir (its newest complete checkpoint, or `--tag`), one checkpoint folder, or an
exported folder (the trainer's `out_dir/export`). `minimind`: fp16 `.pth` with MiniMind-V's key names,
language model + projector, no vision encoder (loads in MiniMind-V's own code). `hf`: the project's folder
(config.json + model.safetensors + vision_model/ + tokenizer, `vlm.model.pretrained`), which carries what plain
transformers needs (`vlm.model.remote_code`: `architectures` and `auto_map`, the model code, a greedy
generation_config.json, a tokenizer config that transformers 4.5x reads too); an exported folder of an older
version is completed in place when `--out` is the folder itself:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

Checkpoints are read by `vlm.load` (ZeRO-3 partitions are consolidated with DeepSpeed's own utility, which
unpickles DeepSpeed's files: export only checkpoints you wrote).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm.load import CheckpointKindError, checkpoint_kind, find_checkpoint, load_trained_model
from vlm.model.pretrained import VISION_SUBFOLDER, load_vlm_folder, save_vlm_folder
from vlm.model.remote_code import add_transformers_files
from vlm.model.vlm import MiniMindVLM
from vlm.model.weights import save_minimind_weights
from vlm.train.checkpoint import CheckpointError


def _load(checkpoint: str, tag: str | None) -> tuple[MiniMindVLM, object, Path | None, str]:
    """(model, tokenizer, vision folder, kind) of a training checkpoint ('training') or an exported folder ('hf')."""
    kind = checkpoint_kind(checkpoint) if tag is None and Path(checkpoint).exists() else "training"
    if kind == "minimind":
        raise CheckpointKindError(f"{checkpoint} is a .pth file; export reads a training checkpoint or an "
                                  "exported folder")
    if kind == "hf":
        model, tokenizer = load_vlm_folder(checkpoint)
        if tokenizer is None:
            raise FileNotFoundError(f"{checkpoint} has no tokenizer files; an exported folder carries its tokenizer")
        return model, tokenizer, Path(checkpoint) / VISION_SUBFOLDER, kind
    built, _ = load_trained_model(find_checkpoint(checkpoint, tag))
    return built.model, built.tokenizer, built.vision_folder, kind


def main(argv: list[str] | None = None) -> int:
    """Export one checkpoint; returns the exit code (2: no such checkpoint or unreadable)."""
    parser = argparse.ArgumentParser(prog="python -m vlm.export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="out_dir, checkpoint folder or exported folder")
    parser.add_argument("--tag", default=None, help="checkpoint name, e.g. step_000001200 (default: newest)")
    parser.add_argument("--format", choices=("minimind", "hf"), required=True)
    parser.add_argument("--out", required=True, help="a .pth file (minimind) or a folder (hf)")
    args = parser.parse_args(argv)
    try:
        model, tokenizer, vision_folder, kind = _load(args.checkpoint, args.tag)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "minimind":
        path = save_minimind_weights(model, args.out)
    elif kind == "hf" and Path(args.out).resolve() == Path(args.checkpoint).resolve():
        path = add_transformers_files(args.out, model, tokenizer)  # the exported folder, completed in place
    else:
        path = save_vlm_folder(model, args.out, tokenizer, vision_folder)
    print(f"exported {args.checkpoint} ({kind}) as {args.format} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

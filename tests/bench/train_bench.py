"""Training benchmark at the seed's model size (a script, not a test).

    python tests/bench/train_bench.py [--steps 8] [--ranks 2] [--dtype bfloat16]

Runs the real trainer through `deepspeed --num_gpus RANKS` on a synthetic pretrain corpus with CLIP
ViT-B/16 geometry (random weights, 224 px, 196 image tokens) and a 512 x 8 MiniMind language model
(SFT setting: projector + whole LM trainable), batch 2, max_seq_len 640:
  1. step time and useful (non-padding) tokens/s for ZeRO 0/1/2/3 (dynamic padding);
  2. padded-to-640 vs dynamic-padded vs packed batches (ZeRO 2);
  3. per-rank model-state memory by ZeRO stage for 1, 8 and 64 GPUs (DeepSpeed's estimators for stages
     2/3, the ZeRO paper's formulas for 0/1; mixed-precision Adam).
Medians over the steps after the first two (warm-up). The machine is shared and noisy: compare rows of
one run, not across runs.

    python tests/bench/train_bench.py --vs-minimind PATH [--rounds 3] [--harness ../shared/bench-reference]

runs instead the side-by-side against MiniMind-V 623a130's own training step (its `train_epoch`, imported at
run time from the checkout at PATH by the reference harness, which holds none of its code): the harness's
corpus (500 JPEGs, 320x240..640x480) and random-weight ViT-B/16 CLIP, MiniMind's tokenizer, a 512 x 8 LM,
seq 640, batch 2, the SFT trainable set, fp32 and bf16 (CPU autocast for MiniMind-V, bf16 weights for us);
ours is `launch/train.py` on one process (ZeRO-2, one loader worker) padded to 640 (equal work) and with
its default dynamic padding. Rounds interleave the three runs; the table gives medians over rounds of the
per-run medians and the ratios to MiniMind-V (tokens/s at equal padding, useful non-pad tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def make_corpus(root: Path) -> Path:
    from data_tools import shard, synth

    synth.write_corpus(root / "dataset", pretrain=160, sft=1, eval=1, seed=0, progress=False)
    out = root / "shards"
    shard.main(["--jsonl", str(root / "dataset/pretrain_data.jsonl"), "--images", str(root / "dataset/pretrain_images"),
                "--out", str(out), "--prefix", "pretrain"])
    return out


def make_vit_b16(root: Path) -> Path:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    from vlm.formats.constants import CLIP_MEAN, CLIP_STD
    from vlm.model.vision_encoder import save_vision_encoder

    config = CLIPVisionConfig(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                              num_hidden_layers=12, num_attention_heads=12)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                      image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return save_vision_encoder(CLIPVisionModel(config), root / "clip_vit_b16", processor)


def train(shards: Path, vision: Path, out: Path, steps: int, ranks: int, dtype: str, zero: int, batching: str):
    args = ["--train_shards", str(shards), "--out_dir", str(out), "--max_steps", str(steps), "--epochs", "1",
            "--batch_size", "2", "--max_seq_len", "640", "--dim", "512", "--n_layers", "8", "--dtype", dtype,
            "--zero_stage", str(zero), "--log_interval", "1", "--save_interval", "100000",
            "--model.vision_model", str(vision), "--model.vision_trainable", "false", "--model.vocab_size", "6400",
            "--train.stage", "sft", "--train.trainable", "projector+lm", "--data.batching", batching,
            "--data.num_workers", "1", "--learning_rate", "1e-4"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}:{os.environ['PATH']}")
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "launch/train.py", "--config",
           "launch/configs/debug.yaml", *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"training failed:\n{(result.stdout + result.stderr)[-3000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "step_time_s" in r and r["step"] > 2]
    return statistics.median(r["step_time_s"] for r in timed), statistics.median(r["tokens_per_s"] for r in timed)


def memory_table(total_params: int, largest_layer: int) -> list[tuple]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for gpus in (1, 8, 64):
        per_node, nodes = min(gpus, 8), max(gpus // 8, 1)
        z0 = 16 * total_params
        z1 = 4 * total_params + 12 * total_params / gpus
        _, z2 = estimate_zero2_model_states_mem_needs(total_params, per_node, nodes, cpu_offload=False)
        _, z3, _ = estimate_zero3_model_states_mem_needs(total_params, largest_layer, per_node, nodes,
                                                         cpu_offload=False, cpu_offload_params=False)
        rows.append((gpus, z0, z1, z2, z3))
    return rows


HARNESS = REPO.parent / "shared" / "bench-reference"


def side_by_side(mmv: Path, harness: Path, work: Path, rounds: int, steps: int, extra: tuple[str, ...] = ()) -> None:
    """MiniMind-V's step next to ours (see the module docstring); prints one table."""
    py = sys.executable
    work.mkdir(parents=True, exist_ok=True)
    clip, data, shards, tok = work / "clip", work / "data", work / "shards", work / "tok"
    if not (clip / "config.json").is_file():
        subprocess.run([py, str(harness / "make_clip.py"), "--out", str(clip), "--preset", "vit-b16"], check=True,
                       capture_output=True)
    if not (data / "pretrain_data.jsonl").is_file():
        subprocess.run([py, str(harness / "make_data.py"), "--out", str(data), "--n", "500"], check=True,
                       capture_output=True)
    if not (shards / "manifest.json").is_file():
        subprocess.run([py, "-m", "data_tools.shard", "--jsonl", str(data / "pretrain_data.jsonl"), "--images",
                        str(data / "images"), "--out", str(shards)], check=True, cwd=REPO, capture_output=True)
    tok.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tok / name).write_bytes((mmv / "model" / name).read_bytes())

    def reference(dtype: str) -> dict:
        env = dict(os.environ, MMV_REF=str(mmv), MMV_REF_COMMIT="623a130")
        out = subprocess.run([py, str(harness / "bench_train.py"), "--data", str(data), "--clip", str(clip),
                              "--mode", "sft", "--dtype", dtype, "--batch-size", "2", "--warmup", "3", "--steps",
                              str(steps), "--wait-idle", "5", "--retries", "1"], env=env, capture_output=True,
                             text=True, check=True)
        line = json.loads(out.stdout.strip().splitlines()[-1])
        return {"s": line["step_s_median"], "tok": line["tokens_per_s"], "useful": line["nonpad_tokens_per_s"]}

    def ours(dtype: str, batching: str, tag: str) -> dict:
        out = work / f"ours-{dtype}-{batching}-{tag}"
        args = ["--train_shards", str(shards), "--out_dir", str(out), "--max_steps", str(steps + 3), "--epochs", "1",
                "--batch_size", "2", "--max_seq_len", "640", "--dim", "512", "--n_layers", "8",
                "--dtype", "bfloat16" if dtype == "bf16" else "float32", "--zero_stage", "2", "--log_interval", "1",
                "--save_interval", "100000", "--model.vision_model", str(clip), "--model.vision_trainable", "false",
                "--model.tokenizer", str(tok), "--model.image_placeholder", "@", "--model.vocab_size", "6400",
                "--train.stage", "sft", "--train.trainable", "projector+lm", "--data.batching", batching,
                "--data.num_workers", "1", "--learning_rate", "1e-4", "--train.resume", "never",
                "--train.previous_run", "move", *extra]
        env = dict(os.environ, DS_ACCELERATOR="cpu")
        result = subprocess.run([py, "launch/train.py", "--config", "launch/configs/debug.yaml", *args], cwd=REPO,
                                env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"training failed:\n{(result.stdout + result.stderr)[-3000:]}")
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if "step_time_s" in r and r["step"] > 3]
        step = statistics.median(r["step_time_s"] for r in timed)
        return {"s": step, "tok": 2 * 640 / step, "useful": statistics.median(r["tokens_per_s"] for r in timed)}

    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for dtype in ("fp32", "bf16"):
            runs.setdefault((dtype, "minimind"), []).append(reference(dtype))
            runs.setdefault((dtype, "max_len"), []).append(ours(dtype, "max_len", str(r)))
            runs.setdefault((dtype, "dynamic"), []).append(ours(dtype, "dynamic", str(r)))

    def med(dtype: str, kind: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[(dtype, kind)])

    print(f"MiniMind-V 623a130 train_epoch vs ours (1 process, ZeRO-2{', ' + ' '.join(extra) if extra else ''}), SFT, "
          f"batch 2, seq 640, ViT-B/16 geometry; medians of {rounds} interleaved rounds x {steps} steps")
    print("| dtype | MiniMind-V s/step | ours padded to 640 s/step | tok/s ratio (equal padding) | ours dynamic "
          "s/step | useful tok/s: MiniMind-V | ours dynamic | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype in ("fp32", "bf16"):
        ref_s, pad_s, dyn_s = (med(dtype, k, "s") for k in ("minimind", "max_len", "dynamic"))
        ref_tok, pad_tok = med(dtype, "minimind", "tok"), med(dtype, "max_len", "tok")
        ref_useful, dyn_useful = med(dtype, "minimind", "useful"), med(dtype, "dynamic", "useful")
        print(f"| {dtype} | {ref_s:.2f} | {pad_s:.2f} | {pad_tok / ref_tok:.2f}x | {dyn_s:.2f} | {ref_useful:.0f} | "
              f"{dyn_useful:.0f} | {dyn_useful / ref_useful:.2f}x |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--vs-minimind", type=Path, metavar="PATH",
                        help="a MiniMind-V 623a130 checkout: run the side-by-side against its own step instead")
    parser.add_argument("--harness", type=Path, default=HARNESS, help="the reference harness (bench-reference)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="keep corpus and CLIP here between runs")
    parser.add_argument("--ours", action="append", default=[], metavar="FLAG",
                        help="with --vs-minimind: one more flag for our runs (repeatable), e.g. --ours=--train.compile")
    args = parser.parse_args(argv)
    if args.vs_minimind is not None:
        if args.work is not None:
            side_by_side(args.vs_minimind.resolve(), args.harness.resolve(), args.work.resolve(), args.rounds, args.steps,
                         tuple(args.ours))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                side_by_side(args.vs_minimind.resolve(), args.harness.resolve(), Path(tmp), args.rounds, args.steps,
                             tuple(args.ours))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards, vision = make_corpus(root), make_vit_b16(root)
        print(f"512 x 8 MiniMind + CLIP ViT-B/16 geometry, batch 2 x {args.ranks} ranks, {args.dtype}, CPU")
        print(f"{'setting':28s} {'step s':>8s} {'useful tok/s':>13s}")
        for zero in (0, 1, 2, 3):
            step, tps = train(shards, vision, root / f"z{zero}", args.steps, args.ranks, args.dtype, zero, "dynamic")
            print(f"{f'ZeRO-{zero}, dynamic padding':28s} {step:8.2f} {tps:13.0f}")
        for batching in ("max_len", "dynamic", "pack"):
            step, tps = train(shards, vision, root / f"b{batching}", args.steps, args.ranks, args.dtype, 2, batching)
            print(f"{f'ZeRO-2, {batching}':28s} {step:8.2f} {tps:13.0f}")
    from vlm.model.config import VLMConfig
    from vlm.model.language_model import MiniMindForCausalLM

    lm = MiniMindForCausalLM(VLMConfig(hidden_size=512, num_hidden_layers=8))
    total = sum(p.numel() for p in lm.parameters()) + 768 * 512 + 512
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in lm.model.layers)
    largest = max(largest, lm.model.embed_tokens.weight.numel())
    print(f"\nper-rank model states (trainable {total / 1e6:.1f} M params, bf16 + fp32 Adam), GB:")
    print(f"{'GPUs':>5s} {'ZeRO-0':>8s} {'ZeRO-1':>8s} {'ZeRO-2':>8s} {'ZeRO-3':>8s}")
    for gpus, *mem in memory_table(total, largest):
        print(f"{gpus:5d} " + " ".join(f"{m / 2**30:8.3f}" for m in mem))
    print("(+ the frozen CLIP ViT-B/16 in bf16 on every rank: ~0.16 GB, outside ZeRO)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

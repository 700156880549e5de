"""The whole job offline in one command: synthetic pictures -> shards -> vision -> pretrain -> SFT -> export -> eval.

    python -m vlm.demo                   # what `make demo` runs: about 7 minutes on 2 CPU cores
    python -m vlm.demo --tiny            # a smoke run of every stage in about a minute (learns little)
    python -m vlm.demo --ranks 2 --pretrain_epochs 3 --out out/demo2

Everything trains from scratch (the built-in tokenizer, the tiny CLIP-style vision encoder, a small
MiniMind language model), since nothing pretrained can be downloaded. The `vision` stage first teaches
the vision encoder what lies in each cell of the pretrain pictures' 3 x 3 grid (the stand-in for a
pretrained CLIP; see `vlm.demo.vision`). Both VLM stages then run through the real trainer
(`launch/train.py`, the DeepSpeed engine; `deepspeed --num_gpus N` with --ranks N > 1) with
`launch/configs/demo_pretrain.yaml` and `demo_sft.yaml`: projector and language model trained, the encoder
frozen (with --vision_steps 0 the random built-in encoder trains with them instead). Data goes to `--data` (default data/demo: never the user's
dataset/), everything else to `--out` (default out/demo): each stage's out_dir with metrics.jsonl,
loss.png, train.log, checkpoints and export/, `vision_model/`, the MiniMind-V .pth, `loss.png` (both
stages), `eval.json` (every held-out picture's answer), `eval_sft.json` (every held-out SFT question's
answer) and `report.json` (accuracy, multi_shape_accuracy, sft_scores per question type and group,
text_only_accuracy, eval_loss, wall_time_s, stage_times_s, settings). The same arguments give the same
corpus, data order and initial weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from tqdm import tqdm

from vlm.demo.scoring import question_table
from vlm.demo.settings import STAGES, TINY, TINY_TRAIN_ARGS, DemoPaths, DemoSettings
from vlm.demo.stages import (
    StageError,
    export_minimind,
    make_corpus,
    make_shards,
    plot_stages,
    run_evaluation,
    teach_vision,
    train_stage,
)


def _parse_args(argv: list[str] | None) -> DemoSettings:
    d = DemoSettings()
    p = argparse.ArgumentParser(prog="python -m vlm.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=d.data, help="folder for the synthetic corpus and its shards")
    p.add_argument("--out", default=d.out, help="folder for checkpoints, exports, plots and the report")
    p.add_argument("--pretrain", type=int, default=d.pretrain, help="caption records (pictures) for pretraining")
    p.add_argument("--sft", type=int, default=d.sft, help="multi-turn instruction records for SFT")
    p.add_argument("--eval", type=int, default=d.eval, help="held-out pictures (half with one shape)")
    p.add_argument("--eval_sft", type=int, default=d.eval_sft,
                   help="held-out SFT questions, the 17 question types in turn (0: none)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the corpus, data order and initial weights")
    p.add_argument("--vision_steps", type=int, default=d.vision_steps,
                   help="steps teaching the vision encoder before the VLM stages (0: learn only through the LM)")
    p.add_argument("--pretrain_epochs", type=int, default=d.pretrain_epochs, help="passes over the captions")
    p.add_argument("--sft_epochs", type=int, default=d.sft_epochs, help="passes over the instructions")
    p.add_argument("--pretrain_steps", type=int, help="stop pretraining after this many optimizer steps")
    p.add_argument("--sft_steps", type=int, help="stop SFT after this many optimizer steps")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="micro-batch per rank")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=d.dtype, help="training precision")
    p.add_argument("--ranks", type=int, default=d.ranks, help="data-parallel processes (deepspeed --num_gpus)")
    p.add_argument("--num_workers", type=int, default=d.num_workers, help="data-loader workers per rank")
    p.add_argument("--log_interval", type=int, default=d.log_interval, help="optimizer steps between log lines")
    p.add_argument("--table", type=int, default=d.table, help="held-out pictures to print with their answers")
    p.add_argument("--tiny", action="store_true", help="a smoke run: tiny corpus, a few steps (overrides sizes)")
    p.add_argument("--train_arg", action="append", default=[], dest="train_args", metavar="--SECTION.KEY=VALUE",
                   help="extra trainer flag for both stages, e.g. --train_arg=--train.learning_rate=5e-4")
    args = vars(p.parse_args(argv))
    tiny = args.pop("tiny")
    settings = DemoSettings(**args)
    if tiny:
        for key, value in TINY.items():
            setattr(settings, key, value)
        settings.train_args = TINY_TRAIN_ARGS + settings.train_args
    if min(settings.pretrain, settings.sft, settings.eval, settings.ranks, settings.batch_size) < 1:
        p.error("--pretrain, --sft, --eval, --ranks and --batch_size must be at least 1")
    if settings.eval_sft < 0:
        p.error("--eval_sft must be at least 0")
    return settings


def print_table(rows: list[dict], limit: int) -> None:
    """Some single-shape and some multi-shape pictures: file, truth, answer, right or wrong."""
    singles = [r for r in rows if r["shapes"] == 1]
    multis = [r for r in rows if r["shapes"] > 1]
    shown = singles[: limit - limit // 3] + multis[: limit // 3]
    width = max((len(", ".join(r["images"])) for r in shown), default=4)
    print(f"\n{'picture':<{width}}  {'':5}  truth / model answer")
    for r in shown:
        mark = "right" if r["right"] else "WRONG"
        print(f"{', '.join(r['images']):<{width}}  {mark:5}  {r['truth']}")
        print(f"{'':<{width}}  {'':5}  {r['answer']}")


def print_summary(report: dict, paths: DemoPaths) -> None:
    """The headline figures, the files written and a chat command to try."""
    single, multi = report["scores"]["single"], report["scores"]["multi"]
    print(f"\naccuracy (colour and kind right, {single['n']} held-out one-shape pictures): "
          f"{_fmt(report['accuracy'])}")
    print(f"multi-shape accuracy ({multi['n']} pictures with 2-3 shapes): {_fmt(report['multi_shape_accuracy'])}"
          f"   eval loss {report['eval_loss']:.3f}   wall time {report['wall_time_s']:.0f} s")
    asked = report.get("sft_scores")
    if asked:
        print(f"held-out SFT questions ({asked['overall']['n']}; attribute: the value asked for is right, "
              f"text-only accuracy {_fmt(report['text_only_accuracy'])}):")
        print("\n".join(question_table(asked, indent="  ")))
    vision = report.get("vision_stage")
    if vision:
        held = vision["held_out"]
        print(f"vision stage ({vision['steps']} steps on {vision['pictures']} pretrain pictures), held-out cells: "
              + "  ".join(f"{k} {_fmt(held[k])}" for k in ("position", "kind", "colour", "size"))
              + f"   pictures with every cell right {_fmt(held['pictures'])}"
              + (f"   unreadable samples skipped: {vision['skipped']}" if vision["skipped"] else ""))
    print(f"loss curves: {paths.loss_plot} (per stage: {paths.stage_out('pretrain') / 'loss.png'}, "
          f"{paths.stage_out('sft') / 'loss.png'})")
    print(f"weights: {paths.export} (Hugging Face folder), {paths.minimind} (MiniMind-V .pth)")
    print(f"report: {paths.report} (every answer: {paths.eval_json}"
          + (f", {paths.eval_sft_json})" if asked else ")"))
    picture = report["answers"][0]["images"][0] if report["answers"] else "PICTURE.jpg"
    print(f"chat: python -m vlm.chat --checkpoint {paths.export} --image {paths.eval_images / picture} "
          f"--prompt \"Describe the shapes.\"")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _environment() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "load_average_start": list(os.getloadavg()), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def run(settings: DemoSettings) -> dict:
    """Run every stage; returns the report (also written to out/report.json)."""
    paths = DemoPaths(Path(settings.data), Path(settings.out))
    paths.out.mkdir(parents=True, exist_ok=True)
    start, times, environment = time.perf_counter(), {}, _environment()
    bar = tqdm(total=len(STAGES), desc="demo", unit="stage", bar_format="{desc} {n_fmt}/{total_fmt} stages "
               "|{bar:20}| {elapsed}")
    evaluation, fresh_corpus, vision = None, False, None
    for name in STAGES:
        bar.set_description(f"demo: {name}")
        t = time.perf_counter()
        if name == "corpus":
            fresh_corpus = make_corpus(paths, settings)
        elif name == "shards":
            make_shards(paths, overwrite=fresh_corpus)
        elif name == "vision":
            vision = teach_vision(paths, settings)
        elif name in ("pretrain", "sft"):
            train_stage(name, paths, settings)
        elif name == "export":
            export_minimind(paths)
            plot_stages(paths)
        else:
            evaluation = run_evaluation(paths, settings)
        times[name] = round(time.perf_counter() - t, 1)
        bar.update(1)
    bar.close()
    environment["load_average_end"] = list(os.getloadavg())
    held, asked = evaluation["eval"], evaluation["eval_sft"]
    sft_scores = asked["sft_scores"] if asked else None
    report = {"accuracy": held["accuracy"], "multi_shape_accuracy": held["multi_shape_accuracy"],
              "sft_scores": sft_scores,
              "text_only_accuracy": sft_scores["by_group"].get("text", {}).get("attribute") if sft_scores else None,
              "eval_loss": held["loss"], "eval_perplexity": held["perplexity"],
              "eval_sft_loss": asked["loss"] if asked else None,
              "wall_time_s": round(time.perf_counter() - start, 1), "stage_times_s": times,
              "scores": held["scores"], "vision_stage": vision, "settings": vars(settings),
              "environment": environment,
              "paths": paths.listing()}
    paths.report.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report | {"answers": held["answers"]}


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code (1: a stage failed, its log named)."""
    settings = _parse_args(argv)
    try:
        report = run(settings)
    except StageError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    print_table(report["answers"], settings.table)
    print_summary(report, DemoPaths(Path(settings.data), Path(settings.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

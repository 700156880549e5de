"""The stages of `python -m vlm.demo`, each a function of the demo's paths and settings.

Training runs the real entry point in a child process (`python launch/train.py`, or `deepspeed --num_gpus N
launch/train.py` for several ranks), its output kept in the stage's `train.log` and its step counter shown
as a progress bar. Everything else runs in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlm.demo.settings import SPLITS, DemoPaths, DemoSettings

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "launch" / "train.py"
CONFIGS = REPO / "launch" / "configs"
_BAR = re.compile(r"train:.*?(\d+)/(\d+) \[")
NO_VISION_STAGE_ARGS = ["--model.vision_model=builtin:tiny", "--model.vision_trainable=true",
                        "--model.pixel_shuffle=1", "--train.trainable=all"]
"""Trainer flags of both VLM stages when --vision_steps is 0 (see launch/configs/demo_pretrain.yaml)."""
_LOG_LINE = re.compile(r"^step (\d+)/(\d+) loss ([0-9.naif]+)|eval loss ([0-9.naif]+)")


class StageError(RuntimeError):
    """A demo stage failed; the message says which and where its log is."""


def make_corpus(paths: DemoPaths, settings: DemoSettings) -> bool:
    """Write the synthetic corpus; reuse one already there with the same counts and seed. True if written."""
    from data_tools.synth import INFO_FILE, write_corpus

    counts = {"pretrain": settings.pretrain, "sft": settings.sft, "eval": settings.eval, "eval_sft": settings.eval_sft}
    info = paths.dataset / INFO_FILE
    if info.is_file():
        old = json.loads(info.read_text(encoding="utf-8"))
        if old.get("records") == counts and old.get("seed") == settings.seed and old.get("lang") == "en":
            return False
    write_corpus(paths.dataset, **counts, seed=settings.seed, lang="en", progress=False)
    return True


def make_shards(paths: DemoPaths, overwrite: bool) -> None:
    """Shard every split (data_tools.shard); an identical shard set already there is kept."""
    from data_tools import shard

    log = paths.data / "shards" / "shard.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        for split in SPLITS:
            argv = ["--jsonl", str(paths.dataset / f"{split}_data.jsonl"), "--images",
                    str(paths.dataset / f"{split}_images"), "--out", str(paths.shards(split)), "--prefix", split,
                    "--workers", str(min(2, os.cpu_count() or 1))]
            code = shard.main(argv + (["--overwrite"] if overwrite else []))
            if code != 0 and not overwrite:  # shards of an older corpus: make them again
                code = shard.main(argv + ["--overwrite"])
            if code != 0:
                raise StageError(f"sharding {split} failed; see {log}")


def trainer_command(ranks: int) -> list[str]:
    """The command that starts the trainer: python launch/train.py, or deepspeed --num_gpus N for N > 1."""
    if not TRAIN_SCRIPT.is_file():
        raise StageError(f"{TRAIN_SCRIPT} not found: run the demo from a checkout of the repository")
    if ranks == 1:
        return [sys.executable, str(TRAIN_SCRIPT)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).parent / "deepspeed"
    return [str(launcher), "--num_gpus", str(ranks), "--master_port", str(port), str(TRAIN_SCRIPT)]


def trainer_env(ranks: int) -> dict[str, str]:
    """The trainer's environment: CPU accelerator without a GPU, threads shared among the ranks."""
    import torch

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    # Ranks share the cores: without this each would start a thread per core and they would fight.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    return env


def train_args(stage: str, paths: DemoPaths, settings: DemoSettings) -> list[str]:
    """Trainer flags for one stage: the demo YAML, with paths and sizes from the demo's settings."""
    epochs = settings.pretrain_epochs if stage == "pretrain" else settings.sft_epochs
    steps = settings.pretrain_steps if stage == "pretrain" else settings.sft_steps
    sources = [paths.shards(stage)] + ([paths.shards("pretrain")] if stage == "sft" else [])  # as the YAMLs
    args = ["--config", str(CONFIGS / f"demo_{stage}.yaml"), "--out_dir", str(paths.stage_out(stage)),
            "--train_shards", ",".join(map(str, sources)), "--seed", str(settings.seed), "--epochs", str(epochs),
            "--batch_size", str(settings.batch_size), "--dtype", settings.dtype,
            "--num_workers", str(settings.num_workers), "--log_interval", str(settings.log_interval),
            "--resume", "never"]
    if steps is not None:
        args += ["--max_steps", str(steps)]
    if settings.vision_steps > 0:  # the encoder the vision stage taught, frozen (as the YAMLs say)
        args.append(f"--model.vision_model={paths.vision}")
    else:  # no vision stage: the random-init built-in encoder, trained through the language model
        args += NO_VISION_STAGE_ARGS
    if stage == "sft":
        args += ["--eval_shards", str(paths.shards("eval")),
                 f"--model.init_weights={paths.stage_out('pretrain') / 'export'}"]
    return args + list(settings.train_args)


def train_stage(stage: str, paths: DemoPaths, settings: DemoSettings) -> None:
    """Train one stage from scratch in a child process (an earlier run's out_dir for it is replaced)."""
    out_dir = paths.stage_out(stage)
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    cmd = trainer_command(settings.ranks) + train_args(stage, paths, settings)
    run_logged(cmd, trainer_env(settings.ranks), out_dir / "train.log", stage)


def run_logged(cmd: list[str], env: dict[str, str], log: Path, stage: str) -> None:
    """Run `cmd`, writing its output to `log` and following its step counter with a progress bar."""
    bar = tqdm(desc=f"  {stage}", unit="step", leave=True, dynamic_ncols=True)
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        pending = b""
        for chunk in iter(lambda: os.read(proc.stdout.fileno(), 65536), b""):
            *pieces, pending = re.split(rb"[\r\n]", pending + chunk)
            for piece in pieces:
                _follow(piece.decode("utf-8", "replace"), bar, f)
        _follow(pending.decode("utf-8", "replace"), bar, f)
        code = proc.wait()
    bar.close()
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8").splitlines()[-15:])
        raise StageError(f"the {stage} stage failed (exit code {code}); the end of {log}:\n{tail}")


def _follow(line: str, bar: tqdm, log: Any) -> None:
    """Move the bar on the trainer's own progress lines; keep every other line in the log."""
    progress = _BAR.search(line)
    if progress:
        bar.total = int(progress.group(2))
        bar.n = int(progress.group(1))
        bar.refresh()
        return
    if line.strip():
        log.write(line + "\n")
    logged = _LOG_LINE.search(line)
    if logged and logged.group(3):
        bar.set_postfix_str(f"loss {logged.group(3)}")
    elif logged:
        bar.set_postfix_str(f"eval loss {logged.group(4)}")


def teach_vision(paths: DemoPaths, settings: DemoSettings) -> dict | None:
    """The `vision` stage (see vlm.demo.vision); None when --vision_steps is 0."""
    if settings.vision_steps <= 0:
        return None
    from vlm.demo.vision import train_vision_encoder

    if paths.vision.is_dir():
        shutil.rmtree(paths.vision)
    try:
        return train_vision_encoder(paths.shards("pretrain"), paths.shards("eval"), paths.vision,
                                    steps=settings.vision_steps, batch_size=settings.batch_size, seed=settings.seed)
    except ValueError as err:  # no one-shape captions to learn from: say so instead of a traceback
        raise StageError(f"vision stage: {err} (or run with --vision_steps 0)") from err


def export_minimind(paths: DemoPaths) -> None:
    """The SFT result in MiniMind-V's .pth format too (the trainer already wrote the Hugging Face folder)."""
    from vlm.export import main as export_main

    log = paths.stage_out("sft") / "export.log"
    with open(log, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        code = export_main(["--checkpoint", str(paths.stage_out("sft")), "--format", "minimind",
                            "--out", str(paths.minimind)])
    if code != 0:
        raise StageError(f"export failed; see {log}")


def plot_stages(paths: DemoPaths) -> None:
    """One picture of both stages' training loss (SFT steps after the pretraining ones) and the eval loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    offset = 0
    for stage in ("pretrain", "sft"):
        metrics = paths.stage_out(stage) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        train = [(offset + r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        evals = [(offset + r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
        if train:
            ax.plot(*zip(*train), label=f"{stage} loss", linewidth=1.2)
        if evals:
            ax.plot(*zip(*evals), "o", label="held-out loss")
        offset = max([offset] + [s for s, _ in train + evals])
    ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel="loss (log scale)", title="demo: pretrain, then SFT")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths.loss_plot)
    plt.close(fig)


def run_evaluation(paths: DemoPaths, settings: DemoSettings) -> dict[str, dict | None]:
    """Held-out loss and answers of the exported SFT model on the eval pictures (written to eval.json) and
    on the held-out SFT questions (eval_sft.json); {"eval": report, "eval_sft": report, None with
    --eval_sft 0}."""
    from vlm.eval import evaluate, records_from_jsonl
    from vlm.inference import load_model

    vlm = load_model(paths.export)
    reports: dict[str, dict | None] = {"eval": None, "eval_sft": None}
    # Longest expected replies: 30 tokens either way. A question's prompts vary in length, so its answers are
    # generated in many small batches, each running to the limit unless every reply in it has ended.
    for split, out, max_new_tokens in (("eval", paths.eval_json, 96), ("eval_sft", paths.eval_sft_json, 48)):
        if split == "eval_sft" and settings.eval_sft == 0:
            continue
        records, _ = records_from_jsonl(paths.dataset / f"{split}_data.jsonl", paths.dataset / f"{split}_images")
        reports[split] = evaluate(vlm, records, batch_size=64, max_new_tokens=max_new_tokens)
        out.write_text(json.dumps(reports[split], indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return reports

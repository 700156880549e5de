"""The demo end to end (tiny), its stage helpers, and the README's make targets."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from vlm.demo import driver as demo
from vlm.demo.settings import STAGES, DemoPaths
from vlm.demo.stages import make_corpus, make_shards, train_args, trainer_command

REPO = Path(__file__).resolve().parents[2]


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_tiny_demo_trains_both_stages_exports_and_reports(tmp_path, capsys):
    out = tmp_path / "out"
    code = demo.main(["--tiny", "--data", str(tmp_path / "data"), "--out", str(out), "--table", "4"])
    assert code == 0

    report = json.loads((out / "report.json").read_text())
    assert {"accuracy", "multi_shape_accuracy", "eval_loss", "wall_time_s", "stage_times_s"} <= report.keys()
    assert list(report["stage_times_s"]) == list(STAGES)
    assert report["scores"]["single"]["n"] == 8 and report["scores"]["multi"]["n"] == 8
    assert 0 < report["eval_loss"] < 20 and 0 <= report["accuracy"] <= 1
    for stage in ("pretrain", "sft"):
        losses = [r["loss"] for r in _metrics(out / stage) if r.get("loss") is not None]
        assert len(losses) >= 2 and losses[-1] < losses[0], (stage, losses)
        assert (out / stage / "loss.png").is_file() and (out / stage / "train.log").is_file()
    assert any("eval_loss" in r for r in _metrics(out / "sft"))
    assert (out / "sft" / "export" / "config.json").is_file() and (out / "demo_vlm.pth").is_file()
    assert (out / "loss.png").is_file()
    assert len(json.loads((out / "eval.json").read_text())["answers"]) == 16

    printed = capsys.readouterr().out
    assert "accuracy (colour and kind right, 8 held-out one-shape pictures)" in printed
    assert str(out / "report.json") in printed and str(out / "loss.png") in printed
    assert len(re.findall(r"^eval_\d{6}\.(?:jpg|png) +(?:right|WRONG) ", printed, re.M)) == 4


def test_the_corpus_is_reused_when_the_settings_match(tmp_path):
    paths = DemoPaths(tmp_path / "data", tmp_path / "out")
    settings = demo.DemoSettings(pretrain=6, sft=4, eval=2)
    assert make_corpus(paths, settings) is True
    make_shards(paths, overwrite=True)
    assert make_corpus(paths, settings) is False
    make_shards(paths, overwrite=False)  # identical shards already there: kept
    manifest = json.loads((paths.shards("sft") / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"]) == 4
    settings.sft = 5
    assert make_corpus(paths, settings) is True
    make_shards(paths, overwrite=False)  # the older shards are replaced, not refused
    manifest = json.loads((paths.shards("sft") / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"]) == 5


def test_trainer_arguments_follow_the_settings(tmp_path):
    paths = DemoPaths(tmp_path / "d", tmp_path / "o")
    settings = demo.DemoSettings(sft_steps=7, train_args=["--train.learning_rate=1e-4"])
    args = train_args("sft", paths, settings)
    # SFT mixes in the caption pairs, as demo_sft.yaml does (its train_weights then match)
    assert args[args.index("--train_shards") + 1] == f"{paths.shards('sft')},{paths.shards('pretrain')}"
    pretrain_args = train_args("pretrain", paths, settings)
    assert pretrain_args[pretrain_args.index("--train_shards") + 1] == str(paths.shards("pretrain"))
    assert f"--model.vision_model={paths.vision}" in pretrain_args
    assert not any(a.startswith("--model.vision_model") for a in train_args("sft", paths, settings))
    settings.vision_steps = 0  # no vision stage: pretraining starts from the YAML's random tiny encoder
    assert not any(a.startswith("--model.vision_model") for a in train_args("pretrain", paths, settings))
    assert args[args.index("--max_steps") + 1] == "7" and args[-1] == "--train.learning_rate=1e-4"
    assert f"--model.init_weights={paths.out / 'pretrain' / 'export'}" in args
    assert "--max_steps" not in train_args("pretrain", paths, settings)
    assert trainer_command(2)[1:3] == ["--num_gpus", "2"] and trainer_command(1)[-1].endswith("launch/train.py")


def test_tiny_preset_and_option_checks():
    settings = demo._parse_args(["--tiny", "--seed", "3"])
    assert settings.pretrain_steps == demo.TINY["pretrain_steps"] and settings.seed == 3
    with pytest.raises(SystemExit):
        demo._parse_args(["--ranks", "0"])


def _code_spans(markdown: str) -> list[str]:
    fenced = re.findall(r"```.*?\n(.*?)```", markdown, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", markdown, flags=re.S))
    return fenced + inline


@pytest.mark.parametrize("document", ["README.md"] + sorted(str(p.relative_to(REPO)) for p in REPO.glob("docs/*.md")))
def test_every_make_target_named_in_the_docs_exists(document):
    path = REPO / document
    listed = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout
    targets = {line.split()[0] for line in listed.splitlines() if line.strip()}
    named = {m for span in _code_spans(path.read_text()) for m in re.findall(r"\bmake ([a-z][\w-]*)", span)}
    assert "demo" in targets and "test" in targets
    assert named, f"{document} names no make target"
    assert named <= targets, f"{document} names make targets that `make help` does not list: {named - targets}"

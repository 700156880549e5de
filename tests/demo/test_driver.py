"""The demo end to end (tiny), its stage helpers, and the README's make targets."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from vlm.demo import driver as demo
from vlm.demo.settings import STAGES, DemoPaths
from vlm.demo.stages import NO_VISION_STAGE_ARGS, make_corpus, make_shards, train_args, trainer_command

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
    asked = report["sft_scores"]
    assert asked["overall"]["n"] == 34 and len(asked["by_type"]) == 17
    assert {g: row["n"] for g, row in asked["by_group"].items()} == {"single": 14, "pair": 8, "text": 12}
    assert report["text_only_accuracy"] == asked["by_group"]["text"]["attribute"]
    assert len(json.loads((out / "eval_sft.json").read_text())["answers"]) == 34

    printed = capsys.readouterr().out
    assert "accuracy (colour and kind right, 8 held-out one-shape pictures)" in printed
    assert str(out / "report.json") in printed and str(out / "loss.png") in printed
    assert len(re.findall(r"^eval_\d{6}\.(?:jpg|png) +(?:right|WRONG) ", printed, re.M)) == 4
    assert re.search(r"^  question type +n +attribute +exact$", printed, re.M)
    assert len(re.findall(r"^  (?:single|pair|text)/\w+ +2 ", printed, re.M)) == 17


def test_the_corpus_is_reused_when_the_settings_match(tmp_path):
    paths = DemoPaths(tmp_path / "data", tmp_path / "out")
    settings = demo.DemoSettings(pretrain=6, sft=4, eval=2, eval_sft=3)
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
    assert make_corpus(paths, settings) is False
    settings.eval_sft = 4  # the held-out questions are part of the corpus too (never sharded)
    assert make_corpus(paths, settings) is True
    assert len((paths.dataset / "eval_sft_data.jsonl").read_text().splitlines()) == 4
    assert not paths.shards("eval_sft").exists()


def test_trainer_arguments_follow_the_settings(tmp_path):
    paths = DemoPaths(tmp_path / "d", tmp_path / "o")
    settings = demo.DemoSettings(sft_steps=7, train_args=["--train.learning_rate=1e-4"])
    args = train_args("sft", paths, settings)
    # SFT mixes in the caption pairs, as demo_sft.yaml does (its train_weights then match)
    assert args[args.index("--train_shards") + 1] == f"{paths.shards('sft')},{paths.shards('pretrain')}"
    pretrain_args = train_args("pretrain", paths, settings)
    assert pretrain_args[pretrain_args.index("--train_shards") + 1] == str(paths.shards("pretrain"))
    # Both stages read the encoder the vision stage taught (frozen, as the YAMLs say)
    assert f"--model.vision_model={paths.vision}" in pretrain_args and f"--model.vision_model={paths.vision}" in args
    assert not set(NO_VISION_STAGE_ARGS) & set(args)
    settings.vision_steps = 0  # no vision stage: both stages train the random built-in encoder instead
    for stage in ("pretrain", "sft"):
        no_vision = train_args(stage, paths, settings)
        assert not any(a.startswith(f"--model.vision_model={paths.vision}") for a in no_vision)
        assert set(NO_VISION_STAGE_ARGS) <= set(no_vision) and no_vision[-1] == "--train.learning_rate=1e-4"
    assert args[args.index("--max_steps") + 1] == "7" and args[-1] == "--train.learning_rate=1e-4"
    assert f"--model.init_weights={paths.out / 'pretrain' / 'export'}" in args
    assert "--max_steps" not in train_args("pretrain", paths, settings)
    assert trainer_command(2)[1:3] == ["--num_gpus", "2"] and trainer_command(1)[-1].endswith("launch/train.py")


def test_tiny_preset_and_option_checks():
    settings = demo._parse_args(["--tiny", "--seed", "3"])
    assert settings.pretrain_steps == demo.TINY["pretrain_steps"] and settings.seed == 3
    assert settings.eval_sft == 34 and demo._parse_args(["--eval_sft", "0"]).eval_sft == 0
    with pytest.raises(SystemExit):
        demo._parse_args(["--ranks", "0"])
    with pytest.raises(SystemExit):
        demo._parse_args(["--eval_sft", "-1"])


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

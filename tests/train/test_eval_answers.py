"""The trainer's periodic generated answers (vlm.train.eval_answers): the same greedy answer as inference, and a
real run logging them next to their references at every evaluation."""

from __future__ import annotations

import json

import pytest

from tests.data.shard_fixtures import write_shards
from tests.tiny_vlm import picture, save_tiny_vlm
from vlm.inference import GenerationSettings, load_model
from vlm.train.cli import main
from vlm.train.eval_answers import greedy_reply


def test_greedy_reply_is_the_inference_answer(tiny_vision_dir, tmp_path):
    vlm = load_model(save_tiny_vlm(tiny_vision_dir, tmp_path)[0])
    turns = [{"role": "user", "content": "<image>\nDescribe the shapes."}]
    image = picture((200, 30, 30))
    reply = greedy_reply(vlm.model, vlm.prompt_ids(turns, 1), vlm.pixels([image]), max_new_tokens=6)
    assert len(reply) > 0
    assert vlm.tokenizer.decode(reply, skip_special_tokens=True) == vlm.generate(
        turns, [image], GenerationSettings(max_new_tokens=6))


def test_a_run_logs_generated_answers_with_their_references_at_each_evaluation(tmp_path, launch_env, capsys):
    train = write_shards(tmp_path / "train", [24], images_of=lambda i: 1)
    held_out = write_shards(tmp_path / "eval", [6], prefix="e", images_of=lambda i: i % 2)
    out = tmp_path / "run"
    code = main(["--config", "launch/configs/debug.yaml", "--train_shards", str(train), "--eval_shards",
                 str(held_out), "--out_dir", str(out), "--max_steps", "4", "--train.eval_interval=2",
                 "--train.eval_answers=3", "--train.eval_answer_tokens=5"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "eval_answers" in r]
    assert [r["step"] for r in logged] == [2, 4]  # the end's evaluation is step 4's: no second one
    for record in logged:
        rows = record["eval_answers"]
        assert [r["key"] for r in rows] == ["e_000000001", "e_000000002", "e_000000003"]
        assert [r["reference"] for r in rows] == [f"Picture number {i}." for i in range(3)]
        assert [r["prompt"] for r in rows] == [f"{'<image>' * (i % 2)}\nWhat is picture {i}?" for i in range(3)]
        assert all(isinstance(r["answer"], str) and 0 <= r["token_f1"] <= 1 for r in rows)
        assert record["eval_answers_token_f1"] == pytest.approx(sum(r["token_f1"] for r in rows) / 3)
    assert any(r.get("eval_loss") is not None for r in records)
    console = capsys.readouterr().out
    assert console.count("eval answer e_000000001") == 2 and "reference: Picture number 2." in console


def test_eval_answers_zero_logs_none(tmp_path, launch_env):
    train = write_shards(tmp_path / "train", [16], images_of=lambda i: 1)
    held_out = write_shards(tmp_path / "eval", [4], prefix="e", images_of=lambda i: 1)
    out = tmp_path / "run"
    assert main(["--config", "launch/configs/debug.yaml", "--train_shards", str(train), "--eval_shards",
                 str(held_out), "--out_dir", str(out), "--max_steps", "2", "--train.eval_answers=0"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any("eval_answers" in r for r in records) and any("eval_loss" in r for r in records)


@pytest.mark.slow
def test_two_ranks_under_zero_3_and_zero_2_generate_together_and_rank_0_logs(tmp_path):
    """Every rank generates (transformers' synced_gpus): no rank is left in a collective, even when ZeRO-3
    gathers the weights in each forward pass."""
    from tests.launching import deepspeed_cmd, run, tail

    train = write_shards(tmp_path / "train", [32], images_of=lambda i: 1)
    held_out = write_shards(tmp_path / "eval", [6], prefix="e", images_of=lambda i: i % 2)
    outs = {stage: tmp_path / f"zero{stage}" for stage in (3, 2)}
    runs = [["--config", "launch/configs/debug.yaml", "--train_shards", str(train), "--eval_shards", str(held_out),
             "--out_dir", str(out), "--zero_stage", str(stage), "--max_steps", "2", "--train.eval_interval=1",
             "--train.eval_answers=3", "--train.eval_answer_tokens=6"] for stage, out in outs.items()]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    result = run(deepspeed_cmd("tests/train/multi_run.py", [str(tmp_path / "runs.json")]), timeout=600)
    assert result.returncode == 0, tail(result)
    for out in outs.values():
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in records if "eval_answers" in r]
        assert [r["step"] for r in logged] == [1, 2]  # once per evaluation: rank 0 alone writes
        assert all(len(r["eval_answers"]) == 3 for r in logged)

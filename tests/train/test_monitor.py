"""The metrics writer: every metric of metrics.jsonl reaches TensorBoard and the CSV at its optimizer step (read
back from the files a real run writes), a resume leaves one value per step, and a monitor whose package is
missing stops the run in the preflight, by name, before the model is built."""

from __future__ import annotations

import csv
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from tests.data.shard_fixtures import write_shards
from tests.launching import REPO
from vlm.config import ConfigError, TrainConfig, config_problems, load_config
from vlm.data.plan import Geometry
from vlm.train import monitor, preflight
from vlm.train.checkpoint import checkpoint_root, tag_for
from vlm.train.cli import main
from vlm.train.ds_config import build_ds_config

DEBUG = str(REPO / "launch" / "configs" / "debug.yaml")
TINY_SHARDS = REPO / "tests" / "fixtures" / "tiny_shards"  # 6 samples in 2 shards
SINGLE = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # Two corrupt samples: the data pipeline drops them, and bad_samples counts them (an epoch is 10 steps).
    broken = {3: {"json": b"{not json"}, 17: {"json": b"{not json"}}
    return write_shards(tmp_path_factory.mktemp("mon") / "shards", [20, 20], special=broken, images_of=lambda i: 1)


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("mon_eval") / "eval", [4], prefix="e", images_of=lambda i: 1)


def train(shards: Path, out: Path, *flags: str) -> int:
    return main(["--config", DEBUG, "--train_shards", str(shards), "--out_dir", str(out), *flags])


def last_values(out: Path) -> dict[int, dict]:
    """metrics.jsonl flattened as the writer does, per step: the last value of each metric (a resumed run
    appends its records; an eval record adds eval_loss to its step)."""
    steps: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["step"], {}).update(monitor.flatten(record))
    return steps


def tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out / "logs" / "tensorboard"), size_guidance={SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def csv_rows(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (out / "logs" / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def assert_monitors_match_jsonl(out: Path) -> None:
    expected = last_values(out)
    scalars = tensorboard_scalars(out)
    wanted = {name: [(step, v) for step, values in sorted(expected.items())
                     for n, v in values.items() if n == name and v is not None]
              for name in {n for values in expected.values() for n in values}}
    wanted = {name: points for name, points in wanted.items() if points}
    assert set(scalars) == set(wanted)
    for name, points in wanted.items():  # TensorBoard keeps float32
        assert [s for s, _ in scalars[name]] == [s for s, _ in points], name
        assert [v for _, v in scalars[name]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-12), name
    header, rows = csv_rows(out)
    assert header[0] == "step" and set(header[1:]) == {n for values in expected.values() for n in values}
    assert [int(r["step"]) for r in rows] == sorted(expected)  # one row per step, in order
    for row in rows:
        values = expected[int(row["step"])]
        for name in header[1:]:
            value = values.get(name)
            if value is None:
                assert row[name] == "", (row["step"], name)
            else:
                assert float(row[name]) == value, (row["step"], name)  # the CSV keeps every digit


def test_a_run_writes_every_metric_to_tensorboard_and_the_csv_at_its_optimizer_step(shards, eval_shards, tmp_path,
                                                                                   launch_env):
    out = tmp_path / "o"
    # The whole epoch (10 steps), logged every 2 steps and evaluated every 3 and at the end: step 3 has an
    # eval-only row; the evals of steps 6 and 10 fill their log rows in.
    assert train(shards, out, "--max_steps", "null", "--log_interval", "2", "--eval_shards", str(eval_shards),
                 "--train.eval_interval=3") == 0
    expected = last_values(out)
    assert sorted(expected) == [2, 3, 4, 6, 8, 9, 10]
    assert {"epoch", "eval_loss"} <= set(expected[3]) and "loss" not in expected[3]  # an eval-only step
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "memory_gb", "data_wait_share",
            "eta_s", "skipped_steps", "samples_skipped/nonfinite_loss", "bad_samples", "eval_loss"} <= set(expected[10])
    assert expected[10]["bad_samples"] == 2
    assert_monitors_match_jsonl(out)
    assert not (out / "logs" / "train").exists()  # DeepSpeed's own monitor stays off


def test_a_resume_leaves_one_value_per_step(shards, tmp_path, launch_env):
    out = tmp_path / "o"
    assert train(shards, out, "--max_steps", "4", "--save_interval", "2") == 0
    shutil.rmtree(checkpoint_root(out) / tag_for(4))  # as if killed after logging steps 3 and 4
    assert train(shards, out, "--max_steps", "4", "--save_interval", "2") == 0  # resumes at 2, logs 3 and 4 again
    assert sum(json.loads(line)["step"] == 4 for line in (out / "metrics.jsonl").read_text().splitlines()) == 2
    assert_monitors_match_jsonl(out)  # the resumed run's values: one CSV row and one TensorBoard point per step


def test_the_csv_adds_columns_fills_in_the_last_row_and_drops_steps_after_a_resume_point(tmp_path):
    path = tmp_path / "logs" / "metrics.csv"
    writer = monitor.CsvMonitor(path, start_step=0)
    writer.write(1, {"loss": 2.5, "mfu": None})
    writer.write(2, {"loss": 2.25, "mfu": None})
    writer.write(2, {"eval_loss": 2.0})  # a new column, into the last row
    writer.write(3, {"loss": 0.1 + 0.2, "mfu": None})
    writer.write(3, {"eval_loss": 1.5})  # the last row again, now without a new column
    assert path.read_text() == ("step,loss,mfu,eval_loss\n1,2.5,,\n2,2.25,,2.0\n3,0.30000000000000004,,1.5\n")
    monitor.CsvMonitor(path, start_step=2).write(3, {"loss": 1.0})  # a resume from step 2
    assert path.read_text() == "step,loss,mfu,eval_loss\n1,2.5,,\n2,2.25,,2.0\n3,1.0,,\n"


def test_flatten_names_nested_counts_and_leaves_out_the_step():
    record = {"step": 7, "loss": float("nan"), "samples_skipped": {"nonfinite_loss": 3}, "flag": True, "lr": None}
    assert monitor.flatten(record) == {"loss": None, "samples_skipped/nonfinite_loss": 3, "flag": 1, "lr": None}


def test_wandb_gets_every_number_at_its_step_in_a_run_a_resume_continues(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = TrainConfig(monitors=[], wandb_project="vlm")
    writer = monitor.MetricsWriter(tmp_path, cfg, enabled=True, start_step=4, run_id="abc", config={"x": 1})
    writer.write({"step": 5, "loss": 1.5, "mfu": None, "samples_skipped": {"nonfinite_loss": 0}})
    writer.close()
    init = calls[0][1]
    assert (init["project"], init["id"], init["resume"], init["config"]) == ("vlm", "abc", "allow", {"x": 1})
    assert calls[1:] == [("log", {"loss": 1.5, "samples_skipped/nonfinite_loss": 0.0}, 5), ("finish",)]
    assert not (tmp_path / "logs" / "metrics.csv").exists()  # train.monitors: [] writes no CSV


def _without(monkeypatch, *packages: str) -> None:
    real = monitor.importlib.util.find_spec
    monkeypatch.setattr(monitor.importlib.util, "find_spec", lambda name, *a: None if name in packages else real(name, *a))


def test_a_monitor_without_its_package_is_a_preflight_problem_naming_it(tmp_path, monkeypatch):
    _without(monkeypatch, "tensorboard", "wandb")
    cfg = load_config(DEBUG, {"train_shards": str(TINY_SHARDS), "out_dir": str(tmp_path / "o"),
                              "batch_size": "1", "train.wandb_project": "vlm"})
    report = preflight.run_checks(cfg, SINGLE, load=False)
    problems = [f.message for f in report.findings if f.check == "monitors"]
    assert len(problems) == 2 and all(f.level == preflight.PROBLEM for f in report.findings if f.check == "monitors")
    assert "the tensorboard package is not installed: pip install tensorboard" in problems[0]
    assert "remove 'tensorboard' from train.monitors" in problems[0]
    assert "train.wandb_project is 'vlm' but the wandb package is not installed: pip install wandb" in problems[1]
    cfg.train.monitors, cfg.train.wandb_project = ["csv"], None
    assert not [f for f in preflight.run_checks(cfg, SINGLE, load=False).findings if f.check == "monitors"]


def test_wandb_project_without_wandb_stops_the_run_before_the_model_is_built(tmp_path, monkeypatch, capsys,
                                                                           launch_env):
    _without(monkeypatch, "wandb")
    monkeypatch.setattr("vlm.train.trainer.build", lambda cfg: pytest.fail("the model was built"))
    assert train(TINY_SHARDS, tmp_path / "o", "--batch_size", "1",
                 "--train.wandb_project", "vlm") == 2
    err = capsys.readouterr().err
    assert "pip install wandb" in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "wandb" in line] == [
        "  - rank 0: monitors: train.wandb_project is 'vlm' but the wandb package is not installed: "
        "pip install wandb (or unset train.wandb_project)"]


def test_monitor_names_are_checked_and_deepspeed_monitors_are_refused(tmp_path):
    cfg = load_config(DEBUG, {"train.monitors": "csv,wandb"})
    assert any("train.monitors must be distinct names out of ('csv', 'tensorboard')" in p for p in config_problems(cfg))
    ds = build_ds_config(TrainConfig(dtype="float32"), Geometry(1, 0, 2), on_cpu=True)
    assert not {"csv_monitor", "tensorboard", "wandb", "comet"} & set(ds)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "tensorboard": {"enabled": True}}))
    with pytest.raises(ConfigError, match="remove 'tensorboard' from the DeepSpeed config"):
        build_ds_config(TrainConfig(dtype="float32", deepspeed_config=str(path)), Geometry(1, 0, 2), on_cpu=True)

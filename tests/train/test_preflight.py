"""The preflight report: every check names what is wrong, without starting a process group."""

import pytest
import torch
import torch.distributed

from tests.launching import REPO
from vlm import doctor
from vlm.config import ConfigError, load_config
from vlm.train import preflight

DEBUG = REPO / "launch" / "configs" / "debug.yaml"
TINY_SHARDS = REPO / "tests" / "fixtures" / "tiny_shards"  # 6 samples in 2 shards
SINGLE = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def config(tmp_path, **overrides):
    base = {"train_shards": str(TINY_SHARDS), "out_dir": str(tmp_path / "out"), "batch_size": "1"}
    return load_config(DEBUG, {**base, **overrides})


def findings(report, check, level=preflight.PROBLEM):
    return [f.message for f in report.findings if f.check == check and f.level == level]


def test_a_good_config_is_ready_and_starts_no_process_group(tmp_path):
    report = preflight.run_checks(config(tmp_path), SINGLE, load=False)
    assert report.problems == [], report.render("")
    assert {f.check for f in report.findings} == {"config", "launcher", "batch", "cpus", "files", "out_dir"}
    assert "6 samples per epoch = 6 steps" in findings(report, "batch", preflight.OK)[0]
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "out").exists()  # the doctor writes nothing into out_dir


def test_batch_larger_than_the_data_is_a_problem(tmp_path):
    report = preflight.run_checks(config(tmp_path, batch_size="4"), SINGLE, world_size=2, load=False)
    (message,) = findings(report, "batch")
    assert "global batch 4 x 1 x 2 ranks = 8" in message and "only 6 samples" in message


def test_world_size_flag_and_launcher_world_size_both_count(tmp_path):
    env = {**SINGLE, "RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert findings(preflight.run_checks(config(tmp_path), env, load=False), "batch")  # 8 ranks > 6 samples
    report = preflight.run_checks(config(tmp_path), env, world_size=2, load=False)
    assert "differs from the launcher's WORLD_SIZE 8" in findings(report, "launcher", preflight.WARNING)[0]


def test_missing_files_are_each_named(tmp_path):
    cfg = config(tmp_path, **{"model.tokenizer": str(tmp_path / "no_tok"), "train.trainable": "projector+lm",
                              "model.vision_model": str(tmp_path / "no_clip"),
                              "model.init_weights": str(tmp_path / "lm.pth"),
                              "train.deepspeed_config": str(tmp_path / "ds.json"),
                              "eval_shards": str(tmp_path / "no_eval")})
    cfg.model.vision_trainable = False
    problems = "\n".join(findings(preflight.run_checks(cfg, SINGLE, load=False), "files"))
    for name in ("no_tok", "no_clip", "lm.pth", "ds.json", "no_eval"):
        assert name in problems, (name, problems)


def test_missing_shards_are_a_data_problem(tmp_path):
    report = preflight.run_checks(config(tmp_path, train_shards=str(tmp_path / "nowhere")), SINGLE, load=False)
    assert "nowhere" in findings(report, "data")[0]


def test_weights_that_do_not_load_or_do_not_fit_are_problems(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    report = preflight.run_checks(config(tmp_path, **{"model.init_weights": str(garbage)}), SINGLE, load=True)
    (message,) = findings(report, "files")
    assert message.startswith(f"model.init_weights: {garbage} does not load")
    other_model = tmp_path / "other.pth"
    torch.save({"bogus.weight": torch.zeros(2)}, other_model)
    report = preflight.run_checks(config(tmp_path, **{"model.init_weights": str(other_model)}), SINGLE, load=True)
    (message,) = findings(report, "files")
    assert "building the model failed" in message and "bogus.weight" in message


def test_loading_a_good_config_counts_parameters(tmp_path):
    report = preflight.run_checks(config(tmp_path), SINGLE, load=True)
    assert report.problems == []
    assert "parameters" in findings(report, "files", preflight.OK)[-1]
    assert "one checkpoint is about" in findings(report, "out_dir", preflight.OK)[0]


def test_out_dir_that_cannot_be_written_is_a_problem(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    report = preflight.run_checks(config(tmp_path, out_dir=str(blocker / "out")), SINGLE, load=False)
    assert "is not a folder" in findings(report, "out_dir")[0]
    # /proc takes no new files, not even from root (CI runs as root, so chmod would not do)
    report = preflight.run_checks(config(tmp_path, out_dir="/proc/vlm-doctor-out"), SINGLE, load=False)
    assert "cannot write in /proc" in findings(report, "out_dir")[0]


def test_inconsistent_launcher_variables_are_problems(tmp_path):
    cfg = config(tmp_path)
    cases = [
        ("RANK=3 is outside", {**SINGLE, "RANK": "3", "WORLD_SIZE": "2"}),
        ("MASTER_PORT='http'", {**SINGLE, "MASTER_PORT": "http"}),
        ("not integers", {**SINGLE, "WORLD_SIZE": "two"}),
        ("left over in the environment", {**SINGLE, "SLURM_PROCID": "2", "SLURM_NTASKS": "4"}),
        ("not by srun", {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}),  # the batch script
        ("does not resolve", {**SINGLE, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-host.invalid"}),
        ("does not resolve", {**SINGLE, "MASTER_ADDR": "no-such-host.invalid"}),  # checked before a launch
    ]
    for expected, env in cases:
        problems = findings(preflight.run_checks(cfg, env, load=False), "launcher")
        assert any(expected in p for p in problems), (expected, problems)


def test_slurm_variables_are_understood(tmp_path):
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
           "MASTER_ADDR": "localhost", "MASTER_PORT": "20017"}
    report = preflight.run_checks(config(tmp_path), env, load=False)
    assert findings(report, "launcher", preflight.OK) == ["slurm: rank 1 of 2, local rank 0, master localhost:20017"]


def test_workers_shards_and_steps_warnings(tmp_path):
    report = preflight.run_checks(config(tmp_path, num_workers="8", max_steps="100"), SINGLE, load=False)
    warnings = "\n".join(findings(report, "batch", preflight.WARNING))
    assert "data.num_workers 8 is more than the 6 micro-batches" in warnings
    assert "train.max_steps 100 is more than epochs x steps per epoch = 6" in warnings
    stream = str(TINY_SHARDS / "tiny-{000000..000001}.tar")
    cfg = config(tmp_path, train_shards=stream, num_workers="2", **{"data.samples_per_epoch": "64"})
    report = preflight.run_checks(cfg, SINGLE, world_size=2, load=False)
    assert "2 shard(s) for 4 readers" in findings(report, "data", preflight.WARNING)[0]


def test_fewer_cpus_than_workers_plus_one_is_a_warning(tmp_path, monkeypatch):
    """What srun without --cpus-per-task can do to a rank: pin it and its workers to fewer CPUs."""
    monkeypatch.setattr(preflight.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    report = preflight.run_checks(config(tmp_path, num_workers="4"), SINGLE, load=False)
    (message,) = findings(report, "cpus", preflight.WARNING)
    assert "may use 2 CPU(s)" in message and "data.num_workers 4" in message
    assert "lower data.num_workers to 1" in message and "--cpus-per-task=5" in message and "VLM_SRUN_ARGS" in message
    report = preflight.run_checks(config(tmp_path, num_workers="1"), SINGLE, load=False)
    assert findings(report, "cpus", preflight.WARNING) == []
    assert findings(report, "cpus", preflight.OK) == ["2 CPU(s) for this rank and its 1 DataLoader worker(s)"]
    # Eight ranks a launcher started on one node share the CPUs each of them sees (unless srun pinned them).
    monkeypatch.setattr(preflight.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    local = {**SINGLE, "LOCAL_WORLD_SIZE": "8"}
    (message,) = findings(preflight.run_checks(config(tmp_path, num_workers="4"), local, load=False), "cpus",
                          preflight.WARNING)
    assert "may use 2 CPU(s) (16 seen, shared by 8 ranks on this node)" in message
    pinned = {**local, "SLURM_STEP_ID": "0"}
    assert findings(preflight.run_checks(config(tmp_path, num_workers="4"), pinned, load=False), "cpus",
                    preflight.WARNING) == []
    monkeypatch.delattr(preflight.os, "sched_getaffinity", raising=False)  # macOS and Windows have no affinity
    monkeypatch.setattr(preflight.os, "cpu_count", lambda: 1)
    report = preflight.run_checks(config(tmp_path, num_workers="1"), SINGLE, load=False)
    assert "may use 1 CPU(s)" in findings(report, "cpus", preflight.WARNING)[0]


def test_cli_prints_one_report_and_exits_non_zero_on_problems(tmp_path, capsys):
    args = ["--config", str(DEBUG), "--train_shards", str(TINY_SHARDS), "--out_dir", str(tmp_path / "o")]
    assert doctor.main([*args, "--batch_size", "1", "--quick"]) == 0
    assert "ready to launch" in capsys.readouterr().out
    assert doctor.main([*args, "--batch_size", "4", "--world_size", "2", "--quick"]) == doctor.EXIT_PROBLEMS
    out = capsys.readouterr().out
    assert out.startswith("vlm doctor:") and "PROBLEM  batch" in out and "1 problem(s)" in out
    assert doctor.main([*args, "--world_size", "many"]) == 2


def test_startup_check_raises_with_every_problem_and_passes_a_good_run(tmp_path, monkeypatch):
    for key, value in SINGLE.items():
        monkeypatch.setenv(key, value)
    assert preflight.check_at_startup(config(tmp_path), 1, 0).problems == []
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as caught:
        preflight.check_at_startup(config(tmp_path, batch_size="8", out_dir=str(blocker / "o")), 1, 0)
    assert len(caught.value.problems) == 2 and all(p.startswith("rank 0: ") for p in caught.value.problems)


def test_train_compile_without_a_cpp_compiler_is_a_problem(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    cfg.train.compile = True
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)
    (message,) = findings(preflight.run_checks(cfg, SINGLE, load=False), "compile")
    assert "no C++ compiler" in message and "train.compile: false" in message
    monkeypatch.setattr(preflight.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "g++" else None)
    report = preflight.run_checks(cfg, SINGLE, load=False)
    assert findings(report, "compile") == [] and findings(report, "compile", preflight.OK)
    monkeypatch.setenv("CXX", "ccache g++")  # a launcher word before the compiler
    assert findings(preflight.run_checks(cfg, SINGLE, load=False), "compile") == []
    cfg.train.zero_stage = 3
    (warning,) = findings(preflight.run_checks(cfg, SINGLE, load=False), "compile", preflight.WARNING)
    assert "ZeRO-3 is untested" in warning

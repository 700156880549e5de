"""The command line as users meet it: --help listing every config field, console commands, the checkout's own
code, `python -m vlm.train` / `deepspeed --module`, and one-line errors for damaged inputs (--debug: traceback)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.launching import BIN, REPO, cpu_env, free_port, run
from tests.tiny_vlm import picture, save_tiny_vlm
from vlm import chat
from vlm.config import SECTIONS
from vlm.model.vision_encoder import write_tiny_vision_encoder
from vlm.train.cli import main as train_main


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_help_lists_every_field_with_type_default_and_help_grouped_by_section(capsys):
    assert train_main(["--help"]) == 0
    text = capsys.readouterr().out
    for section, cls in SECTIONS.items():
        assert f"\n{section}: " in text
        for field in dataclasses.fields(cls):
            assert f"--{section}.{field.name} " in text, field.name
    assert "--train.learning_rate float  (default 0.0005)  (also --learning_rate)" in text or \
        "(also --learning_rate)" in text
    assert "--data.train_shards list of str" in text and "usage:" in text
    assert train_main(["--help", "data"]) == 0
    only = capsys.readouterr().out
    assert "--data.max_seq_len" in only and "--train.learning_rate" not in only


def test_the_preflight_has_the_same_help():
    from vlm import doctor

    result = subprocess.run([sys.executable, "-m", "vlm.doctor", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0 and "--model.vision_model" in result.stdout and doctor.__doc__[:40] in result.stdout


def test_every_tool_is_a_console_command():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"vlm-train", "vlm-doctor", "vlm-shard", "vlm-verify", "vlm-inspect", "vlm-export", "vlm-chat",
            "vlm-eval"} <= set(scripts)
    for name in ("vlm-shard", "vlm-verify", "vlm-chat", "vlm-serve", "vlm-eval", "vlm-export", "vlm-inspect"):
        path = shutil.which(name, path=str(BIN))
        assert path, f"{name} is not installed in {BIN}: run make install"
        result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage" in result.stdout.lower(), (name, result.stderr[-400:])


def test_launch_train_runs_the_code_of_its_own_checkout(tmp_path):
    """Another `vlm` earlier on the path (a second clone, an installed copy) is not what launch/train.py runs."""
    fake = tmp_path / "other_clone" / "vlm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the other clone was imported')\n")
    env = cpu_env(PYTHONPATH=str(fake.parent))
    result = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1000:]
    assert "--train.out_dir" in result.stdout


@pytest.mark.slow
def test_the_deepspeed_launcher_runs_the_trainer_as_a_module(tmp_path):
    out = tmp_path / "out"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()), "--module", "vlm.train",
           "--config", "launch/configs/debug.yaml", "--train_shards", "tests/fixtures/tiny_shards",
           "--out_dir", str(out), "--max_steps", "1"]
    result = run(cmd, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (out / "metrics.jsonl").is_file()


def _tiny_tower(folder: Path) -> Path:
    return write_tiny_vision_encoder(folder, seed=0, image_size=32, patch_size=8, hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def test_a_truncated_vision_tower_is_one_line_naming_the_folder_and_debug_shows_the_traceback(tmp_path, capsys):
    tower = _tiny_tower(tmp_path / "clip")
    truncate(tower / "model.safetensors")
    argv = ["--config", "launch/configs/debug.yaml", "--train_shards", str(REPO / "tests/fixtures/tiny_shards"),
            "--out_dir", str(tmp_path / "out"), "--model.vision_model", str(tower)]
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    assert f"cannot load the vision tower from {tower} (model.safetensors)" in err
    assert "Traceback" not in err and "--debug" in err
    with pytest.raises(Exception, match="vision tower"):
        train_main([*argv, "--debug"])


def test_truncated_language_model_weights_are_one_line_naming_the_file(tmp_path, capsys, tiny_vision_dir):
    export, pth = save_tiny_vlm(tiny_vision_dir, tmp_path / "tiny")
    truncate(pth)
    argv = ["--config", "launch/configs/debug.yaml", "--train_shards", str(REPO / "tests/fixtures/tiny_shards"),
            "--out_dir", str(tmp_path / "out"), "--model.init_weights", str(pth),
            "--model.vision_model", str(tiny_vision_dir), "--dim", "64", "--n_layers", "1"]
    assert train_main(argv) in (1, 2)
    err = capsys.readouterr().err
    assert f"{pth} cannot be read as PyTorch weights" in err and "Traceback" not in err
    truncate(export / "model.safetensors")
    (tmp_path / "a.png").write_bytes(picture((200, 30, 30)))
    assert chat.main(["--checkpoint", str(export), "--image", str(tmp_path / "a.png"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err  # transformers' loading bar may come first, on its own line
    assert "model.safetensors cannot be read" in err.splitlines()[-1] and "Traceback" not in err


def test_a_malformed_tokenizer_is_one_line_naming_the_folder(tmp_path, capsys):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"model": ')
    (folder / "tokenizer_config.json").write_text("{}")
    assert train_main(["--config", "launch/configs/debug.yaml", "--train_shards",
                       str(REPO / "tests/fixtures/tiny_shards"), "--out_dir", str(tmp_path / "out"),
                       "--model.tokenizer", str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"TokenizerError: could not load the tokenizer in {folder}" in err and "Traceback" not in err

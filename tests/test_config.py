from pathlib import Path

import pytest

from vlm.config import (
    BUILTIN_TINY_VISION,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_problems,
    load_config,
    parse_cli_overrides,
)
from vlm.train.ds_config import ds_config_problems


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_seed_flags_and_dotted_overrides(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 0.001\nmodel:\n  hidden_size: 256\n")
    cfg = load_config(path, {"dim": "768", "use_moe": "false", "learning_rate": "1e-4", "train.warmup_steps": "10",
                             "n_layers": "4", "max_seq_len": "512", "num_workers": "0", "train_shards": "a,b"})
    assert cfg.model.hidden_size == 768 and cfg.model.num_hidden_layers == 4
    assert cfg.model.use_moe is False
    assert cfg.train.learning_rate == pytest.approx(1e-4) and cfg.train.warmup_steps == 10
    assert cfg.data.max_seq_len == 512 and cfg.data.num_workers == 0
    assert cfg.data.train_shards == ["a", "b"]


@pytest.mark.parametrize("text,truth", [("true", True), ("false", False), ("1", True), ("0", False)])
def test_booleans_mean_what_they_say(text, truth):
    assert load_config(None, {"use_moe": text}).model.use_moe is truth


def test_unknown_yaml_keys_are_all_named(tmp_path):
    path = write(tmp_path, "train:\n  lerning_rate: 1\nmodel:\n  dimm: 3\noptim: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "train.lerning_rate" in text and "did you mean 'learning_rate'" in text
    assert "model.dimm" in text and "'optim'" in text


def test_unknown_flag_is_named():
    with pytest.raises(ConfigError, match="--batchsize"):
        load_config(None, {"batchsize": "3"})


def test_bad_values_are_reported_together():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"epochs": "many", "dtype": 3.5}, "model": {"use_moe": "maybe"}})
    assert len(err.value.problems) == 3


def test_cross_field_problems_collected_once(tmp_path):
    cfg = config_from_dict({
        "train": {"stage": "sft", "trainable": "projector", "batch_size": 0, "dtype": "fp8"},
        "data": {"train_shards": [str(tmp_path / "missing")]},
        "model": {"hidden_size": 100},
    })
    problems = config_problems(cfg)
    joined = "\n".join(problems)
    assert "SFT trains the language model" in joined
    assert "train.batch_size must be >= 1" in joined
    assert "train.dtype" in joined
    assert "not divisible" in joined
    assert "init_weights is null" in joined


def test_a_sound_config_has_no_problems(tmp_path):
    (tmp_path / "shards").mkdir()
    cfg = config_from_dict({
        "model": {"vision_model": BUILTIN_TINY_VISION, "vision_trainable": True},
        "train": {"trainable": "all"},
        "data": {"train_shards": [str(tmp_path / "shards")]},
    })
    assert config_problems(cfg) == []


def test_overrides_keep_types_checked():
    cfg = apply_overrides(config_from_dict({}), {"train.betas": "0.9,0.95"})
    assert cfg.train.betas == [0.9, 0.95]
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(cfg, {"epochs": "1.5"})


def test_cli_forms():
    path, overrides, rest = parse_cli_overrides(
        ["--config", "x.yaml", "--local_rank=1", "--use_moe", "false", "--log_samples", "--train.seed=3", "stray"]
    )
    assert path == "x.yaml"
    assert overrides == {"local_rank": "1", "use_moe": "false", "log_samples": "true", "train.seed": "3"}
    assert rest == ["stray"]


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "launch" / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_all_here():
    assert {p.name for p in CONFIGS} >= {"debug.yaml", "pretrain.yaml", "sft.yaml", "demo_pretrain.yaml",
                                         "demo_sft.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)  # unknown keys and wrong types raise here
    assert config_problems(cfg) == []
    assert ds_config_problems(cfg.train) == []  # its DeepSpeed JSON exists and leaves the YAML its fields
    assert cfg.data.train_shards, "a shipped config names its training data"


def test_eval_answer_counts_are_checked():
    from vlm.config import config_problems, load_config

    problems = config_problems(load_config(None, {"train.eval_answers": "-1", "train.eval_answer_tokens": "0"}))
    assert "train.eval_answers must be >= 0 (0 = none), got -1" in problems
    assert "train.eval_answer_tokens must be >= 1, got 0" in problems

"""Trainer parts that need no process group: CLI errors, DeepSpeed config filling, freezing, checkpoints, env."""

import json
import os

import pytest

from tests.model.tiny import tiny_config
from vlm.config import ConfigError, config_from_dict
from vlm.data import plan
from vlm.data.plan import Geometry
from vlm.model.vision_encoder import load_vision_encoder
from vlm.model.vlm import MiniMindVLM
from vlm.train import checkpoint as ckpt
from vlm.train.cli import main
from vlm.train.ds_config import build_ds_config
from vlm.train.freeze import apply_trainable_policy
from vlm.train.launcher import launcher_problems, normalize_launcher_env


def test_unknown_flag_and_yaml_key_exit_2_naming_them(tmp_path, capsys):
    assert main(["--config", "launch/configs/debug.yaml", "--batchsize", "3"]) == 2
    assert "--batchsize" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    assert main(["--config", str(bad)]) == 2
    assert "train.epoch" in capsys.readouterr().err


def test_config_problems_are_reported_together_before_any_work(tmp_path, capsys):
    code = main(["--config", "launch/configs/sft.yaml", "--batch_size", "0", "--train.trainable", "projector",
                 "--out_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.batch_size must be >= 1" in err
    assert "SFT trains the language model" in err
    assert "model/vision_model" in err and "data/shards/sft" in err
    assert not (tmp_path / "o").exists()


def train_cfg(**train):
    return config_from_dict({"train": train}).train


def test_ds_config_batch_fields_come_from_yaml():
    ds = build_ds_config(train_cfg(batch_size=4, accumulation_steps=3, dtype="bfloat16", zero_stage=2),
                         Geometry(8, 0, 4, 3), True)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 96
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert "scheduler" not in ds  # vlm.train.schedule's, handed to the engine
    assert ds["gradient_clipping"] == 1.0


def test_ds_json_may_not_hold_batch_or_contradicting_precision(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 64, "bf16": {"enabled": True}, "optimizer": {}}))
    with pytest.raises(ConfigError) as err:
        build_ds_config(train_cfg(deepspeed_config=str(path), dtype="float32"), Geometry(2, 0, 16), True)
    text = str(err.value)
    assert "train_batch_size" in text and "optimizer" in text and "bf16.enabled" in text


def test_batch_arithmetic_is_one_function_of_the_geometry():
    geometry = Geometry(world_size=8, workers=2, batch_size=4, accumulation=2)
    assert geometry.global_batch == 64 and geometry.steps_per_epoch(200) == 3
    assert plan.micro_batches(200, geometry) == 6 and plan.total_steps(200, geometry, epochs=4) == 12
    assert plan.total_steps(200, geometry, epochs=4, max_steps=5) == 5
    with pytest.raises(ValueError, match="must be >= 1"):
        Geometry(world_size=1, workers=0, batch_size=0)


@pytest.fixture
def model(tiny_vision_dir):
    return MiniMindVLM(tiny_config(), load_vision_encoder(tiny_vision_dir))


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_policies(model):
    counts = apply_trainable_policy(model, "projector")
    assert trainable_names(model) == {"vision_proj.vision_proj.0.weight", "vision_proj.vision_proj.0.bias"}
    assert counts["total"] > counts["trainable"] > 0
    apply_trainable_policy(model, "projector+last_layer")
    assert {n for n in trainable_names(model) if n.startswith("model.layers.")} == {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}
    deep = MiniMindVLM(tiny_config(num_hidden_layers=4))  # MiniMind-V 3v's SFT: layers 0 and 3, not 1 and 2
    apply_trainable_policy(deep, "projector+first_last_layers")
    assert trainable_names(deep) == {n for n, _ in deep.named_parameters()
                                     if n.startswith(("vision_proj.", "model.layers.0.", "model.layers.3."))}
    apply_trainable_policy(model, "projector+lm")
    assert "model.embed_tokens.weight" in trainable_names(model)
    apply_trainable_policy(model, "patterns", ["*.q_proj.*"])
    assert trainable_names(model) == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
    with pytest.raises(ValueError, match="match no parameter"):
        apply_trainable_policy(model, "patterns", ["nothing.*"])


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((5, True), (10, True), (15, False)):
        (root / ckpt.tag_for(step)).mkdir(parents=True)
        if complete:
            ckpt.write_json_atomic(root / ckpt.tag_for(step) / "meta.json", {"step": step})
    assert ckpt.resolve_resume(tmp_path, "auto").name == "step_000000010"
    assert ckpt.resolve_resume(tmp_path, "never") is None
    assert ckpt.resolve_resume(tmp_path, str(tmp_path)).name == "step_000000010"
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(root / "step_000000015"))
    ckpt.prune_checkpoints(tmp_path, keep=1, run_id=None, written=root / "step_000000010")
    assert sorted(p.name for p in root.iterdir()) == ["step_000000010", "step_000000015"]
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.resolve_resume(tmp_path, "latest")


def test_pruning_touches_only_this_runs_checkpoints_and_never_the_one_just_written(tmp_path):
    root = tmp_path / "checkpoints"
    for step, run in ((2, "new"), (4, "new"), (6, "old"), (8, "old")):  # an older, longer run sorts newer
        (root / ckpt.tag_for(step)).mkdir(parents=True)
        ckpt.write_json_atomic(root / ckpt.tag_for(step) / "meta.json", {"step": step, "run_id": run})
    ckpt.prune_checkpoints(tmp_path, keep=1, run_id="new", written=root / "step_000000004")
    assert sorted(p.name for p in root.iterdir()) == ["step_000000004", "step_000000006", "step_000000008"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        folder = root / ckpt.tag_for(step)
        (folder / "sub").mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"x" * 10)
        (folder / "sub" / "optim.pt").write_bytes(b"y" * 20)
        ckpt.write_json_atomic(folder / "meta.json", {"step": step, "files": ckpt.file_sizes(folder)})
    (root / "step_000000002" / "sub" / "optim.pt").write_bytes(b"")  # a 0-byte optimizer file
    assert ckpt.resolve_resume(tmp_path, "auto").name == "step_000000001"
    assert "step_000000002 is damaged (sub/optim.pt has 0 bytes, 20 were written)" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="damaged: sub/optim.pt"):
        ckpt.resolve_resume(tmp_path, str(root / "step_000000002"))
    (root / "step_000000001" / "model.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="every checkpoint .* is damaged"):
        ckpt.resolve_resume(tmp_path, "auto")


@pytest.mark.parametrize("env,expected", [
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}, (3, 8, 1, "slurm")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     (2, 4, 0, "openmpi")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"},
     (1, 2, 1, "deepspeed/torchrun")),
    ({}, (0, 1, 0, "single process")),
])
def test_launcher_variables_are_understood(env, expected):
    dist = normalize_launcher_env(env)
    assert (dist.rank, dist.world_size, dist.local_rank, dist.launcher) == expected
    assert launcher_problems(env) == []


def test_inconsistent_launcher_variables_are_reported():
    problems = launcher_problems({"RANK": "4", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "x"})
    assert any("RANK=4" in p for p in problems) and any("MASTER_PORT" in p for p in problems)


def test_model_inputs_normalise_uint8_pixels_on_the_device_and_drop_empty_image_slots():
    import torch

    from vlm.data.image import ImagePreprocessConfig, PixelNormalizer
    from vlm.train.stepping import model_inputs

    config = ImagePreprocessConfig(shortest_edge=4, crop=(4, 4))
    normalize = PixelNormalizer(config)
    ids = torch.ones(1, 8, dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": ids, "position_ids": ids,
             "pixel_values": torch.full((1, 1, 3, 4, 4), 255, dtype=torch.uint8)}
    pixels = model_inputs(batch, torch.device("cpu"), normalize)["pixel_values"]
    expected = (1.0 - torch.tensor(config.mean)) / torch.tensor(config.std)
    assert pixels.dtype == torch.float32
    assert torch.allclose(pixels[0, 0, :, 0, 0], expected, atol=1e-5)
    batch["pixel_values"] = torch.zeros((1, 0, 3, 4, 4), dtype=torch.uint8)
    assert "pixel_values" not in model_inputs(batch, torch.device("cpu"), normalize)


@pytest.fixture
def clean_launcher_env(monkeypatch):
    """The trainer fills RANK, WORLD_SIZE, MASTER_* ... into os.environ: give it a copy to write into."""
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "VLM_LAUNCHER"):
        os.environ.pop(key, None)


def test_the_process_group_is_torn_down_after_an_error(tmp_path, capsys, clean_launcher_env):
    import torch.distributed

    code = main(["--config", "launch/configs/debug.yaml", "--train_shards", "tests/fixtures/tiny_shards",
                 "--out_dir", str(tmp_path / "o"), "--batch_size", "2", "--resume", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 1 and "CheckpointError" in err and "nowhere" in err
    assert not torch.distributed.is_initialized()


def test_after_a_teardown_the_same_process_forms_a_new_group_and_engine(clean_launcher_env, tiny_vision_dir):
    import torch.distributed

    from vlm.train import distributed

    for _ in range(2):  # the second engine fails if DeepSpeed kept the destroyed group
        distributed.init_distributed()
        model = MiniMindVLM(tiny_config(), load_vision_encoder(tiny_vision_dir))
        apply_trainable_policy(model, "all")
        ds = build_ds_config(train_cfg(dtype="float32", zero_stage=2), Geometry(1, 0, 1), on_cpu=True)
        assert distributed.build_engine(model, ds) is not None
        distributed.destroy_distributed()
    assert not torch.distributed.is_initialized()


def test_the_adam_step_of_a_converted_checkpoint_is_the_largest_recorded():
    """DeepSpeed's FusedAdam (GPU) advances only its last parameter's step and leaves the group's at 0."""
    import torch

    from vlm.train.layout_change import _step_of

    fused = {"state": {0: {"step": 0}, 1: {"step": 0}, 2: {"step": 7}}, "param_groups": [{"step": 0}]}
    assert float(_step_of(fused)) == 7.0
    assert float(_step_of({"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{}]})) == 3.0
    assert float(_step_of({"state": {}, "param_groups": [{}]}, fallback=5)) == 5.0
    assert float(_step_of({"state": {}, "param_groups": [{}]})) == 0.0

"""Shared fixtures: tiny models and folders built in temporary directories (no downloads)."""

from __future__ import annotations

import os

# DeepSpeed picks its accelerator once, when first imported: tests that run it in-process use the CPU one
# (gloo) on every machine, as the launcher tests do through tests.launching.cpu_env.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from vlm.model.vision_encoder import write_tiny_vision_encoder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_vision_dir(tmp_path_factory):
    """A tiny random CLIP vision tower (32 px, patch 8 = 16 image tokens, width 32) saved like a HF folder."""
    folder = tmp_path_factory.mktemp("tiny_vision")
    return write_tiny_vision_encoder(
        folder, seed=0, image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2,
    )


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
    """A tiny random SigLIP vision tower (32 px, patch 8 = 16 image tokens, no CLS, width 32) and SigLIP's image
    processor (exact 32 x 32 resize, mean/std 0.5), saved with save_pretrained like a downloaded folder."""
    import torch
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    folder = tmp_path_factory.mktemp("tiny_siglip")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2)).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory):
    """A small synthetic corpus (data_tools.synth) sharded by data_tools.shard: {split: shard folder}."""
    from data_tools import shard, synth

    root = tmp_path_factory.mktemp("synth")
    synth.write_corpus(root / "dataset", pretrain=192, sft=96, eval=24, seed=0, progress=False)
    folders = {}
    for split in ("pretrain", "sft", "eval"):
        out = root / "shards" / split
        code = shard.main(["--jsonl", str(root / "dataset" / f"{split}_data.jsonl"), "--images",
                           str(root / "dataset" / f"{split}_images"), "--out", str(out), "--prefix", split,
                           "--samples-per-shard", "50"])
        assert code == 0
        folders[split] = out
    folders["dataset"] = root / "dataset"
    return folders


@pytest.fixture
def launch_env():
    """A fresh single-process launch in this process: launcher variables cleared, the environment as it was and
    the process group torn down after. (The real `os.environ`, not a dict copy: compiled code reads variables
    with getenv.)"""
    from vlm.train import distributed

    saved = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "VLM_LAUNCHER"):
        os.environ.pop(key, None)
    yield
    distributed.destroy_distributed()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)

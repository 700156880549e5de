"""What a demo run does (`DemoSettings`) and where it keeps things (`DemoPaths`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("corpus", "shards", "vision", "pretrain", "sft", "export", "eval")
SPLITS = ("pretrain", "sft", "eval")

# --tiny: a smoke run of every stage (the tests use it); a short warm-up so that the loss visibly falls.
TINY = {"pretrain": 96, "sft": 64, "eval": 16, "eval_sft": 34, "pretrain_epochs": 1, "sft_epochs": 1,
        "batch_size": 8, "vision_steps": 10, "pretrain_steps": 8, "sft_steps": 6, "log_interval": 2,
        "num_workers": 0}
TINY_TRAIN_ARGS = ["--train.warmup_steps=2"]


@dataclass
class DemoSettings:
    """What a demo run does; `python -m vlm.demo --help` documents each field."""

    data: str = "data/demo"
    out: str = "out/demo"
    pretrain: int = 12800  # one pass: 400 steps
    sft: int = 4000  # with a tenth of the captions mixed in, 4 passes: 660 steps
    eval: int = 400
    eval_sft: int = 612  # 36 held-out questions of each of the 17 SFT question types
    seed: int = 0
    vision_steps: int = 1000
    pretrain_epochs: int = 1
    sft_epochs: int = 4
    pretrain_steps: int | None = None
    sft_steps: int | None = None
    batch_size: int = 32
    dtype: str = "float32"  # on CPUs without fast bf16 kernels a bf16 step took 2.3x as long (0.80 vs 0.35 s)
    ranks: int = 1
    num_workers: int = 1
    log_interval: int = 25
    table: int = 12
    train_args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DemoPaths:
    """Where a demo run keeps things: data under `data`, everything it makes under `out`."""

    data: Path
    out: Path

    @property
    def dataset(self) -> Path:
        """The synthetic corpus in MiniMind-V layout (JSONL + image folders)."""
        return self.data / "dataset"

    def shards(self, split: str) -> Path:
        """The shard folder of one split (pretrain, sft, eval)."""
        return self.data / "shards" / split

    def stage_out(self, stage: str) -> Path:
        """The out_dir of one training stage."""
        return self.out / stage

    @property
    def vision(self) -> Path:
        """The vision encoder taught by the `vision` stage (a CLIP folder the pretrain stage starts from)."""
        return self.out / "vision_model"

    @property
    def export(self) -> Path:
        """The SFT stage's Hugging Face folder: the demo's result."""
        return self.stage_out("sft") / "export"

    @property
    def minimind(self) -> Path:
        """The result as a MiniMind-V .pth."""
        return self.out / "demo_vlm.pth"

    @property
    def loss_plot(self) -> Path:
        """Both stages' loss curves in one picture."""
        return self.out / "loss.png"

    @property
    def report(self) -> Path:
        """report.json: the headline figures, stage times and settings."""
        return self.out / "report.json"

    @property
    def eval_json(self) -> Path:
        """eval.json: every held-out answer with its scores."""
        return self.out / "eval.json"

    @property
    def eval_sft_json(self) -> Path:
        """eval_sft.json: every held-out SFT question's answer with its scores."""
        return self.out / "eval_sft.json"

    @property
    def eval_images(self) -> Path:
        """The held-out pictures."""
        return self.dataset / "eval_images"

    def listing(self) -> dict[str, str]:
        """{name: path} of everything above, for the report."""
        return {"dataset": str(self.dataset), "shards": str(self.data / "shards"), "vision_model": str(self.vision),
                "export": str(self.export),
                "minimind_pth": str(self.minimind), "loss_plot": str(self.loss_plot),
                "loss_plots": [str(self.stage_out(s) / "loss.png") for s in ("pretrain", "sft")],
                "eval_json": str(self.eval_json), "eval_sft_json": str(self.eval_sft_json),
                "report": str(self.report)}

"""Command line of the trainer (launch/train.py is its thin entry point; tests call `main(argv)`)."""

from __future__ import annotations

import logging
import sys

from vlm.config import ConfigError, config_from_argv
from vlm.data.image import ImageConfigError
from vlm.data.pipeline import DataQualityError
from vlm.data.plan import PositionError
from vlm.data.sources import SourceError
from vlm.data.text import ChatTemplateError
from vlm.model.vision_encoder import VisionEncoderError
from vlm.model.weights import WeightsMismatchError
from vlm.train.checkpoint import CheckpointError
from vlm.train.engine_state import EXIT_CHECKPOINT_WRITE, CheckpointWriteError
from vlm.train.launcher import LaunchError, normalize_launcher_env
from vlm.train.trainer import TrainingError, run

USER_ERRORS = (
    CheckpointError, ChatTemplateError, DataQualityError, FileNotFoundError, ImageConfigError, LaunchError,
    PositionError,
    SourceError, TrainingError, VisionEncoderError, WeightsMismatchError,
)


def main(argv: list[str] | None = None) -> int:
    """Train with the config and flags in `argv`; returns the exit code (0 done, 1 bad input, 2 bad config
    or command line, 74 a checkpoint could not be written, 75 checkpointed on a stop signal)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        # --local_rank is injected by the deepspeed launcher (LOCAL_RANK is set too).
        cfg, own = config_from_argv(argv, ("local_rank",))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    local_rank = own.get("local_rank")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    normalize_launcher_env(local_rank_flag=int(local_rank) if local_rank is not None else None)
    try:
        return run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CheckpointWriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CHECKPOINT_WRITE
    except USER_ERRORS as err:  # problems with the inputs: a clear message, no traceback
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1

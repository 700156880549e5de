"""Command line of the trainer (launch/train.py is its thin entry point; tests call `main(argv)`)."""

from __future__ import annotations

import logging
import sys

from vlm.config import ConfigError, config_from_argv
from vlm.config_help import config_help, help_sections, wants_help
from vlm.data.image import ImageConfigError
from vlm.data.pipeline import DataQualityError
from vlm.data.plan import PositionError
from vlm.data.sources import SourceError
from vlm.data.text import ChatTemplateError
from vlm.model.vision_encoder import VisionEncoderError
from vlm.model.weights import WeightsMismatchError
from vlm.tokenizer import TokenizerError
from vlm.train.checkpoint import CheckpointError
from vlm.train.engine_state import EXIT_CHECKPOINT_WRITE, CheckpointWriteError
from vlm.train.launcher import LaunchError, normalize_launcher_env
from vlm.train.trainer import TrainingError, run

USER_ERRORS = (
    CheckpointError, ChatTemplateError, DataQualityError, FileNotFoundError, ImageConfigError, LaunchError,
    PositionError,
    SourceError, TokenizerError, TrainingError, VisionEncoderError, WeightsMismatchError,
)


USAGE = """usage: python launch/train.py --config CONFIG [flags]     (or: deepspeed [launcher flags] launch/train.py,
       torchrun ... launch/train.py, python -m vlm.train, deepspeed --module vlm.train, vlm-train)

Trains both stages (the YAML says which). Exit codes: 0 done, 1 bad input, 2 bad config or command line,
74 a checkpoint could not be written, 75 checkpointed on a stop signal (requeue and resume).
--debug prints the traceback of an error instead of its one line. --help SECTION shows one section.
"""


def main(argv: list[str] | None = None) -> int:
    """Train with the config and flags in `argv`; returns the exit code (0 done, 1 bad input, 2 bad config
    or command line, 74 a checkpoint could not be written, 75 checkpointed on a stop signal).
    `--help` prints every config field and returns 0; `--debug` re-raises errors with their traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(config_help(USAGE, help_sections(argv)))
        return 0
    try:
        # --local_rank is injected by the deepspeed launcher (LOCAL_RANK is set too).
        cfg, own = config_from_argv(argv, ("local_rank", "debug"))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if own.get("debug", "false").lower() in ("true", "1", "yes", "on"):
        return _run(cfg, own.get("local_rank"))  # errors keep their traceback
    try:
        return _run(cfg, own.get("local_rank"))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CheckpointWriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CHECKPOINT_WRITE
    except USER_ERRORS as err:  # problems with the inputs: a clear message, no traceback
        print(f"error: {type(err).__name__}: {err} (--debug shows the traceback)", file=sys.stderr)
        return 1


def _run(cfg, local_rank: str | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    normalize_launcher_env(local_rank_flag=int(local_rank) if local_rank is not None else None)
    return run(cfg)

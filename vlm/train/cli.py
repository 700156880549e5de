"""Command line of the trainer (launch/train.py is its thin entry point; tests call `main(argv)`)."""

from __future__ import annotations

import logging
import sys

from vlm.config import ConfigError, load_config, parse_cli_overrides
from vlm.data.image import ImageConfigError
from vlm.data.pipeline import DataQualityError
from vlm.data.plan import PositionError
from vlm.data.sources import SourceError
from vlm.data.text import ChatTemplateError
from vlm.model.vision_encoder import VisionEncoderError
from vlm.model.weights import WeightsMismatchError
from vlm.train.checkpoint import CheckpointError
from vlm.train.trainer import TrainingError

USER_ERRORS = (
    CheckpointError, ChatTemplateError, DataQualityError, FileNotFoundError, ImageConfigError, PositionError,
    SourceError, TrainingError, VisionEncoderError, WeightsMismatchError,
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config_path, overrides, leftovers = parse_cli_overrides(argv)
    local_rank = overrides.pop("local_rank", None)  # injected by the deepspeed launcher; LOCAL_RANK also set
    if leftovers:
        print(f"error: unexpected arguments {leftovers}; flags look like --name value", file=sys.stderr)
        return 2
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from vlm.train.distributed import normalize_launcher_env
    from vlm.train.trainer import run

    normalize_launcher_env(local_rank_flag=int(local_rank) if local_rank is not None else None)
    try:
        return run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:  # problems with the inputs: a clear message, no traceback
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1

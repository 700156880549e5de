"""Command line of the trainer (launch/train.py is its thin entry point; tests call `main(argv)`)."""

from __future__ import annotations

import logging
import sys

from vlm.config import ConfigError, load_config, parse_cli_overrides


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


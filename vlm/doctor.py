"""Preflight from the command line: one report of everything that would stop a run, before any GPU hour is spent.

    python -m vlm.doctor --config launch/configs/pretrain.yaml [--world_size 16] [--quick] [trainer flags...]

The checks are `vlm.train.preflight`'s (the trainer runs the same ones at start-up, minus the loading).
Trainer flags are the same as launch/train.py's; `--world_size N` checks the arithmetic for a job of N ranks
(default: the launcher's WORLD_SIZE, or 1); `--quick` skips loading the tokenizer, vision encoder and
weights. Exit code: 0 nothing blocks the run (warnings allowed), 1 problems found, 2 bad command line.
"""

from __future__ import annotations

import os
import sys

from vlm.config import ConfigError, config_from_argv
from vlm.config_help import config_help, help_sections, wants_help
from vlm.train.preflight import run_checks

EXIT_PROBLEMS = 1


def main(argv: list[str] | None = None) -> int:
    """Run the preflight for the config and flags in `argv`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(config_help(__doc__, help_sections(argv)))
        return 0
    try:
        cfg, own = config_from_argv(argv, ("quick", "world_size"))
        world_size = own.get("world_size")
        if world_size is not None and not world_size.isdigit():
            raise ConfigError([f"--world_size must be a number of ranks, got {world_size!r}"])
    except ConfigError as err:
        print(f"error: {err}\nusage: python -m vlm.doctor --config CONFIG [--world_size N] [--quick] "
              "[trainer flags...]", file=sys.stderr)
        return 2
    quick = own.get("quick", "false").lower() in ("true", "1", "yes")
    report = run_checks(cfg, os.environ, world_size=int(world_size) if world_size else None, load=not quick)
    print(report.render(f"vlm doctor: {own.get('config', 'built-in defaults')}"))
    return EXIT_PROBLEMS if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Several trainings one after another in the same ranks (saves start-up time in tests).

    deepspeed --num_gpus 2 tests/train/multi_run.py RUNS.json

RUNS.json: a list of argv lists for `vlm.train.cli.main`. Exits with the first non-zero code.
"""

import json
import sys

from vlm.train.cli import main

if __name__ == "__main__":
    runs_file = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    for argv in json.loads(open(runs_file).read()):
        code = main(argv)
        if code != 0:
            sys.exit(code)

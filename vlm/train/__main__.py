"""`python -m vlm.train` / `deepspeed --module vlm.train`: the trainer (the same as launch/train.py).

    python -m vlm.train --config launch/configs/debug.yaml
    deepspeed --num_gpus 2 --module vlm.train --config launch/configs/debug.yaml
"""

import sys

from vlm.train.cli import main

if __name__ == "__main__":
    sys.exit(main())

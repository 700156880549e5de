"""Train a MiniMind-V-style VLM (both stages; the YAML says which).

    deepspeed --num_gpus 2 launch/train.py --config launch/configs/debug.yaml
    python launch/train.py --config launch/configs/pretrain.yaml --batch_size 8 --learning_rate 2e-4
    torchrun --nproc_per_node 8 launch/train.py --config launch/configs/sft.yaml --train.warmup_steps=100

Flags: the seed guide's (--out_dir --epochs --batch_size --learning_rate --device --dtype --num_workers
--accumulation_steps --grad_clip --log_interval --save_interval --dim --n_layers --max_seq_len --use_moe),
--train_shards --eval_shards --max_steps --seed --zero_stage --deepspeed_config --resume --log_samples,
and --section.key=value for any other field of vlm/config.py (`--help` lists them all). Exit codes: 0 done, 1 bad input, 2 bad
config, 74 a checkpoint could not be written, 75 checkpointed on a signal (requeue and resume).
"""

import sys
from pathlib import Path

# Run the code of the checkout this file sits in, not a `vlm` installed from elsewhere: two clones sharing one
# environment must not run mixed code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__mp_main__":  # a helper process the trainer spawned (its checkpoint writer) imports us so:
    from vlm.train.signals import die_with_parent  # before the heavy imports below

    die_with_parent()

from vlm.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

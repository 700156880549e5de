"""Train a MiniMind-V-style VLM (both stages; the YAML says which).

    deepspeed --num_gpus 2 launch/train.py --config launch/configs/debug.yaml
    python launch/train.py --config launch/configs/pretrain.yaml --batch_size 8 --learning_rate 2e-4
    torchrun --nproc_per_node 8 launch/train.py --config launch/configs/sft.yaml --train.warmup_steps=100

Flags: the seed guide's (--out_dir --epochs --batch_size --learning_rate --device --dtype --num_workers
--accumulation_steps --grad_clip --log_interval --save_interval --dim --n_layers --max_seq_len --use_moe),
--train_shards --eval_shards --max_steps --seed --zero_stage --deepspeed_config --resume --log_samples,
and --section.key=value for any other field of vlm/config.py. Exit code 75: checkpointed on a signal.
"""

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


if __name__ == "__main__":
    sys.exit(main())

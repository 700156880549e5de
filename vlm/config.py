"""Typed, validated training configuration, loaded from YAML with command-line overrides.

Three sections: `model` (architecture, tokenizer, vision encoder, initial weights), `data` (shards and
the pipeline) and `train` (optimisation, precision, DeepSpeed, checkpoints, logging). Each field's help
text is its documentation. Unknown keys are errors that name the key; every cross-field problem is
collected and raised once (`ConfigError`). Relative paths are relative to the working directory (run
commands from the repository root, as the README does).

Overrides: the seed's flags (`--dim 768 --use_moe false --learning_rate 1e-4 ...`, see `SEED_FLAGS`) and
one generic dotted form for every field (`--train.warmup_steps=100` or `--train.warmup_steps 100`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm.formats.constants import BATCHING, DEFAULT_MAX_PIXELS, PROJECTORS

BUILTIN_TINY_VISION = "builtin:tiny"
DTYPES = ("bfloat16", "float16", "float32")
MONITORS = ("csv", "tensorboard")  # train.monitors; W&B is on with train.wandb_project
TRAINABLE_POLICIES = ("projector", "projector+last_layer", "projector+first_last_layers", "projector+lm", "all",
                      "patterns")


class ConfigError(ValueError):
    """One or more configuration problems; the message lists all of them."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    """The `model` section: language-model architecture, tokenizer, vision tower and starting weights."""

    hidden_size: int = _f(512, "Width of the language model (the seed's --dim).")
    num_hidden_layers: int = _f(8, "Transformer layers (the seed's --n_layers).")
    use_moe: bool = _f(False, "Mixture-of-experts feed-forward layers (the seed's --use_moe).")
    num_attention_heads: int = _f(8, "Query heads.")
    num_key_value_heads: int = _f(2, "Key/value heads (grouped-query attention).")
    head_dim: int | None = _f(None, "Width of one attention head; null = hidden_size / num_attention_heads.")
    intermediate_size: int | None = _f(None, "Feed-forward width; null = MiniMind's 8/3 x hidden_size rounded up "
                                             "to a multiple of 64 (MiniMind-V 3v: 2432 at 768).")
    rms_norm_eps: float = _f(1e-5, "RMSNorm epsilon (MiniMind-V 3v: 1e-6).")
    qk_norm: bool = _f(False, "Per-head RMSNorm on queries and keys before RoPE (self_attn.q_norm / k_norm: "
                              "MiniMind-V 3v).")
    vocab_size: int | None = _f(None, "Vocabulary size; null = the tokenizer's size.")
    max_position_embeddings: int = _f(32768, "Longest position the rotary tables cover.")
    rope_theta: float = _f(1e6, "Rotary embedding base.")
    rope_yarn_factor: float | None = _f(None, "YaRN scaling of RoPE for inference beyond the trained context "
                                              "(MiniMind-V 3v's inference_rope_scaling: 16); null = off.")
    rope_yarn_original: int = _f(2048, "YaRN: the context length the model was trained on.")
    dropout: float = _f(0.0, "Dropout on attention and residual branches.")
    n_routed_experts: int = _f(4, "MoE: routed experts per layer.")
    num_experts_per_tok: int = _f(2, "MoE: experts each token is routed to.")
    n_shared_experts: int = _f(1, "MoE: experts every token passes through.")
    aux_loss_alpha: float = _f(0.1, "MoE: weight of the load-balancing loss.")
    seq_aux: bool = _f(True, "MoE: balance loss per sequence (true) or per batch (false).")
    moe_normalize_top1: bool = _f(False, "MoE with one expert per token: its routing weight is normalised to 1 "
                                         "(MiniMind-V 3v) instead of kept as the router probability (623a130).")
    tokenizer: str | None = _f(None, "Tokenizer folder; null = the built-in byte-level BPE tokenizer.")
    image_placeholder: str | None = _f(
        None, "Placeholder token repeated once per image token; null = found from the tokenizer: <|image|> (ours), "
              "<|image_pad|> (MiniMind-V 3v), '@' (MiniMind's 6400-token tokenizer without either)."
    )
    vision_model: str = _f(
        "model/vision_model", f"CLIP or SigLIP vision folder, or '{BUILTIN_TINY_VISION}' for the random-init tiny encoder."
    )
    vision_trainable: bool = _f(False, "Train the vision encoder too (needed when it starts from random init).")
    vision_feature_layer: int = _f(-1, "The tower's layer whose output becomes the image tokens: -1 = its output "
                                       "(last_hidden_state, MiniMind-V's), -2 = the second to last layer (LLaVA's).")
    projector: str = _f("linear", "Projector: 'linear' (MiniMind-V 623a130), 'mlp' (LayerNorm, Linear, GELU, Linear: "
                                  "MiniMind-V 3v) or 'mlp2x_gelu' (LLaVA-1.5's).")
    pixel_shuffle: int = _f(1, "Merge each s x s block of neighbouring patches into one image token before the "
                               "projector (196 -> 49 tokens at 2); 1 = off.")
    vision_cls: str = _f("drop", "'drop' the tokens before the patches (CLIP's CLS; SigLIP has none) or 'keep' "
                                 "them as image tokens.")
    init_weights: str | None = _f(
        None, "Starting weights: a MiniMind(-V) .pth, or a checkpoint/export folder of an earlier stage."
    )
    init_allow_missing: list[str] = _f([], "Key prefixes the initial weights may lack, e.g. ['vision_proj.'].")
    gradient_checkpointing: bool = _f(False, "Recompute layer activations in backward to save memory.")

    def architecture(self) -> dict[str, Any]:
        """{field: value} of `ARCHITECTURE_FIELDS`: what the language model's config is built from."""
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}


# model.* fields that are the language model's architecture: `MiniMindConfig` takes its defaults from here
# and `vlm.build` passes them on as they are (vocab_size is resolved against the tokenizer there).
ARCHITECTURE_FIELDS = (
    "hidden_size", "num_hidden_layers", "use_moe", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "rms_norm_eps", "qk_norm", "max_position_embeddings", "rope_theta", "rope_yarn_factor",
    "rope_yarn_original", "dropout", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "aux_loss_alpha",
    "seq_aux", "moe_normalize_top1",
)


def architecture_defaults() -> dict[str, Any]:
    """{field: default} of `ARCHITECTURE_FIELDS` (the seed's MiniMind defaults: 512 wide, 8 layers, ...)."""
    return {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in ARCHITECTURE_FIELDS}


def architecture_problems(a: dict[str, Any], prefix: str = "") -> list[str]:
    """The language model's shape rules for architecture values `a` (YAML check and MiniMindConfig alike);
    `prefix` (e.g. "model.") is put before each field name in the messages."""
    heads, kv, hidden = a["num_attention_heads"], a["num_key_value_heads"], a["hidden_size"]
    if min(heads, kv, hidden, a["num_hidden_layers"]) < 1:
        return [f"{prefix}hidden_size, num_hidden_layers, num_attention_heads and num_key_value_heads must be "
                f">= 1, got {hidden}, {a['num_hidden_layers']}, {heads}, {kv}"]
    problems = []
    head_dim = a.get("head_dim")
    if head_dim is None and hidden % heads:
        problems.append(f"{prefix}hidden_size {hidden} is not divisible by {prefix}num_attention_heads {heads} "
                        f"(or set {prefix}head_dim)")
    elif (head_dim or hidden // heads) % 2 or (head_dim is not None and head_dim < 2):
        problems.append(f"{prefix}head_dim {head_dim or hidden // heads} must be even (and >= 2) for rotary "
                        "embeddings")
    if a.get("intermediate_size") is not None and a["intermediate_size"] < 1:
        problems.append(f"{prefix}intermediate_size must be >= 1 or null, got {a['intermediate_size']}")
    if a.get("rope_yarn_factor") is not None and a["rope_yarn_factor"] <= 1:
        problems.append(f"{prefix}rope_yarn_factor must be > 1 or null, got {a['rope_yarn_factor']}")
    if a.get("rms_norm_eps", 1e-5) <= 0:
        problems.append(f"{prefix}rms_norm_eps must be > 0, got {a['rms_norm_eps']}")
    if heads % kv:
        problems.append(f"{prefix}num_attention_heads {heads} is not divisible by {prefix}num_key_value_heads {kv}")
    if a["use_moe"] and not 1 <= a["num_experts_per_tok"] <= a["n_routed_experts"]:
        problems.append(f"{prefix}num_experts_per_tok {a['num_experts_per_tok']} must be in "
                        f"1..{prefix}n_routed_experts {a['n_routed_experts']}")
    return problems


@dataclass
class DataConfig:
    """The `data` section: training and eval sources and the pipeline that reads them."""

    train_shards: list[str] = _f([], "Training sources: shard folders with manifest.json (local, or at an "
                                  "https:// or s3:// URL), brace patterns, .tar URLs, pipe:.")
    train_weights: list[float] | None = _f(None, "Mixing weights, one per training source; null = by size.")
    eval_shards: list[str] = _f([], "Held-out sources for evaluation loss.")
    max_seq_len: int = _f(640, "Truncation length in tokens (the seed's --max_seq_len).")
    num_workers: int = _f(8, "DataLoader worker processes per rank (the seed's --num_workers).")
    batching: str = _f("dynamic", f"How rows are formed: one of {BATCHING}.")
    chunk_size: int = _f(64, "Consecutive samples per scheduling chunk (larger = more sequential reads).")
    samples_per_epoch: int | None = _f(None, "Declared epoch length for sources without a manifest.")
    max_bad_fraction: float = _f(0.01, "Abort when more than this share of samples are corrupt.")
    max_pixels: int = _f(DEFAULT_MAX_PIXELS, "Images above this many pixels are skipped (decompression bombs); the "
                          "sharder's --max-pixels, eval's and chat's --max_pixels share this default.")
    log_samples: bool = _f(False, "Audit mode: write the keys each rank consumed to out_dir/samples/.")
    remote_timeout_s: float = _f(30.0, "Shard folders at https:// or s3:// URLs: seconds a request may wait "
                                        "to connect or for more bytes.")
    remote_retries: int = _f(6, "Shard folders at URLs: tries after a failed request (dropped, timed out, 5xx) "
                                "before the sample is skipped and counted as remote_read_failed.")
    remote_backoff_s: float = _f(0.5, "Shard folders at URLs: first wait before a retry; each further wait doubles "
                                      "(at most 30 s), times a random 0.5-1 (jitter).")


@dataclass
class TrainConfig:
    """The `train` section: optimisation, precision, DeepSpeed, checkpoints, logging."""

    stage: str = _f("pretrain", "'pretrain' (captions) or 'sft' (instructions): names the run, and SFT must train the LM.")
    out_dir: str = _f("out", "Checkpoints, metrics and plots go here.")
    epochs: int = _f(4, "Passes over the training data.")
    batch_size: int = _f(16, "Micro-batch per rank (the seed's --batch_size).")
    accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: float = _f(4e-4, "Peak learning rate.")
    min_lr_ratio: float = _f(0.1, "Cosine schedule floor as a fraction of the peak.")
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    grad_clip: float = _f(1.0, "Gradient-norm clipping threshold; 0 disables.")
    dtype: str = _f("bfloat16", f"Training precision: one of {DTYPES}.")
    device: str = _f("auto", "'auto' (accelerator of this rank), 'cpu', or e.g. 'cuda:0' for one process.")
    seed: int = _f(42, "Seed for initialisation and data order.")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (null = run all epochs).")
    log_interval: int = _f(100, "Optimizer steps between log lines.")
    save_interval: int = _f(100, "Optimizer steps between checkpoints.")
    save_interval_minutes: float | None = _f(None, "Also checkpoint once this many minutes passed since the last "
                                                   "checkpoint (null = by steps only): at GPU speed a step count "
                                                   "can mean a checkpoint every few seconds.")
    keep_checkpoints: int = _f(3, "Complete checkpoints kept; older ones are deleted.")
    async_checkpoint: bool = _f(False, "Write checkpoints in the background with DeepSpeed's decoupled writer (a "
                                       "process per rank): training goes on while the files are written, and the "
                                       "checkpoint is complete at the next optimizer step. ZeRO-3 only (what "
                                       "DeepSpeed 0.19's writer supports).")
    resume: str = _f("auto", "'auto' (newest intact checkpoint in out_dir), 'never', or a checkpoint path.")
    previous_run: str = _f("refuse", "A fresh run in an out_dir with another run's checkpoints: 'refuse' (stop), "
                                     "or 'move' (its outputs go to out_dir/previous-<time>/).")
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage 0-3 (selects ds_configs/zero<N>.json).")
    deepspeed_config: str | None = _f(None, "DeepSpeed JSON overriding zero_stage's file (no batch fields).")
    trainable: str = _f("projector", f"What trains: one of {TRAINABLE_POLICIES}.")
    trainable_patterns: list[str] = _f([], "With trainable=patterns: fnmatch patterns of parameter names.")
    peak_flops: float | None = _f(None, "Peak FLOP/s per device for MFU; null = auto-detect known GPUs.")
    compile: bool = _f(False, "torch.compile each language-model block and a frozen vision tower (a one-time "
                              "compile, then faster steps; on CPU it needs a C++ compiler).")
    max_bad_steps: int = _f(5, "Optimizer steps in a row skipped for a NaN/Inf loss before the run stops.")
    eval_interval: int = _f(0, "Optimizer steps between evaluations; 0 = at the end only.")
    eval_answers: int = _f(4, "At each evaluation, answer the first this many samples of data.eval_shards greedily "
                              "and log each answer next to its reference (metrics.jsonl and the console); 0 = none.")
    eval_answer_tokens: int = _f(64, "Longest answer generated for train.eval_answers, in tokens.")
    monitors: list[str] = _f(["csv", "tensorboard"], f"Where every metric of metrics.jsonl also goes, keyed by "
                                                     f"optimizer step: any of {MONITORS} (out_dir/logs/metrics.csv, "
                                                     "out_dir/logs/tensorboard/); [] for metrics.jsonl alone.")
    wandb_project: str | None = _f(None, "Also log every metric to this Weights & Biases project (needs "
                                         "`pip install wandb`; the preflight checks it is installed).")


@dataclass
class Config:
    """A whole run's configuration: the three sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (what meta.json stores and `config_from_dict` reads back)."""
        return dataclasses.asdict(self)


# The seed guide's flags (and the trainer's contract flags) and the fields they set.
SEED_FLAGS = {
    "out_dir": "train.out_dir", "epochs": "train.epochs", "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate", "device": "train.device", "dtype": "train.dtype",
    "num_workers": "data.num_workers", "accumulation_steps": "train.accumulation_steps",
    "grad_clip": "train.grad_clip", "log_interval": "train.log_interval", "save_interval": "train.save_interval",
    "dim": "model.hidden_size", "n_layers": "model.num_hidden_layers", "max_seq_len": "data.max_seq_len",
    "use_moe": "model.use_moe", "train_shards": "data.train_shards", "eval_shards": "data.eval_shards",
    "max_steps": "train.max_steps", "seed": "train.seed", "zero_stage": "train.zero_stage",
    "deepspeed_config": "train.deepspeed_config", "resume": "train.resume", "log_samples": "data.log_samples",
}

_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
SECTIONS = _SECTIONS
"""The config's sections (YAML top-level keys) and the dataclass of each."""
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check/convert one value against a field type; strings (from the command line) are parsed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(value, args[0], name)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, item, name) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string (quote it in YAML), got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {name}")


def _unknown(key: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{where}{key}'{hint}; known: {', '.join(sorted(known))}"


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Build a Config from nested dicts (YAML), reporting every unknown key and bad value at once."""
    problems: list[str] = []
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError([f"the config must be a mapping of sections, got {type(data).__name__}"])
    sections = {}
    for key in data:
        if key not in _SECTIONS:
            problems.append(_unknown(key, list(_SECTIONS), ""))
    for name, cls in _SECTIONS.items():
        raw = data.get(name) or {}
        if not isinstance(raw, dict):
            problems.append(f"section '{name}' must be a mapping, got {raw!r}")
            raw = {}
        types_ = _field_types(cls)
        values = {}
        for key, value in raw.items():
            if key not in types_:
                problems.append(_unknown(key, list(types_), f"{name}."))
                continue
            try:
                values[key] = _coerce(value, types_[key], f"{name}.{key}")
            except ValueError as err:
                problems.append(str(err))
        sections[name] = cls(**values)
    if problems:
        raise ConfigError(problems)
    return Config(**sections)


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Set dotted fields (`train.learning_rate`) or seed flags (`learning_rate`), all problems at once."""
    data = config.to_dict()
    problems = []
    for key, value in overrides.items():
        dotted = SEED_FLAGS.get(key, key)
        section, _, name = dotted.partition(".")
        if section not in _SECTIONS or not name:
            problems.append(_unknown(key, list(SEED_FLAGS) + [f"{s}.<field>" for s in _SECTIONS], "--"))
            continue
        if name not in data[section]:
            problems.append(_unknown(name, list(data[section]), f"--{section}."))
            continue
        data[section][name] = value
    if problems:
        raise ConfigError(problems)
    return config_from_dict(data)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (safe_load only) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"])
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError([f"{path} is not valid YAML: {err}"]) from err
    config = config_from_dict(data)
    return apply_overrides(config, overrides or {})


def _value_problems(cfg: Config) -> list[str]:
    m, d, t = cfg.model, cfg.data, cfg.train
    checks = [
        (t.stage in ("pretrain", "sft"), f"train.stage must be 'pretrain' or 'sft', got {t.stage!r}"),
        (t.dtype in DTYPES, f"train.dtype must be one of {DTYPES}, got {t.dtype!r}"),
        (t.trainable in TRAINABLE_POLICIES, f"train.trainable must be one of {TRAINABLE_POLICIES}, got {t.trainable!r}"),
        (d.batching in BATCHING, f"data.batching must be one of {BATCHING}, got {d.batching!r}"),
        (t.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}"),
        (t.previous_run in ("refuse", "move"), f"train.previous_run must be 'refuse' or 'move', got {t.previous_run!r}"),
        (t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}"),
        (t.eval_answers >= 0, f"train.eval_answers must be >= 0 (0 = none), got {t.eval_answers}"),
        (t.eval_answer_tokens >= 1, f"train.eval_answer_tokens must be >= 1, got {t.eval_answer_tokens}"),
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (t.accumulation_steps >= 1, f"train.accumulation_steps must be >= 1, got {t.accumulation_steps}"),
        (t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}"),
        (0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}"),
        (t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}"),
        (t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {t.grad_clip}"),
        (t.log_interval >= 1, f"train.log_interval must be >= 1, got {t.log_interval}"),
        (t.save_interval >= 1, f"train.save_interval must be >= 1, got {t.save_interval}"),
        (t.save_interval_minutes is None or t.save_interval_minutes > 0,
         f"train.save_interval_minutes must be > 0 or null, got {t.save_interval_minutes}"),
        (t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}"),
        (not t.async_checkpoint or t.zero_stage == 3,
         f"train.async_checkpoint needs train.zero_stage 3 (DeepSpeed's decoupled writer fails under ZeRO-0/1/2); "
         f"got zero_stage {t.zero_stage}: set zero_stage 3 or async_checkpoint false"),
        (t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be >= 1 or null, got {t.max_steps}"),
        (t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}"),
        (set(t.monitors) <= set(MONITORS) and len(set(t.monitors)) == len(t.monitors),
         f"train.monitors must be distinct names out of {MONITORS} (W&B: set train.wandb_project), got {t.monitors}"),
        (len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), f"train.betas must be two numbers in [0, 1), got {t.betas}"),
        (d.max_seq_len >= 8, f"data.max_seq_len must be >= 8, got {d.max_seq_len}"),
        (d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}"),
        (d.chunk_size >= 1, f"data.chunk_size must be >= 1, got {d.chunk_size}"),
        (0 <= d.max_bad_fraction < 1, f"data.max_bad_fraction must be in [0, 1), got {d.max_bad_fraction}"),
        (bool(d.train_shards), "data.train_shards is empty: give shard folders (--train_shards data/shards/pretrain)"),
        (d.train_weights is None or len(d.train_weights) == len(d.train_shards),
         f"data.train_weights has {len(d.train_weights or [])} entries for {len(d.train_shards)} train_shards"),
        (d.max_pixels >= 1, f"data.max_pixels must be >= 1, got {d.max_pixels}"),
        (m.projector in PROJECTORS, f"model.projector must be one of {PROJECTORS}, got {m.projector!r}"),
        (m.pixel_shuffle >= 1, f"model.pixel_shuffle must be >= 1, got {m.pixel_shuffle}"),
        (m.vision_cls in ("drop", "keep"), f"model.vision_cls must be 'drop' or 'keep', got {m.vision_cls!r}"),
    ]
    return [message for ok, message in checks if not ok] + architecture_problems(m.architecture(), "model.")


def _policy_problems(cfg: Config) -> list[str]:
    """Freezing policy against stage and initial weights."""
    m, t = cfg.model, cfg.train
    problems = []
    if t.trainable == "patterns" and not t.trainable_patterns:
        problems.append("train.trainable is 'patterns' but train.trainable_patterns is empty")
    if t.trainable != "patterns" and t.trainable_patterns:
        problems.append(f"train.trainable_patterns is set but train.trainable is {t.trainable!r}; set trainable: patterns")
    if t.stage == "sft" and t.trainable in ("projector", "projector+last_layer"):
        problems.append(
            f"train.stage is 'sft' but train.trainable is {t.trainable!r}: SFT trains the language model "
            "(use trainable: projector+lm, or stage: pretrain)"
        )
    lm_frozen = t.trainable in ("projector", "projector+last_layer")
    if lm_frozen and m.init_weights is None:
        problems.append(
            f"train.trainable is {t.trainable!r} but model.init_weights is null: the language model would stay "
            "frozen at random init (set model.init_weights to lm_512.pth, or trainable: all)"
        )
    if m.vision_trainable and t.trainable not in ("all", "patterns"):
        problems.append(f"model.vision_trainable is true but train.trainable is {t.trainable!r}; use trainable: all")
    if m.vision_model == BUILTIN_TINY_VISION and not m.vision_trainable and m.init_weights is None:
        problems.append(
            f"model.vision_model is '{BUILTIN_TINY_VISION}' (random init) but frozen and not loaded from "
            "init_weights: set model.vision_trainable: true"
        )
    return problems


def config_problems(cfg: Config) -> list[str]:
    """Every problem of a config's values and cross-field rules (files, data and launchers are the
    preflight's: `vlm.train.preflight`)."""
    return _value_problems(cfg) + _policy_problems(cfg)


def parse_cli_overrides(argv: list[str]) -> tuple[str | None, dict[str, str], list[str]]:
    """Split argv into (--config path, overrides, leftovers the caller may reject).

    Accepts `--key value`, `--key=value` and bare boolean flags (`--log_samples`, `--use_moe`).
    """
    config_path, overrides, leftovers = None, {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            leftovers.append(arg)
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if has_value else "true"
            i += 1 if has_value else 0
        if key == "config":
            config_path = value
        else:
            overrides[key] = value
        i += 1
    return config_path, overrides, leftovers


def config_from_argv(argv: list[str], own_flags: tuple[str, ...] = ()) -> tuple[Config, dict[str, str]]:
    """The Config of a command line (`--config PATH` plus overrides) and the values of the command's
    `own_flags` (e.g. the doctor's `--world_size`), taken out before the overrides are applied; the second
    dict also holds "config": PATH when one was given.

    Raises ConfigError for stray arguments and for every config problem found while loading.
    """
    config_path, overrides, leftovers = parse_cli_overrides(argv)
    if leftovers:
        raise ConfigError([f"unexpected arguments {leftovers}; flags look like --name value"])
    own = {name: overrides.pop(name) for name in own_flags if name in overrides}
    if config_path is not None:
        own["config"] = config_path
    return load_config(config_path, overrides), own

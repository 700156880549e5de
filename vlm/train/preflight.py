"""Preflight: every start-up check in one pass, a report of everything that would stop a run.

Used by the trainer on every rank at start-up (`check_at_startup`, without loading weights: all ranks stop
if any rank finds a problem) and by `python -m vlm.doctor` (with loading, before any GPU hour is spent).
Checks, each reported as ok / warning / PROBLEM:
  config    every value and cross-field rule of vlm/config.py
  launcher  RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from whichever launcher set them (deepspeed,
            torchrun, SLURM, Open MPI) are consistent; MASTER_ADDR resolves; LOCAL_RANK has a GPU
  batch     global batch = batch_size x accumulation_steps x world size; the data gives at least one
            optimizer step; max_steps reachable; DataLoader workers and shards against ranks
  data      the training sources open: each manifest.json is read (fetched, for a folder at an https:// or
            s3:// URL, with data.remote_*), never the shards' index files, which only the workers load
  cpus      this process may run on data.num_workers + 1 CPUs (its affinity: srun --cpus-per-task, taskset)
  compile   with train.compile, a C++ compiler for torch.compile
  monitors  the package of each configured metrics monitor (train.monitors, train.wandb_project) is installed
  files     tokenizer, vision encoder, initial weights, DeepSpeed JSON (leaving batch sizes, optimizer and
            precision to the YAML), eval shards exist, and (with `load`) load:
            the model is built with its starting weights, strictly
  out_dir   writable; not locked by a live run; no earlier run's checkpoints when starting fresh
            (train.resume never); free disk for keep_checkpoints + 1 checkpoints (from the parameter count)
Nothing here starts a process group, imports DeepSpeed or writes outside temporary folders.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlm.build import build, configured_vision_folder, model_config
from vlm.config import BUILTIN_TINY_VISION, Config, ConfigError, config_problems
from vlm.data import plan
from vlm.data.remote import RemoteSettings, is_remote
from vlm.data.sources import SourceError, resolve_sources
from vlm.model.vision_encoder import (
    VisionEncoderError,
    build_vision_encoder,
    load_vision_encoder,
    read_vision_config,
    tiny_vision_config,
)
from vlm.model.vlm import MiniMindVLM
from vlm.model.weights import read_state_dict
from vlm.tokenizer import image_placeholder_id, load_tokenizer
from vlm.train.checkpoint import CheckpointError
from vlm.train.ds_config import ds_config_problems
from vlm.train.freeze import apply_trainable_policy
from vlm.train.launcher import launcher_problems, normalize_launcher_env
from vlm.train.monitor import monitor_problems
from vlm.train.ownership import claim_out_dir, lock_problem

log = logging.getLogger("vlm.preflight")

OK, WARNING, PROBLEM = "ok", "warning", "PROBLEM"
OPTIMIZER_BYTES_PER_TRAINABLE = 12  # fp32 master weights + two Adam moments, summed over all ZeRO shards


@dataclass
class Finding:
    """One line of the report: level (ok / warning / PROBLEM), check name and message."""

    level: str
    check: str
    message: str


@dataclass
class Report:
    """Every finding of a preflight, in order."""

    findings: list[Finding] = field(default_factory=list)

    def add(self, level: str, check: str, message: str) -> None:
        """Append a finding."""
        self.findings.append(Finding(level, check, message))

    def of(self, level: str) -> list[Finding]:
        """The findings of one level."""
        return [f for f in self.findings if f.level == level]

    @property
    def problems(self) -> list[str]:
        """'check: message' of every PROBLEM."""
        return [f"{f.check}: {f.message}" for f in self.of(PROBLEM)]

    def render(self, title: str, levels: tuple[str, ...] = (OK, WARNING, PROBLEM)) -> str:
        """The report as text: a title, one line per finding of `levels`, and the verdict."""
        lines = [title]
        lines += [f"  {f.level:<8} {f.check:<9} {f.message}" for f in self.findings if f.level in levels]
        problems, warnings = len(self.of(PROBLEM)), len(self.of(WARNING))
        verdict = "fix the problems before launching" if problems else "ready to launch"
        lines.append(f"{problems} problem(s), {warnings} warning(s): {verdict}")
        return "\n".join(lines)


def check_config(cfg: Config, report: Report) -> None:
    """The config's values and cross-field rules."""
    problems = config_problems(cfg)
    for problem in problems:
        report.add(PROBLEM, "config", problem)
    if not problems:
        report.add(OK, "config", f"stage {cfg.train.stage}, trains {cfg.train.trainable}, ZeRO {cfg.train.zero_stage}")


def check_launcher(env: Mapping[str, str], report: Report) -> int:
    """Launcher variables as the trainer would read them (on a copy: nothing is changed). Returns WORLD_SIZE."""
    env = dict(env)
    # What the user set, checked as given: a world of one replaces them, but the doctor is also run before a
    # launch to check the values the job will use (`MASTER_ADDR=A python -m vlm.doctor ...` on each node).
    given = {key: env[key] for key in ("MASTER_ADDR", "MASTER_PORT") if env.get(key)}
    try:
        dist = normalize_launcher_env(env)
    except (KeyError, ValueError) as err:
        report.add(PROBLEM, "launcher", f"launcher variables are incomplete or not integers: {err}")
        return 1
    problems = launcher_problems({**env, **given})
    local_world = env.get("LOCAL_WORLD_SIZE", "")
    if local_world.isdigit() and not dist.local_rank < int(local_world):
        problems.append(f"LOCAL_RANK={dist.local_rank} is not below LOCAL_WORLD_SIZE={local_world}")
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        # One launcher per node inside srun/mpirun gives WORLD_SIZE >= tasks; fewer means stale variables.
        if env.get(key, "").isdigit() and dist.world_size < int(env[key]):
            problems.append(f"WORLD_SIZE={dist.world_size} but {key}={env[key]} processes were started: RANK/"
                            "WORLD_SIZE left over in the environment? unset RANK WORLD_SIZE LOCAL_RANK first")
    address = given.get("MASTER_ADDR", env["MASTER_ADDR"])
    try:
        socket.getaddrinfo(address, None)
    except OSError as err:
        problems.append(f"MASTER_ADDR={address} does not resolve on this host ({err})")
    problems += _gpu_problems(dist.local_rank, env)
    for problem in problems:
        report.add(PROBLEM, "launcher", problem)
    if not problems:
        report.add(OK, "launcher", f"{dist.launcher}: rank {dist.rank} of {dist.world_size}, local rank "
                                   f"{dist.local_rank}, master {env['MASTER_ADDR']}:{env['MASTER_PORT']}")
    return dist.world_size


def _gpu_problems(local_rank: int, env: Mapping[str, str]) -> list[str]:
    """Each process uses GPU LOCAL_RANK; it must be visible (CPU runs have nothing to check)."""
    if env.get("DS_ACCELERATOR", "cuda") != "cuda" or not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    if local_rank < count:
        return []
    return [f"LOCAL_RANK={local_rank} but only {count} GPU(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one process per GPU"]


def check_batch(cfg: Config, world_size: int, report: Report) -> None:
    """Batch arithmetic against the data: steps per epoch, dropped tail, workers and shards per rank."""
    t, d = cfg.train, cfg.data
    try:
        sources = resolve_sources(d.train_shards, d.train_weights, remote=_remote_settings(cfg))
    except (SourceError, ValueError) as err:  # ValueError: a data.remote_* value out of range
        report.add(PROBLEM, "data", str(err))
        return
    remote = [s.spec for s in sources.sources if s.exact and is_remote(s.spec)]
    if remote:
        report.add(OK, "data", f"{', '.join(remote)}: manifest fetched; each worker fetches the index of a shard it "
                               "reads and each sample by a ranged GET (shard sha256 not checked on ranges)")
    try:
        geometry = plan.Geometry(world_size, d.num_workers, t.batch_size, t.accumulation_steps)
    except ValueError:
        return  # a non-positive size: already a config problem
    arithmetic = (f"global batch {t.batch_size} x {t.accumulation_steps} x {world_size} ranks = "
                  f"{geometry.global_batch}")
    if sources.exact:
        samples = plan.epoch_size(sources.shard_counts, sources.weights)
    elif d.samples_per_epoch:
        samples = d.samples_per_epoch
    else:
        report.add(PROBLEM, "data", "sources without a manifest need data.samples_per_epoch (resampled mode)")
        return
    steps = geometry.steps_per_epoch(samples)
    if steps < 1:
        report.add(PROBLEM, "batch", f"{arithmetic} but an epoch has only {samples} samples: no optimizer step; "
                                     "lower train.batch_size / accumulation_steps or use fewer ranks")
        return
    report.add(OK, "batch", f"{arithmetic}; {samples} samples per epoch = {steps} steps, "
                            f"{samples - steps * geometry.global_batch} dropped per epoch (tail under one global batch)")
    total = plan.total_steps(samples, geometry, t.epochs, t.max_steps)
    if t.warmup_steps > total:
        report.add(WARNING, "batch", f"train.warmup_steps {t.warmup_steps} is more than the {total} steps of the "
                                     "run: the learning rate never reaches train.learning_rate")
    if t.max_steps and t.max_steps > total:
        report.add(WARNING, "batch", f"train.max_steps {t.max_steps} is more than epochs x steps per epoch = "
                                     f"{total}: the run ends after {total} steps")
    micro_batches = plan.micro_batches(samples, geometry)
    if d.num_workers > micro_batches:
        report.add(WARNING, "batch", f"data.num_workers {d.num_workers} is more than the {micro_batches} "
                                     "micro-batches each rank runs per epoch: some workers stay idle")
    if not sources.exact:
        urls, _ = sources.stream_urls()
        readers = world_size * geometry.slots
        if len(urls) < readers:
            report.add(WARNING, "data", f"{len(urls)} shard(s) for {readers} readers ({world_size} ranks x "
                                        f"{geometry.slots} workers): readers draw the same shards")


def _remote_settings(cfg: Config) -> RemoteSettings:
    """Timeout and retries for shard folders at URLs (data.remote_*); ValueError names a value out of range."""
    return RemoteSettings.from_config(cfg.data)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (what srun, taskset or a container allow), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_cpus(cfg: Config, report: Report, env: Mapping[str, str] | None = None) -> None:
    """This process's CPUs against what a rank runs: itself and data.num_workers DataLoader workers. Ranks that
    a launcher started side by side on one node (torchrun's LOCAL_WORLD_SIZE, deepspeed's LOCAL_SIZE) without
    pinning each (srun does: SLURM_STEP_ID) share the CPUs they all see."""
    workers = cfg.data.num_workers
    if workers < 0:
        return  # already a config problem
    env = os.environ if env is None else env
    local = 1 if "SLURM_STEP_ID" in env else int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)
    visible = usable_cpus()
    cpus, needed = max(visible // max(local, 1), 1), workers + 1
    shared = f" ({visible} seen, shared by {local} ranks on this node)" if local > 1 else ""
    if cpus >= needed:
        report.add(OK, "cpus", f"{cpus} CPU(s){shared} for this rank and its {workers} DataLoader worker(s)")
        return
    report.add(WARNING, "cpus", f"this process may use {cpus} CPU(s){shared} but runs itself and data.num_workers "
                                f"{workers} DataLoader worker(s): {needed} processes share {cpus} CPU(s) and the "
                                f"data may not keep up; lower data.num_workers to {max(cpus - 1, 0)}, or give "
                                f"each rank {needed} CPUs (SLURM: sbatch --cpus-per-task={needed}, which "
                                f"launch/slurm/train.sbatch passes on to srun, or VLM_SRUN_ARGS="
                                f"--cpus-per-task={needed})")


def check_compile(cfg: Config, report: Report) -> None:
    """train.compile: on a CPU torch.compile's inductor builds C++ and needs a compiler (without one the run
    would stop at its first batch); under ZeRO-3 DeepSpeed's parameter hooks run inside the compiled blocks,
    a combination this project has not tested."""
    if not cfg.train.compile:
        return
    cxx = os.environ.get("CXX", "").split()
    compiler = cxx[-1] if cxx else next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    on_cpu = cfg.train.device == "cpu" or not torch.cuda.is_available()
    if on_cpu and (compiler is None or shutil.which(compiler) is None):
        report.add(PROBLEM, "compile", "train.compile is on but no C++ compiler was found (c++, g++, clang++ or "
                                       "$CXX) for torch.compile's CPU code: install one, or set train.compile: false")
    else:
        report.add(OK, "compile", f"train.compile: torch.compile{f' with {compiler}' if on_cpu else ''}")
    if cfg.train.zero_stage == 3:
        report.add(WARNING, "compile", "train.compile with ZeRO-3 is untested here: DeepSpeed gathers parameters "
                                       "in hooks inside the compiled blocks (expect graph breaks); ZeRO-2 is tested")


def check_monitors(cfg: Config, report: Report) -> None:
    """Each configured metrics monitor's package is installed: the trainer opens the monitors after building
    the model, where a missing one would stop the run with an ImportError. Only problems are reported."""
    for problem in monitor_problems(cfg.train):
        report.add(PROBLEM, "monitors", problem)


def check_files(cfg: Config, report: Report) -> bool:
    """Every configured file and folder exists and looks right (without loading weights). True if all do."""
    m = cfg.model
    before = len(report.of(PROBLEM))
    tok = Path(m.tokenizer) if m.tokenizer else None
    if tok is not None and not tok.is_dir():
        report.add(PROBLEM, "files", f"model.tokenizer: folder {tok} does not exist")
    elif tok is not None and not any((tok / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        report.add(PROBLEM, "files", f"model.tokenizer: {tok} has no tokenizer.json / tokenizer_config.json")
    vision = configured_vision_folder(cfg)
    if vision is not None and not vision.is_dir():
        report.add(PROBLEM, "files", f"model.vision_model: folder {vision} does not exist (put CLIP ViT-B/16 "
                                     f"there, or use '{BUILTIN_TINY_VISION}')")
    elif vision is not None and not (vision / "config.json").is_file():
        report.add(PROBLEM, "files", f"model.vision_model: {vision} has no config.json (put CLIP ViT-B/16 there, "
                                     f"or use '{BUILTIN_TINY_VISION}')")
    if m.init_weights is not None and not Path(m.init_weights).exists():
        report.add(PROBLEM, "files", f"model.init_weights: {m.init_weights} does not exist")
    for problem in ds_config_problems(cfg.train):  # the DeepSpeed JSON exists, and leaves the YAML its fields
        report.add(PROBLEM, "files", problem)
    if cfg.data.eval_shards:
        try:
            resolve_sources(cfg.data.eval_shards, label="data.eval_shards", remote=_remote_settings(cfg))
        except (SourceError, ValueError) as err:
            report.add(PROBLEM, "files", str(err))
    ok = len(report.of(PROBLEM)) == before
    if ok:
        report.add(OK, "files", f"tokenizer {tok or 'built-in'}, vision encoder {vision or BUILTIN_TINY_VISION}, "
                                f"initial weights {m.init_weights or 'none (random init)'}")
    return ok


def load_model(cfg: Config, report: Report) -> dict[str, int] | None:
    """Load tokenizer, vision encoder and starting weights and build the model from them, as the trainer will."""
    steps = [("model.tokenizer", cfg.model.tokenizer or "built-in", _load_tokenizer),
             ("model.vision_model", configured_vision_folder(cfg), _load_vision),
             ("model.init_weights", cfg.model.init_weights, _read_weights)]
    for label, path, load in steps:
        if path is None:
            continue
        try:
            load(path)
        except Exception as err:  # the loaders raise many types; any of them is this finding
            report.add(PROBLEM, "files", f"{label}: {path} does not load: {_short(err)}")
            return None
    cfg = copy.deepcopy(cfg)
    with tempfile.TemporaryDirectory(prefix="vlm-doctor-") as scratch:
        cfg.train.out_dir = scratch  # the built-in tiny encoder is written there, not into the real out_dir
        try:
            built = build(cfg)
            counts = apply_trainable_policy(built.model, cfg.train.trainable, cfg.train.trainable_patterns)
        except Exception as err:  # e.g. weights whose names or shapes do not fit the configured model
            report.add(PROBLEM, "files", f"building the model failed: {_short(err)}")
            return None
    counts["saved"] = sum(p.numel() for p in built.model.parameters())
    report.add(OK, "files", f"model built and starting weights loaded: {counts['total']:,} parameters, "
                            f"{counts['trainable']:,} trainable")
    return counts


def _load_tokenizer(path: str) -> None:
    load_tokenizer(None if path == "built-in" else path)


def _load_vision(path: Path) -> None:
    load_vision_encoder(path)


def _read_weights(path: str) -> None:
    if Path(path).is_file():  # a folder (an earlier stage's export) is loaded by build() itself
        read_state_dict(path)


def _short(err: Exception, chars: int = 400) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= chars else text[:chars] + " ..."


def estimate_parameters(cfg: Config) -> dict[str, int]:
    """Parameter counts of the configured model, built on the meta device (no memory, no weights read)."""
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    folder = configured_vision_folder(cfg)
    vision_config = tiny_vision_config() if folder is None else read_vision_config(folder)
    image_id = image_placeholder_id(tokenizer, cfg.model.image_placeholder)
    with torch.device("meta"):
        model = MiniMindVLM(model_config(cfg, tokenizer, image_id, vision_config), build_vision_encoder(vision_config),
                            trainable_vision=cfg.model.vision_trainable)
    counts = apply_trainable_policy(model, cfg.train.trainable, cfg.train.trainable_patterns)
    counts["saved"] = sum(p.numel() for p in model.parameters())  # a frozen vision encoder is not saved
    return counts


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out_dir(cfg: Config, report: Report, counts: dict[str, int] | None, check_lock: bool = True) -> None:
    """out_dir (or the folder it will be made in) is writable and has room for the checkpoints kept; with
    `check_lock`, no live run holds it (the trainer takes the lock itself instead of probing it)."""
    out = Path(cfg.train.out_dir)
    base = _existing_ancestor(out)
    if not base.is_dir():
        report.add(PROBLEM, "out_dir", f"train.out_dir: {base} exists but is not a folder")
        return
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".vlm-doctor-"):
            pass
    except OSError as err:
        where = "" if base == out.absolute() else f" (it does not exist yet; {base} is where it would be made)"
        report.add(PROBLEM, "out_dir", f"train.out_dir: cannot write in {base}{where}: {err.strerror}")
        return
    busy = lock_problem(out) if check_lock and out.is_dir() else None
    if busy is not None:
        report.add(PROBLEM, "out_dir", busy)
    if cfg.train.resume == "never":
        try:
            claim_out_dir(out, cfg.train.previous_run, move=False)
        except CheckpointError as err:
            report.add(PROBLEM, "out_dir", str(err))
    free = shutil.disk_usage(base).free
    if counts is None:
        report.add(OK, "out_dir", f"{out} is writable; {free / 2**30:.1f} GiB free")
        return
    bytes_per_weight = 4 if cfg.train.dtype == "float32" else 2
    one = counts["saved"] * bytes_per_weight + counts["trainable"] * OPTIMIZER_BYTES_PER_TRAINABLE
    kept = cfg.train.keep_checkpoints + 1  # a new checkpoint is written before the oldest is deleted
    summary = (f"{out} is writable; {free / 2**30:.1f} GiB free, one checkpoint is about {one / 2**30:.2f} GiB "
               f"({kept} on disk at once with keep_checkpoints={cfg.train.keep_checkpoints})")
    if free < one:
        report.add(PROBLEM, "out_dir", f"not enough disk for one checkpoint: {summary}")
    elif free < one * kept:
        report.add(WARNING, "out_dir", f"disk may fill up: {summary}; lower train.keep_checkpoints or free space")
    else:
        report.add(OK, "out_dir", summary)


def run_checks(cfg: Config, env: Mapping[str, str], world_size: int | None = None, load: bool = True,
               check_lock: bool = True) -> Report:
    """Every check, in order; none starts a process group or writes anything outside temporary folders."""
    report = Report()
    check_config(cfg, report)
    launcher_world = check_launcher(env, report)
    world = world_size or launcher_world
    if world_size and launcher_world > 1 and world_size != launcher_world:
        report.add(WARNING, "launcher", f"--world_size {world_size} differs from the launcher's WORLD_SIZE "
                                        f"{launcher_world}; the batch check uses {world_size}")
    if cfg.data.train_shards:
        check_batch(cfg, world, report)
    check_cpus(cfg, report, env)
    check_compile(cfg, report)
    check_monitors(cfg, report)
    files_ok = check_files(cfg, report)
    counts = None
    if files_ok and load:
        counts = load_model(cfg, report)
    elif files_ok:
        try:
            counts = estimate_parameters(cfg)
        except ConfigError as err:  # vision settings the tower does not fit: the run would stop on them
            for problem in err.problems:
                report.add(PROBLEM, "config", problem)
        except (OSError, ValueError, VisionEncoderError) as err:
            report.add(WARNING, "files", f"could not count the model's parameters: {err}")
    check_out_dir(cfg, report, counts, check_lock)
    return report


def check_at_startup(cfg: Config, world_size: int, rank: int,
                     any_rank: Callable[[bool], bool] = lambda flag: flag) -> Report:
    """The start-up pass of every rank: all checks but the loading. `any_rank(flag)` is the collective that
    tells whether any rank found a problem (the trainer passes `vlm.train.distributed.any_rank`), so all ranks
    stop together. Raises ConfigError naming this rank's problems, or saying another rank had some."""
    # Ranks probing the out_dir's lock at once would find each other: rank 0 takes it right after this instead.
    report = run_checks(cfg, os.environ, world_size=world_size, load=False, check_lock=False)
    failed_somewhere = any_rank(bool(report.problems))
    if rank == 0 and report.of(WARNING):
        log.warning(report.render("preflight warnings:", levels=(WARNING,)))
    if report.problems:
        raise ConfigError([f"rank {rank}: {p}" for p in report.problems])
    if failed_somewhere:
        raise ConfigError([f"another rank's preflight found problems (see its log); rank {rank} found none"])
    return report

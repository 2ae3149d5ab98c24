"""Train a network by hand-written backpropagation, configured by Hydra.

    python experiments/train.py                                   # MLP on real MNIST
    python experiments/train.py experiment=nielsen_ch1            # a preset
    python experiments/train.py dataset=digits model.features=[64,10] optimizer=adam seed=3
    python experiments/train.py -m optimizer.learning_rate=0.3,0.1,0.03   # a sweep

The run directory gets ``metrics.json`` (strict JSON: a value that is not a finite number is
``null``), TensorBoard event files (``tb/<run name>/``) and checkpoints (``checkpoints/``).
``train(cfg)`` does the work and is what tests call; ``main`` is the thin Hydra wrapper that
turns bad configs into one clear line and a non-zero exit, and returns the objective for
sweepers. This script owns printing, the progress bar and wall-clock time; the math lives in
``bpjax``.

What a run says and records:

- Every config key must be read by something (``bpjax.cli.check_keys``): a key its
  ``_target_`` doesn't take, or that no code reads (``+logger.flush_sec=3``), is one ``error:``
  line naming the nearest valid key, exit 2, before any data are loaded. So is a damaged or
  missing data file. In a ``-m`` sweep such a job is recorded as ``"status": "invalid"`` and
  the sweep goes on.
- TensorBoard names each run after its command-line overrides: the events of
  ``train.py -m optimizer=sgd,adam`` go to ``multirun/DATE/TIME/0/tb/optimizer=sgd/`` and
  ``.../1/tb/optimizer=adam/`` (``defaults`` without overrides; bookkeeping overrides such as
  ``trainer.run_dir``, ``trainer.resume``, ``trainer.progress``, ``logger.*`` and ``hydra.*``
  are left out; ``/`` becomes ``_``). A resumed run writes into its run's existing directory,
  so its curves continue. Every run records its hyperparameters for the HParams tab without
  an experiment summary, so TensorBoard lists the union of every run's hyperparameters.
  Events are flushed at the end of every epoch.
- On a terminal, one line per epoch is kept above the progress bar; elsewhere (a log file, a
  pipe) the same lines are printed plainly. In a sweep every line is labelled ``[job N]``.
- A loss that explodes (an epoch's mean training loss above ``bpjax.reporting.EXPLODED``,
  1000, times the loss of the first step trained, i.e. of the untrained network) is warned
  about when it happens, recorded (``loss_exploded`` in ``metrics.json``) and repeated in the
  final line.
- An interrupt (Ctrl-C, SIGTERM) prints the command that resumes the run, with the running
  interpreter. A resume says which checkpoint and epoch it continues from (after the first
  resumed epoch: only then has ``fit`` accepted the checkpoint) and which settings changed; a
  run that already reached ``trainer.epochs`` (or stopped early) has nothing to do and leaves
  ``metrics.json`` as it was. A resume stays in its run directory (``hydra.run.dir`` follows
  ``trainer.run_dir``, see ``conf/config.yaml``).
- Several processes (``trainer.distributed=true``, one per host or per accelerator, each started
  with the same command but for its ``trainer.process_id`` where the cluster doesn't supply
  it): they join before anything else (``bpjax.distributed.initialize``), work in process 0's
  run directory, which all of them must see, and start together or not at all: an error in one
  (a data file missing on its host, say) is every process's ``error:`` line, exit 2. Process 0
  alone writes ``metrics.json`` and TensorBoard events and prints the run's lines; the others
  print only their errors, labelled ``[process N]``. A lost process stops the others within
  seconds (exit 75, ``bpjax.distributed.EXIT_LOST``), with a line naming it; restarting every
  process with ``trainer.resume=true`` continues from the last checkpoint.
"""

import functools
import inspect
import json
import math
import os
import pathlib
import signal
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    OverrideParseException,
)
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

import bpjax
from bpjax import cli, distributed
from bpjax import losses as losses_lib
from bpjax._atomic import atomic_write
from bpjax._errors import first_line
from bpjax.checkpoint import CheckpointManager, load_metadata
from bpjax.grad import MODES
from bpjax.layers import NeedsImages
from bpjax.logging import NullLogger, TensorBoardLogger, flatten_hparams
from bpjax.reporting import (
    Console,
    EpochReporter,
    format_number,
    network_table,
    run_name,
    tensorboard_dir,
)
from bpjax.train import (
    WEIGHT_DECAY_MASKS,
    WEIGHT_DECAY_MODES,
    check_rule,
    encode_targets,
    make_optimizer,
    output_shape,
    single_output_binary,
    target_mismatch,
)
from bpjax.trainer import (
    ResumeError,
    TrainingDiverged,
    default_monitor,
    fit,
    make_mesh,
    valid_monitors,
)

# Compilations are counted through jax's monitoring events: one per XLA backend compile, and
# one per program loaded from jax's persistent compilation cache instead (where one is set:
# JAX_COMPILATION_CACHE_DIR), so the count is the same with and without the cache.
_COMPILATIONS = [0]
_COMPILATION_EVENTS = (
    "/jax/core/compile/backend_compile_duration",
    "/jax/compilation_cache/cache_retrieval_time_sec",  # recorded on cache hits only
)


def _count_compilation(event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs  # unused: only the count matters
    if event in _COMPILATION_EVENTS:
        _COMPILATIONS[0] += 1


_LISTENING: list[bool] = []


def _listen_for_compilations() -> None:
    # At the first train(), not at import: sweep launchers (joblib, submitit) rebuild this
    # script's functions in their workers by value, without running its top level.
    if not _LISTENING:
        jax.monitoring.register_event_duration_secs_listener(_count_compilation)
        _LISTENING.append(True)


def _takes_flat(net: Any, batch_size: int, data: Any) -> bool:
    """Whether ``net`` maps the data's examples, flattened, to ``[batch, outputs]`` (an MLP
    given images does; a network with convolutions does not)."""
    try:
        out = output_shape(net, (batch_size, math.prod(data.input_shape)))
    except (NeedsImages, ValueError):
        return False
    return len(out) == 2


def _possessive(name: str) -> str:
    """``mnist's``, ``digits'``."""
    return f"{name}'" if name.endswith("s") else f"{name}'s"


def _count(n: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _memoise(fn):
    """``functools.lru_cache(maxsize=8)`` as a plain function.

    Sweep launchers pickle ``main`` with everything it uses (by value, as this is ``__main__``),
    and an lru_cache object of ``__main__`` can't be looked up by name in their workers.
    """
    cache: dict = {}

    @functools.wraps(fn)
    def memoised(*args):
        if args not in cache:
            if len(cache) >= 8:
                del cache[next(iter(cache))]
            cache[args] = fn(*args)
        return cache[args]

    return memoised


class ConfigError(ValueError):
    """A configuration that cannot run; reported as one line before anything is compiled."""


ROOT = pathlib.Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"  # as @hydra.main's config_path below
SCRIPT = pathlib.Path(__file__).resolve()

# Parameters of a group's _target_ that this script passes itself: a config must not set them.
_SUPPLIED = {"dataset": ("seed",)}
_SCHEMA: list[dict[str, Any]] = []


def _schema() -> dict[str, Any]:
    """What each config group may hold: conf/'s primary file and its groups' default files
    (read once per process; ``bpjax.cli.schema_from_conf``)."""
    if not _SCHEMA:
        _SCHEMA.append(cli.schema_from_conf(CONF_DIR))
    return _SCHEMA[0]


def _target_name(node: Any) -> str:
    if not isinstance(node, DictConfig):
        return ""
    return str(node.get("_target_", "")).rsplit(".", 1)[-1]


def _takes(node: Any, parameter: str) -> bool:
    """Whether a config node's ``_target_`` takes ``parameter`` (False without a target)."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return False
    names, takes_any, _ = cli.target_parameters(str(node._target_))
    return parameter in names or takes_any


def _model_setting(cfg: DictConfig, key: str) -> Any:
    """``model.<key>`` where the model is one node that has it (not a list of layer specs)."""
    return cfg.model.get(key) if isinstance(cfg.model, DictConfig) else None


def check_config_keys(cfg: DictConfig) -> None:
    """Raises ConfigError naming every key that nothing reads (``bpjax.cli.check_keys``)."""
    config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra", None)  # Hydra checks its own
    problems = cli.check_keys(config, _schema(), supplied=_SUPPLIED)
    if problems:
        raise ConfigError("; ".join(problems))
    # A true/false setting given a string: `model.batch_norm=no` would read as true.
    problems = cli.check_bools(config, _group_defaults())
    if problems:
        raise ConfigError("; ".join(problems))


_GROUP_DEFAULTS: list[dict[str, Any]] = []


def _group_defaults() -> dict[str, Any]:
    """The default option of each group without a ``_target_`` (its values' types), read once
    per process (a plain list, not functools.cache: joblib's workers unpickle this module's
    functions by value, and a cache wrapper of ``__main__`` does not survive that)."""
    if not _GROUP_DEFAULTS:
        _GROUP_DEFAULTS.append(
            {
                group: OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
                for group, option in (("trainer", "default"), ("logger", "tensorboard"))
            }
        )
    return _GROUP_DEFAULTS[0]


def validate(cfg: DictConfig) -> None:
    """Checks what can be checked without data: one clear error before any expensive work."""
    check_config_keys(cfg)  # first: a misspelt dataset.pth would read as a missing path
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # `???` in a config, e.g. dataset=npz without dataset.path
        example = "/path/to/the/files" if missing[0].endswith("path") else "<value>"
        raise ConfigError(
            f"{', '.join(missing)} must be set, e.g. {missing[0]}={example} (no default: see "
            f"the config group's file under conf/)"
        )
    seed = cfg.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    trainer = cfg.trainer
    if trainer.grad_mode not in MODES:
        raise ConfigError(
            f"trainer.grad_mode={trainer.grad_mode!r} is not one of {', '.join(MODES)}"
        )
    lr = cfg.optimizer.get("learning_rate")
    if not isinstance(lr, int | float) or not lr > 0:
        raise ConfigError(f"optimizer.learning_rate must be a positive number, got {lr}")
    if _takes(cfg.model, "features"):
        features = cfg.model.get("features")
        features = list(features) if isinstance(features, ListConfig) else features
        if not features or not all(
            isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in features
        ):
            raise ConfigError(f"model.features must be positive layer sizes, got {features}")
    positive = ("epochs", "batch_size", "eval_batch_size", "eval_every", "checkpoint_every")
    for key in (*positive, "keep_checkpoints"):
        value = trainer[key]
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"trainer.{key} must be a positive integer, got {value}")
    if trainer.patience is not None and (
        not isinstance(trainer.patience, int) or trainer.patience < 1
    ):
        raise ConfigError(
            f"trainer.patience must be a positive integer or null (never stop early), "
            f"got {trainer.patience}"
        )
    clip = trainer.clip_global_norm
    if clip is not None and (not isinstance(clip, int | float) or not clip > 0):
        raise ConfigError(f"trainer.clip_global_norm must be positive or null, got {clip}")
    decay = trainer.weight_decay
    if not isinstance(decay, int | float) or not decay >= 0:
        raise ConfigError(f"trainer.weight_decay must be a number >= 0, got {decay}")
    for key, valid in (
        ("weight_decay_mode", WEIGHT_DECAY_MODES),
        ("weight_decay_mask", WEIGHT_DECAY_MASKS),
    ):
        if trainer[key] not in valid:
            raise ConfigError(f"trainer.{key}={trainer[key]!r} is not one of {', '.join(valid)}")
    if decay and _takes(cfg.optimizer, "weight_decay"):
        raise ConfigError(
            f"trainer.weight_decay={decay} and optimizer={_target_name(cfg.optimizer)}, which has "
            f"its own optimizer.weight_decay: set one of them (e.g. trainer.weight_decay=0)"
        )
    for key in ("grad_check_every", "histogram_every", "chunk_steps"):
        if not isinstance(trainer[key], int) or trainer[key] < 0:
            raise ConfigError(f"trainer.{key} must be an integer >= 0, got {trainer[key]}")
    if trainer.devices != "all" and (not isinstance(trainer.devices, int) or trainer.devices < 1):
        raise ConfigError(
            f"trainer.devices must be a positive count or 'all', got {trainer.devices}"
        )
    loss_name = _target_name(cfg.loss)
    if loss_name not in losses_lib.LOSSES:
        raise ConfigError(
            f"loss {loss_name!r} is not one of {', '.join(sorted(losses_lib.LOSSES))}"
        )
    # Cheap: builds closures, allocates nothing; catches unknown activations/initializers and
    # bad loss parameters (huber's delta).
    for group, node in (("model", cfg.model), ("loss", cfg.loss)):
        try:
            instantiate(node, _convert_="all")
        except (ValueError, InstantiationException) as e:
            # Hydra wraps the factory's error; its own message is the one that names it.
            raise ConfigError(f"{group}: {e.__cause__ or e}") from None
    if str(cfg.objective).startswith("test"):
        raise ConfigError(
            f"objective={cfg.objective} would tune on the test set; use a best_val_* metric"
        )
    _validate_processes(trainer)
    if trainer.compute_dtype not in (None, "bfloat16", "float16", "float32"):
        raise ConfigError(
            f"trainer.compute_dtype must be null, bfloat16, float16 or float32, "
            f"got {trainer.compute_dtype}"
        )


# The settings of a job of several processes, besides trainer.distributed itself.
_PROCESS_KEYS = ("coordinator_address", "num_processes", "process_id")


def _validate_processes(trainer: DictConfig) -> None:
    """``trainer.distributed`` and its settings, checked before any process joins a job."""
    if not isinstance(trainer.distributed, bool):
        raise ConfigError(f"trainer.distributed must be true or false, got {trainer.distributed}")
    for key in ("initialization_timeout", "heartbeat_timeout"):
        value = trainer[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"trainer.{key} must be a whole number of seconds >= 1, got {value}")
    given = [f"trainer.{key}={trainer[key]}" for key in _PROCESS_KEYS if trainer[key] is not None]
    if not trainer.distributed:
        if given:
            raise ConfigError(
                f"{', '.join(given)} but trainer.distributed=false: set trainer.distributed=true "
                f"to run as one of several processes"
            )
        return
    try:  # the environment fills in what is not given; a bad value there is named too
        distributed.resolve(*(trainer[key] for key in _PROCESS_KEYS), prefix="trainer.")
    except ValueError as e:
        raise ConfigError(f"trainer.distributed=true: {e}") from None


def _join(trainer: DictConfig) -> None:
    """Joins the job of several processes that ``trainer.distributed=true`` asks for."""
    try:
        distributed.initialize(
            *(trainer[key] for key in _PROCESS_KEYS),
            initialization_timeout=trainer.initialization_timeout,
            heartbeat_timeout=trainer.heartbeat_timeout,
        )
    except ValueError as e:
        raise ConfigError(
            f"trainer.distributed=true: jax.distributed.initialize() could not start: {e} (see "
            f'the README\'s "Several hosts")'
        ) from None


def _several() -> bool:
    """Whether this run is one process of several (asked once jax has started)."""
    return jax.process_count() > 1


# Losses that take logits, and the squashing they apply to them.
_SQUASHED_TWICE = {"softmax_cross_entropy": "softmax", "binary_cross_entropy": "sigmoid"}


def _check_devices(trainer: DictConfig) -> None:
    """``trainer.devices`` against the devices jax sees (after any multi-host start-up), by the
    rules ``fit`` applies, reported before the data are loaded."""
    try:
        n = make_mesh(trainer.devices).devices.size
    except ValueError as e:
        raise ConfigError(f"trainer.devices: {e}") from None
    if trainer.batch_size % n:
        processes = jax.process_count()  # trainer.devices counts per process
        where = f" ({processes} processes x {n // processes})" if processes > 1 else ""
        raise ConfigError(
            f"trainer.batch_size={trainer.batch_size} is not divisible by the {n} devices of "
            f"trainer.devices={trainer.devices}{where}"
        )


def _has_checkpoints(checkpoint_dir: pathlib.Path) -> bool:
    return bool(CheckpointManager(checkpoint_dir).all_steps())


# Settings a resume is expected to change; every other difference is reported.
_RESUME_KEYS = ("trainer.resume", "trainer.run_dir")


def changed_settings(
    checkpoint_dir: pathlib.Path, config: dict[str, Any], path: pathlib.Path | None = None
) -> list[str]:
    """``key: saved -> now`` for each setting that differs from the config of checkpoint
    ``path`` (default: the latest in ``checkpoint_dir``); a longer ``trainer.epochs``, say, also
    stretches a schedule fitted to the run's length. Empty without a checkpoint, or if it
    can't be read: the resume itself then reports it."""
    if path is None and not _has_checkpoints(checkpoint_dir):
        return []
    try:
        path = path if path is not None else CheckpointManager(checkpoint_dir).latest()
        saved = load_metadata(path).get("config") or {}
    except (OSError, ValueError):
        return []
    before = flatten_hparams(saved)
    now = flatten_hparams(json.loads(json.dumps(config, default=str)))
    keys = sorted((before.keys() | now.keys()) - set(_RESUME_KEYS))
    missing = "<unset>"
    return [
        f"{k}: {before.get(k, missing)} -> {now.get(k, missing)}"
        for k in keys
        if before.get(k, missing) != now.get(k, missing)
    ]


def resolve_monitor_and_objective(cfg: DictConfig, data: Any) -> tuple[str, str]:
    """``trainer.monitor`` and ``objective`` for this dataset, ``auto`` resolved by its task.

    ``monitor=auto`` is ``val_accuracy`` for classification and ``val_loss`` for regression;
    ``objective=auto`` is ``best_<monitor>`` (the validation metric at the best epoch), or the
    final training metric where the monitor is one. Raises ConfigError, listing the valid
    names, for a metric the task or the dataset's splits don't have.
    """
    monitors = valid_monitors(data.task, ("train", "val", "test"))
    monitor = cfg.trainer.monitor
    if monitor == "auto":
        monitor = default_monitor(data.task)
    if monitor not in monitors:
        raise ConfigError(
            f"trainer.monitor={monitor} is not a metric of {data.name} ({data.task}); "
            f"valid: auto, {', '.join(monitors)}"
        )
    has_val = data.n_val > 0
    objectives = [f"best_{m}" for m in monitors if m.startswith("val_") and has_val]
    objectives += [m for m in monitors if m.startswith("train_")]
    objective = cfg.objective
    if objective == "auto":
        objective = f"best_{monitor}" if monitor.startswith("val_") and has_val else monitor
        if objective not in objectives:  # a val_ monitor on a set without a validation split
            objective = "train_loss"
    if objective not in objectives:
        raise ConfigError(
            f"objective={objective} is not a metric of {data.name} ({data.task}); "
            f"valid: auto, {', '.join(objectives)}"
        )
    return monitor, objective


def _container(node: DictConfig) -> Any:
    return OmegaConf.to_container(node, resolve=True)


def _fits_length(factory: functools.partial) -> bool:
    """Whether a schedule factory (``instantiate(cfg.schedule)``) takes its decay from the
    run's length: it has ``decay_steps`` and the config leaves it unset."""
    takes = inspect.signature(factory.func).parameters
    return "decay_steps" in takes and "decay_steps" not in factory.keywords


def build_schedule(cfg: DictConfig, total_steps: int):
    """The optax schedule of ``cfg.schedule``, filled in with the rate and the run's length."""
    factory = instantiate(cfg.schedule)
    parameters = inspect.signature(factory.func).parameters
    given = set(factory.keywords)
    fill = {}
    lr = float(cfg.optimizer.learning_rate)
    for name in ("value", "init_value", "peak_value"):
        if name in parameters and name not in given:
            fill[name] = lr
            break
    if _fits_length(factory):
        fill["decay_steps"] = total_steps
    if "boundaries_and_scales" in given:
        fill["boundaries_and_scales"] = {
            int(k): float(v) for k, v in factory.keywords["boundaries_and_scales"].items()
        }
    try:
        return factory(**fill)
    except ValueError as e:  # e.g. warmup_steps longer than the whole run
        warmup = factory.keywords.get("warmup_steps")
        hint = (
            f" (schedule.warmup_steps={warmup} must be below the run's {total_steps} steps)"
            if warmup is not None and warmup >= total_steps
            else ""
        )
        raise ConfigError(
            f"schedule {_target_name(cfg.schedule)} for a run of {total_steps} steps: {e}{hint}"
        ) from None


@_memoise
def _build(spec: str) -> tuple:
    """Network, loss, optimizer and schedule for a JSON spec of the config.

    Memoised on the spec: identical jobs of a sweep in one process get the very same objects,
    so ``bpjax.trainer.fit`` reuses the compiled epoch instead of compiling it again. The
    objects are pure functions: nothing mutable is shared between jobs.
    """
    parts = json.loads(spec)
    cfg = OmegaConf.create(parts)
    net = instantiate(cfg.model, _convert_="all")
    loss = instantiate(cfg.loss)
    schedule = build_schedule(cfg, parts["total_steps"])
    factory = instantiate(cfg.optimizer)
    optimizer = make_optimizer(
        factory,
        learning_rate=schedule,
        clip_global_norm=cfg.trainer.clip_global_norm,
        weight_decay=cfg.trainer.weight_decay,
        weight_decay_mode=cfg.trainer.weight_decay_mode,
        weight_decay_mask=cfg.trainer.weight_decay_mask,
    )
    return net, loss, optimizer, schedule


@_memoise
def _jitted_grad(net, loss, mode):
    """The jitted gradient for histograms, memoised like ``_build`` (no recompiles per job)."""
    return jax.jit(bpjax.value_and_grad(net, loss, mode=mode))


def _write_json_atomic(path: pathlib.Path, payload: dict[str, Any]) -> None:
    text = cli.strict_json(payload) + "\n"
    atomic_write(path, lambda file: file.write(text.encode()))


def _run_dir(cfg: DictConfig) -> pathlib.Path:
    if cfg.trainer.get("run_dir"):
        return pathlib.Path(cfg.trainer.run_dir)
    if HydraConfig.initialized():
        return pathlib.Path(HydraConfig.get().runtime.output_dir)
    return pathlib.Path(tempfile.mkdtemp(prefix="bpjax-run-"))


def _task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _tensorboard_dir(run_dir: pathlib.Path) -> pathlib.Path:
    return tensorboard_dir(
        run_dir, run_name(_task_overrides()) if HydraConfig.initialized() else "run"
    )


def _job_label() -> str:
    """``[job N] `` in a multirun (parallel jobs' lines interleave), else nothing."""
    if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
        return f"[job {HydraConfig.get().job.num}] "
    return ""


# What a data loader raises for a damaged, missing or unreadable file: numpy's np.load raises
# zipfile.BadZipFile for a truncated .npz, EOFError for an empty file, zlib.error for a corrupt
# compressed member; the rest are ValueError (wrong arrays, dtypes, a text file) or OSError.
_DATA_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _data_error(cfg: DictConfig, error: BaseException) -> ConfigError:
    message = str(error) or type(error).__name__
    if not isinstance(error, ValueError | OSError):  # names no file and says little
        message = f"{message} ({type(error).__module__}.{type(error).__name__})"
    path = cfg.dataset.get("path")
    where = f" from {path}" if path and str(path) not in message else ""
    return ConfigError(f"dataset {_target_name(cfg.dataset)} could not be loaded{where}: {message}")


def _load_data(cfg: DictConfig):
    try:
        return instantiate(cfg.dataset, seed=cfg.seed)
    except InstantiationException as e:  # Hydra's wrapper; report the loader's own error
        if isinstance(e.__cause__, _DATA_ERRORS):
            raise _data_error(cfg, e.__cause__) from None
        raise
    except _DATA_ERRORS as e:
        raise _data_error(cfg, e) from None


def train(
    cfg: DictConfig, *, callbacks: Sequence[Callable[[dict[str, Any]], None]] = ()
) -> dict[str, Any]:
    """Runs one configured experiment; returns its metrics (also written to metrics.json,
    where a non-finite number is ``null``).

    ``callbacks`` are called with each epoch's record after the reporter (``fit``'s
    ``callbacks``): how ``experiments/compare_rules.py`` gets the curves it plots.
    """
    validate(cfg)
    _listen_for_compilations()
    t_start = time.perf_counter()
    compilations_before = _COMPILATIONS[0]
    if cfg.trainer.distributed:
        _join(cfg.trainer)
    primary = distributed.is_primary()
    _check_devices(cfg.trainer)
    run_dir = _run_dir(cfg)
    if _several():  # process 0's (a timestamped default differs between processes)
        try:
            run_dir = distributed.shared_directory(run_dir)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    checkpoint_dir = run_dir / "checkpoints"
    if not cfg.trainer.resume and _has_checkpoints(checkpoint_dir):
        # Before anything (a TensorBoard file, say) is written into the other run's directory.
        raise ResumeError(
            f"{checkpoint_dir} already holds checkpoints of a run: trainer.resume=true "
            f"continues it; a new run needs another trainer.run_dir (nothing was deleted)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    # Data first: a missing or damaged file is reported before anything is compiled.
    data = _load_data(cfg)
    trainer = cfg.trainer
    if trainer.batch_size > data.n_train:
        raise ConfigError(
            f"trainer.batch_size={trainer.batch_size} exceeds the {data.n_train} training "
            f"examples of {data.name}"
        )
    monitor, objective_name = resolve_monitor_and_objective(cfg, data)
    mismatch = target_mismatch(_target_name(cfg.loss), data.task, data.y_train)
    if mismatch:
        raise ConfigError(f"loss on {data.name}: {mismatch}")
    console = Console(_job_label(), progress=trainer.progress, quiet=not primary)
    squash = _SQUASHED_TWICE.get(_target_name(cfg.loss))
    if squash is not None and _model_setting(cfg, "output_activation") == squash:
        console.say(
            f"bpjax: warning: model.output_activation={squash} before {_target_name(cfg.loss)}, "
            f"which applies {squash} itself to its logits: outputs are squashed twice, which "
            f"usually trains badly (model.output_activation=null gives it logits)",
            err=True,
        )
    steps_per_epoch = data.n_train // trainer.batch_size
    spec = {
        "model": _container(cfg.model),
        "loss": _container(cfg.loss),
        "optimizer": _container(cfg.optimizer),
        "schedule": _container(cfg.schedule),
        "trainer": {
            k: trainer[k]
            for k in ("clip_global_norm", "weight_decay", "weight_decay_mode", "weight_decay_mask")
        },
        "total_steps": steps_per_epoch * trainer.epochs,
    }
    net, loss, optimizer, schedule = _build(json.dumps(spec, sort_keys=True))
    loss_name = loss.name
    try:
        out = output_shape(net, (trainer.batch_size, *data.input_shape))
    except NeedsImages as e:
        # Only images loaded flat can be loaded as images: not iris's rows, which stay flat
        # with dataset.flatten=false (a CNN model's config sets it).
        images = len(data.input_shape) == 1 and cfg.dataset.get("flatten") is True
        hint = " (dataset.flatten=false loads them as images)" if images else ""
        raise ConfigError(f"the model takes images [batch, h, w, c]: {e}{hint}") from None
    except ValueError as e:  # a layer that can't take its input: too small for a kernel, ...
        shape = "x".join(map(str, data.input_shape))
        reason = first_line(e) or type(e).__name__
        raise ConfigError(
            f"the model does not fit {_possessive(data.name)} {shape} inputs: {reason}"
        ) from None
    if len(out) != 2:
        # A model that takes them flat (an MLP given images): load them flat, first.
        flat = len(data.input_shape) > 1 and _takes_flat(net, trainer.batch_size, data)
        fix = "dataset.flatten=true loads them flat, or put" if flat else "put"
        raise ConfigError(
            f"the model maps {_possessive(data.name)} {tuple(data.input_shape)} inputs to "
            f"{tuple(out[1:])} per example, not to outputs: {fix} bpjax.flatten() before "
            f"its dense layers"
        )
    n_out = out[-1]
    if n_out != data.n_outputs and not single_output_binary(n_out, data.n_classes, loss_name):
        hint = (
            f" (set model.features=[..., {data.n_outputs}])"
            if _takes(cfg.model, "features")
            else f" (make its last layer {data.n_outputs} wide)"
        )
        raise ConfigError(
            f"the model has {n_out} outputs but {data.name} needs {data.n_outputs}{hint}"
        )
    rule_options = {
        "distribution": trainer.feedback_distribution,
        "scale": trainer.feedback_scale,
        "kp_decay": trainer.kp_decay,
    }
    in_shape = (trainer.batch_size, *data.input_shape)
    # A bad rule option (checked for every mode), then a rule that can't apply to the network.
    for mode, keys in (
        ("manual", "trainer.feedback_distribution, feedback_scale, kp_decay"),
        (trainer.grad_mode, f"trainer.grad_mode={trainer.grad_mode}"),
    ):
        try:
            check_rule(mode, net, in_shape, rule_options)
        except ValueError as e:
            raise ConfigError(f"{keys}: {e}") from None
    config = _container(cfg)
    logger = (
        TensorBoardLogger(_tensorboard_dir(run_dir), flush_secs=cfg.logger.flush_secs)
        if cfg.logger.enabled and primary
        else NullLogger()
    )
    # A fixed training batch for gradient histograms.
    hist_n = min(256, data.n_train)
    hist_batch = (
        data.x_train[:hist_n],
        encode_targets(data.y_train[:hist_n], task=data.task, loss_name=loss_name, n_outputs=n_out),
    )
    grad_fn = _jitted_grad(net, loss, trainer.grad_mode)
    console.start(trainer.epochs * steps_per_epoch)
    console.say(f"bpjax: {data.summary()}")
    console.say(
        f"bpjax: {net.name}, loss {loss_name}, grad_mode {trainer.grad_mode}, "
        f"{_count(trainer.epochs, 'epoch')} of {_count(steps_per_epoch, 'step')}; "
        f"run dir {run_dir}"
    )
    on_resume = None
    if trainer.resume and not _has_checkpoints(checkpoint_dir):
        console.say(f"bpjax: nothing to resume in {checkpoint_dir}; starting from scratch")
    elif trainer.resume:

        def on_resume(where: dict[str, Any]) -> None:
            # Said once fit has accepted the checkpoint (a refused resume says only why), of
            # the checkpoint it restored (a damaged latest is passed over). A run that had
            # already ended says "nothing to do" instead, after fit.
            if where["epoch"] >= trainer.epochs and not where["epoch_step"]:
                return
            into = (
                f", step {where['epoch_step']} of {where['steps_per_epoch']} into epoch "
                f"{where['epoch'] + 1}"
                if where["epoch_step"]
                else ""
            )
            console.say(
                f"bpjax: resumed from {where['path']} (epoch {where['epoch']} of "
                f"{trainer.epochs} done{into})"
            )
            changed = changed_settings(checkpoint_dir, config, where["path"])
            if changed:
                console.say(f"bpjax: resuming with changed settings: {'; '.join(changed)}")
            if any(c.startswith("trainer.epochs:") for c in changed) and _fits_length(
                instantiate(cfg.schedule)
            ):
                console.say(
                    f"bpjax: the learning-rate schedule ({_target_name(cfg.schedule)}) follows "
                    f"the run's length: it now decays over {spec['total_steps']} steps"
                )

    reporter = EpochReporter(
        logger,
        epochs=trainer.epochs,
        steps_per_epoch=steps_per_epoch,
        schedule=schedule,
        console=console,
        histogram_every=trainer.histogram_every if primary else 0,
        grad_fn=grad_fn,
        batch=hist_batch,
        explosion_hint=(
            f"the learning rate may be too large "
            f"(optimizer.learning_rate={cfg.optimizer.get('learning_rate')})"
        ),
        # which layer is layer{i} in the per-layer tags: the network, once, as a text summary
        network=network_table(net, in_shape),
    )
    if _several():  # every process got this far, with the same settings, or none trains
        distributed.check_same(
            "config",
            {
                key: value
                for key, value in flatten_hparams(config).items()
                if key.removeprefix("trainer.") not in _PROCESS_KEYS
            },
            hint="start every process with the same command, but for trainer.process_id",
        )
    status = "completed"
    message = ""
    nothing_done = False
    trained_here = 0  # epochs this call trained (fewer than the run's after a resume)
    try:
        _stop_if_interrupted()  # a signal whose interrupt was swallowed while starting up
        result = fit(
            net,
            loss,
            optimizer,
            data,
            epochs=trainer.epochs,
            batch_size=trainer.batch_size,
            grad_mode=trainer.grad_mode,
            seed=cfg.seed,
            eval_batch_size=trainer.eval_batch_size,
            eval_every=trainer.eval_every,
            monitor=monitor,
            patience=trainer.patience,
            checkpoint_dir=str(checkpoint_dir),
            checkpoint_every=trainer.checkpoint_every,
            keep_checkpoints=trainer.keep_checkpoints,
            resume=trainer.resume,
            config=config,
            grad_check_every=trainer.grad_check_every,
            layer_stats=trainer.layer_stats,
            compute_dtype=trainer.compute_dtype,
            devices=trainer.devices,
            eval_splits=("train", "val", "test"),
            callbacks=[reporter, *callbacks],
            chunk_steps=trainer.chunk_steps,
            on_chunk=[reporter.chunk, _stop_if_interrupted],
            rule_options=rule_options,
            on_resume=on_resume,
        )
        metrics = dict(result.metrics)
        trained_here = len(result.history)
        # Only a resume of a run that had already ended trains no epoch.
        nothing_done = not trained_here
    except TrainingDiverged as e:
        status, message = "diverged", str(e)
        metrics = {"epochs": e.epoch, "diverged_step": e.step}
    except BaseException:  # a refused resume, an interrupt: flush and release the writer
        logger.close()
        raise
    finally:
        reporter.close()
    record_path = run_dir / "metrics.json"
    if nothing_done:
        last = CheckpointManager(checkpoint_dir).path_for(metrics["epochs"])
        ended = (
            f"stopped early at epoch {metrics['epochs']} (trainer.patience={trainer.patience})"
            if metrics.get("stopped_early")
            else f"reached epoch {metrics['epochs']} (trainer.epochs={trainer.epochs})"
        ) + f": {last.name} is its last checkpoint"
        if record_path.exists():
            logger.close()
            console.say(
                f"bpjax: nothing to do: the run in {run_dir} already {ended}; metrics.json "
                f"is left as it was (raise trainer.epochs to train on)"
            )
            return json.loads(record_path.read_text())
        # Killed between its last checkpoint and its record: write the record now, without
        # the timings of a run that did not happen here.
        console.say(f"bpjax: the run in {run_dir} already {ended}; writing its metrics.json")
        metrics.update(wall_seconds=None, train_seconds=None, examples_per_second=None)
    objective = metrics.get(objective_name, math.nan)
    metrics.update(
        {
            "status": status,
            "message": message,
            "objective_name": objective_name,
            "objective": objective,
            "loss_exploded": reporter.exploded,
            "compilations": _COMPILATIONS[0] - compilations_before,
            "total_seconds": time.perf_counter() - t_start,
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "processes": jax.process_count(),
            "overrides": _task_overrides(),
        }
    )
    hparams = {
        "model": config["model"],
        "loss": loss_name,
        "optimizer": config["optimizer"],
        "schedule": _target_name(cfg.schedule),
        "batch_size": trainer.batch_size,
        "grad_mode": trainer.grad_mode,
        "dataset": data.name,
        "seed": cfg.seed,
    }
    final = {
        f"hparam/{k}": v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)
    }
    logger.hparams(hparams, final)
    last_step = metrics.get("steps", metrics.get("diverged_step", 0))
    logger.scalar("perf/compilations", metrics["compilations"], last_step)
    logger.close()
    if primary:  # the run's one record, however many processes
        _write_json_atomic(record_path, metrics)
    if status == "diverged":
        console.say(f"bpjax: {message}", err=True)
        return metrics
    if metrics.get("stopped_early"):
        console.say(
            f"bpjax: stopped early after epoch {metrics['epochs']}: no better {monitor} "
            f"in {trainer.patience} evaluations; the best epoch, {metrics['best_epoch']}, "
            f"gives the test metrics"
        )
    summary = "  ".join(
        f"{k} {format_number(metrics[k])}"
        for k in ("test_accuracy", "test_loss", "test_rmse", "test_r2")
        if k in metrics
    )
    timing = _timing(metrics)
    this_call = ", ".join([*timing, _count(metrics["compilations"], "compilation")])
    epochs = _count(metrics["epochs"], "epoch")
    if timing and trained_here != metrics["epochs"]:  # resumed: the seconds are this call's
        this_call = f"; this call: {_count(trained_here, 'epoch')}, {this_call}"
    else:
        this_call = f", {this_call}"
    warning = f"; WARNING: {reporter.explosion()}" if reporter.exploded else ""
    console.say(f"bpjax: {summary}  ({epochs}{this_call}){warning}")
    return metrics


def _original_cwd() -> str:
    return hydra.utils.get_original_cwd() if HydraConfig.initialized() else os.getcwd()


def resume_command(cfg: DictConfig) -> str:
    """The command that resumes this run: its overrides, ``trainer.resume=true`` and its run
    directory, run by the interpreter running now (``bpjax.cli.rerun_command``)."""
    overrides = [
        o
        for o in _task_overrides()
        if _override_key(o) not in ("trainer.resume", "trainer.run_dir")
    ]
    resume = ["trainer.resume=true", f"trainer.run_dir={cli.hydra_quote(str(_run_dir(cfg)))}"]
    return cli.rerun_command(SCRIPT, [*overrides, *resume], cwd=_original_cwd(), project_root=ROOT)


def interrupted_message(cfg: DictConfig) -> str:
    """What an interrupted run says: where its last epoch is and the command that resumes it."""
    checkpoint_dir = _run_dir(cfg) / "checkpoints"
    if not _has_checkpoints(checkpoint_dir):
        return "interrupted before the first epoch ended: nothing was checkpointed"
    if _joined_several():
        return (
            f"interrupted: every process stopped after the same step, checkpointed in "
            f"{checkpoint_dir}; {_resume_every_process(cfg)}"
        )
    return f"interrupted: {_last_checkpoint(checkpoint_dir)}; resume with: {resume_command(cfg)}"


def _last_checkpoint(checkpoint_dir: pathlib.Path) -> str:
    """Where the latest checkpoint stands, in words: an epoch's end, or steps into an epoch."""
    try:
        path = CheckpointManager(checkpoint_dir).latest()
        saved = load_metadata(path).get("metrics") or {}
        epoch, step = int(saved["epoch"]), int(saved.get("epoch_step") or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return f"the last checkpoint is in {checkpoint_dir}"
    if step:
        return f"checkpointed {step} steps into epoch {epoch} in {path}"
    return f"checkpointed at the end of epoch {epoch} in {path}"


def _resume_every_process(cfg: DictConfig) -> str:
    """How a job of several processes resumes: all of them, each with its own command."""
    return (
        f"resume by starting all {jax.process_count()} processes again, each with its own "
        f"command plus trainer.resume=true trainer.run_dir="
        f"{cli.hydra_quote(str(_run_dir(cfg)))} (process 0's: {resume_command(cfg)})"
    )


def _joined_several() -> bool:
    """Whether this process joined a job of several (without starting jax if it did not)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def _process_label() -> str:
    """``[process N] `` in a job of several processes, for the lines every process prints."""
    return f"[process {jax.process_index()}] " if _joined_several() else ""


# The interrupts this process received. One raised while a library runs a callback of its own
# (jax's garbage-collection callback, say) is printed as "ignored" and lost; it is raised again
# before training and between chunks (_stop_if_interrupted).
_SIGNALS: list[int] = []


def _raise_interrupt(signum, frame):
    del frame  # unused
    _SIGNALS.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_if_interrupted(*_: Any) -> None:
    """Raises ``KeyboardInterrupt`` again if a signal came and its interrupt was swallowed."""
    if _SIGNALS:
        raise KeyboardInterrupt(f"signal {_SIGNALS[-1]}")


def _handle_interrupts() -> None:
    """SIGTERM, and Ctrl-C where Python's own handler has it (not where it is ignored, as in a
    background job), raise ``KeyboardInterrupt`` through ``_raise_interrupt``."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupt)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    _handle_interrupts()  # again: a sweep's launcher may run the job in a process of its own
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    label = _job_label()
    try:
        metrics = train(cfg)
    except ResumeError as e:  # about this job's directory, not a swept value: fatal in a sweep
        distributed.announce_failure(str(e))  # to the other processes of a job, if any
        print(
            f"{label}{_process_label()}error: {e}\n(trainer.resume=true continues a run; "
            f"trainer.run_dir=<dir> picks the directory)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    except distributed.ProcessLost as e:
        print(f"{label}{_process_label()}error: {e}", file=sys.stderr, flush=True)
        if distributed.is_primary() and _has_checkpoints(_run_dir(cfg) / "checkpoints"):
            # the lost process's error names the last checkpoint; this, how to go on from it
            print(f"{label}{_resume_every_process(cfg)}", file=sys.stderr, flush=True)
        distributed.exit_now(distributed.EXIT_LOST)  # a normal exit would wait for the lost one
    except (
        ConfigError,
        FileNotFoundError,
        distributed.ProcessFailed,
        distributed.JobMismatch,
    ) as e:
        distributed.announce_failure(str(e))
        print(f"{label}{_process_label()}error: {e}", file=sys.stderr, flush=True)
        if not multirun:
            sys.exit(2)
        # One invalid job (a sampled learning rate out of range, say) does not end a sweep: it
        # is recorded, like a diverged one, and ranks last in the summary (a sweep of nothing
        # but invalid jobs exits 2: see bpjax.sweep.SweepSummary).
        record = pathlib.Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
        # Never over a finished run's record; in a job of several processes, process 0's.
        if not record.exists() and not (_joined_several() and jax.process_index() > 0):
            invalid = {
                "status": "invalid",
                "message": str(e),
                "objective": None,
                "overrides": _task_overrides(),
            }
            _write_json_atomic(record, invalid)
        return worst_objective()
    except KeyboardInterrupt:
        if not _joined_several() or distributed.is_primary():  # one message for the job
            print(f"\n{label}{interrupted_message(cfg)}", file=sys.stderr, flush=True)
        sys.exit(130)
    if metrics["status"] == "diverged" and not multirun:
        sys.exit(1)
    objective = metrics.get("objective")
    if isinstance(objective, int | float) and math.isfinite(objective):
        return float(objective)
    return worst_objective() if multirun else math.nan


def _timing(metrics: dict[str, Any]) -> list[str]:
    """The final line's timing: wall seconds and training examples/s (none for a run whose
    every chunk compiled its program: its time is mostly compilation); nothing for the record
    of a run that ended before this call started."""
    if metrics["wall_seconds"] is None:
        return []
    speed = metrics["examples_per_second"]
    rate = (
        "examples/s not timed: every chunk compiled"
        if speed is None
        else f"{speed:,.0f} examples/s"
    )
    return [f"{metrics['wall_seconds']:.1f} s", rate]


def worst_objective() -> float:
    """What a failed sweep job returns: the worst value for the sweeper's ``direction``
    (Optuna's; it refuses NaN, and a crash would end the study), or NaN without one."""
    direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction", default=None)
    if isinstance(direction, ListConfig | list | tuple):
        direction = direction[0] if len(direction) == 1 else None
    return {"minimize": math.inf, "maximize": -math.inf}.get(str(direction), math.nan)


def run() -> None:
    """The command line: ``main``, with Hydra's refusals of the command line itself (a key
    that no config file holds, given without ``+``; an option that doesn't exist; bad override
    syntax) as one ``error:`` line naming the nearest valid choice, exit 2, like every other
    config error. Any other exception keeps its traceback."""
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises, instead of printing and exiting 1
    _handle_interrupts()
    try:
        main()
    except KeyboardInterrupt:  # before main's own handling: Hydra composing the config
        print("\ninterrupted before training started: nothing to resume", file=sys.stderr)
        sys.exit(130)
    except (ConfigCompositionException, OverrideParseException) as e:
        overrides = [a for a in sys.argv[1:] if not a.startswith("-")]
        print(
            f"error: {cli.composition_error(e, CONF_DIR, overrides)}", file=sys.stderr, flush=True
        )
        sys.exit(2)
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error


if __name__ == "__main__":
    run()

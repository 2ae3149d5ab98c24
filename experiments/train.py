"""Train an MLP by hand-written backpropagation, configured by Hydra.

    python experiments/train.py                                   # MLP on real MNIST
    python experiments/train.py experiment=nielsen_ch1            # a preset
    python experiments/train.py dataset=digits model.features=[64,10] optimizer=adam seed=3
    python experiments/train.py -m optimizer.learning_rate=0.3,0.1,0.03   # a sweep

The run directory gets ``metrics.json``, TensorBoard event files (``tb/``) and checkpoints
(``checkpoints/``). ``train(cfg)`` does the work and is what tests call; ``main`` is the thin
Hydra wrapper that turns bad configs into one clear line and a non-zero exit, and returns the
objective for sweepers. This script owns printing, the progress bar and wall-clock time; the
math lives in ``bpjax``.
"""

import functools
import inspect
import json
import math
import pathlib
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import hydra
import jax
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

import bpjax
from bpjax import losses as losses_lib
from bpjax._atomic import atomic_write
from bpjax.checkpoint import CheckpointManager, load_metadata
from bpjax.grad import MODES
from bpjax.logging import NullLogger, TensorBoardLogger, flatten_hparams
from bpjax.train import (
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

# Compilations are counted through jax's monitoring events (one per XLA backend compile).
_COMPILATIONS = [0]


def _count_compilation(event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs  # unused: only the count matters
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILATIONS[0] += 1


_LISTENING: list[bool] = []


def _listen_for_compilations() -> None:
    # At the first train(), not at import: sweep launchers (joblib, submitit) rebuild this
    # script's functions in their workers by value, without running its top level.
    if not _LISTENING:
        jax.monitoring.register_event_duration_secs_listener(_count_compilation)
        _LISTENING.append(True)


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


def _target_name(node: DictConfig) -> str:
    return str(node.get("_target_", "")).rsplit(".", 1)[-1]


def validate(cfg: DictConfig) -> None:
    """Checks what can be checked without data: one clear error before any expensive work."""
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
    features = list(cfg.model.get("features", []))
    if not features or not all(isinstance(f, int) and f > 0 for f in features):
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
    for key in ("grad_check_every", "histogram_every"):
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
    if trainer.compute_dtype not in (None, "bfloat16", "float16", "float32"):
        raise ConfigError(
            f"trainer.compute_dtype must be null, bfloat16, float16 or float32, "
            f"got {trainer.compute_dtype}"
        )


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
        raise ConfigError(
            f"trainer.batch_size={trainer.batch_size} is not divisible by the {n} devices of "
            f"trainer.devices={trainer.devices}"
        )


def _has_checkpoints(checkpoint_dir: pathlib.Path) -> bool:
    return bool(CheckpointManager(checkpoint_dir).all_steps())


# Settings a resume is expected to change; every other difference is reported.
_RESUME_KEYS = ("trainer.resume", "trainer.run_dir")


def changed_settings(checkpoint_dir: pathlib.Path, config: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for each setting that differs from the latest checkpoint's config
    (a longer ``trainer.epochs``, say, also stretches a schedule fitted to the run's length).
    Empty without a checkpoint, or if it can't be read: the resume itself then reports it."""
    if not _has_checkpoints(checkpoint_dir):
        return []
    try:
        saved = load_metadata(CheckpointManager(checkpoint_dir).latest()).get("config") or {}
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
    if "decay_steps" in parameters and "decay_steps" not in given:
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
    )
    return net, loss, optimizer, schedule


@_memoise
def _jitted_grad(net, loss, mode):
    """The jitted gradient for histograms, memoised like ``_build`` (no recompiles per job)."""
    return jax.jit(bpjax.value_and_grad(net, loss, mode=mode))


class EpochReporter:
    """Per-epoch TensorBoard scalars/histograms and a progress bar (or plain lines)."""

    def __init__(self, cfg, logger, schedule, steps_per_epoch, grad_fn, batch):
        self.cfg, self.logger, self.schedule = cfg, logger, schedule
        self.steps_per_epoch, self.grad_fn, self.batch = steps_per_epoch, grad_fn, batch
        self.epochs = cfg.trainer.epochs
        self.bar = None
        if cfg.trainer.progress and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.epochs, unit="epoch", dynamic_ncols=True)

    def __call__(self, record: dict[str, Any]) -> None:
        epoch, step = record["epoch"], record["step"]
        log = self.logger
        scalars = {"train/loss": record["train_loss"]}
        for split in ("train", "val", "test"):
            for metric in ("loss", "accuracy", "rmse", "r2"):
                if f"{split}_{metric}" in record:
                    scalars[f"{split}/{metric}"] = record[f"{split}_{metric}"]
        scalars["opt/learning_rate"] = float(self.schedule(step))
        scalars["perf/examples_per_second"] = record["examples_per_second"]
        scalars["perf/epoch_seconds"] = record["epoch_seconds"]
        first_step = step - self.steps_per_epoch
        for name, values in record["step_metrics"].items():
            finite = np.flatnonzero(np.isfinite(values))
            if name.startswith("layer_stats/") and finite.size:
                scalars["layers/" + name.removeprefix("layer_stats/")] = float(values[finite[-1]])
            elif name.startswith(("grad_check/", "alignment/")):
                # the signature signals, per layer, at the steps checked: manual vs autodiff,
                # and the angle of the step's update (a learning rule's) to the true gradient
                tag = name.replace("grad_check/", "gradcheck/", 1)
                for j in finite:
                    log.scalar(tag, float(values[j]), first_step + int(j))
        log.scalars(scalars, step)
        every = self.cfg.trainer.histogram_every
        if every and (epoch % every == 0 or epoch == self.epochs):
            params = record["params"]
            _, grads = self.grad_fn(params, *self.batch, feedback=record.get("rule_state", ()))
            for i, (p, g) in enumerate(zip(params, grads)):
                if not isinstance(p, dict):  # parameter-free layers: ()
                    continue
                for leaf in sorted(p):
                    log.histogram(f"weights/layer{i}/{leaf}", np.asarray(p[leaf]), step)
                    log.histogram(f"grads/layer{i}/{leaf}", np.asarray(g[leaf]), step)
        self._progress(record)

    def _progress(self, record):
        parts = [f"loss {record['train_loss']:.4f}"]
        for key in ("val_loss", "val_accuracy", "val_rmse"):
            if key in record:
                parts.append(f"{key} {record[key]:.4f}")
        parts.append(f"{record['examples_per_second']:,.0f} ex/s")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str("  ".join(parts))
        else:
            print(f"epoch {record['epoch']}/{self.epochs}  " + "  ".join(parts), flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _write_json_atomic(path: pathlib.Path, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2, default=float)
    atomic_write(path, lambda file: file.write(text.encode()))


def _run_dir(cfg: DictConfig) -> pathlib.Path:
    if cfg.trainer.get("run_dir"):
        return pathlib.Path(cfg.trainer.run_dir)
    if HydraConfig.initialized():
        return pathlib.Path(HydraConfig.get().runtime.output_dir)
    return pathlib.Path(tempfile.mkdtemp(prefix="bpjax-run-"))


def train(
    cfg: DictConfig, *, callbacks: Sequence[Callable[[dict[str, Any]], None]] = ()
) -> dict[str, Any]:
    """Runs one configured experiment; returns its metrics (also written to metrics.json).

    ``callbacks`` are called with each epoch's record after the reporter (``fit``'s
    ``callbacks``): how ``experiments/compare_rules.py`` gets the curves it plots.
    """
    validate(cfg)
    _listen_for_compilations()
    t_start = time.perf_counter()
    compilations_before = _COMPILATIONS[0]
    if cfg.trainer.distributed:
        try:  # the coordinator, process count and id come from the cluster's environment
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:
            raise ConfigError(
                f"trainer.distributed=true: jax.distributed.initialize() failed ({e}); run it "
                f"under a cluster launcher (SLURM, ...) or set the coordinator as the README's "
                f"multi-host section shows"
            ) from None
    _check_devices(cfg.trainer)
    run_dir = _run_dir(cfg)
    checkpoint_dir = run_dir / "checkpoints"
    if not cfg.trainer.resume and _has_checkpoints(checkpoint_dir):
        # Before anything (a TensorBoard file, say) is written into the other run's directory.
        raise ResumeError(
            f"{checkpoint_dir} already holds checkpoints of a run: trainer.resume=true "
            f"continues it; a new run needs another trainer.run_dir (nothing was deleted)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    # Data first: a missing file is reported before anything is compiled.
    try:
        data = instantiate(cfg.dataset, seed=cfg.seed)
    except InstantiationException as e:  # Hydra's wrapper; report the loader's own error
        if isinstance(e.__cause__, FileNotFoundError):
            raise e.__cause__ from None
        if isinstance(e.__cause__, ValueError):
            raise ConfigError(str(e.__cause__)) from None
        raise
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
    squash = _SQUASHED_TWICE.get(_target_name(cfg.loss))
    if squash is not None and cfg.model.get("output_activation") == squash:
        print(
            f"bpjax: warning: model.output_activation={squash} before {_target_name(cfg.loss)}, "
            f"which applies {squash} itself to its logits: outputs are squashed twice, which "
            f"usually trains badly (model.output_activation=null gives it logits)",
            file=sys.stderr,
            flush=True,
        )
    steps_per_epoch = data.n_train // trainer.batch_size
    spec = {
        "model": _container(cfg.model),
        "loss": _container(cfg.loss),
        "optimizer": _container(cfg.optimizer),
        "schedule": _container(cfg.schedule),
        "trainer": {k: trainer[k] for k in ("clip_global_norm", "weight_decay")},
        "total_steps": steps_per_epoch * trainer.epochs,
    }
    net, loss, optimizer, schedule = _build(json.dumps(spec, sort_keys=True))
    loss_name = loss.name
    n_out = output_shape(net, (trainer.batch_size, *data.input_shape))[-1]
    if n_out != data.n_outputs and not single_output_binary(n_out, data.n_classes, loss_name):
        raise ConfigError(
            f"the model has {n_out} outputs but {data.name} needs {data.n_outputs} "
            f"(set model.features=[..., {data.n_outputs}])"
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
        TensorBoardLogger(run_dir / "tb", flush_secs=cfg.logger.flush_secs)
        if cfg.logger.enabled
        else NullLogger()
    )
    # A fixed training batch for gradient histograms.
    hist_n = min(256, data.n_train)
    hist_batch = (
        data.x_train[:hist_n],
        encode_targets(data.y_train[:hist_n], task=data.task, loss_name=loss_name, n_outputs=n_out),
    )
    grad_fn = _jitted_grad(net, loss, trainer.grad_mode)
    reporter = EpochReporter(cfg, logger, schedule, steps_per_epoch, grad_fn, hist_batch)
    print(f"bpjax: {data.summary()}", flush=True)
    print(
        f"bpjax: {net.name}, loss {loss_name}, grad_mode {trainer.grad_mode}, "
        f"{trainer.epochs} epochs of {steps_per_epoch} steps; run dir {run_dir}",
        flush=True,
    )
    if trainer.resume and not _has_checkpoints(checkpoint_dir):
        print(f"bpjax: nothing to resume in {checkpoint_dir}; starting from scratch", flush=True)
    elif trainer.resume:
        changed = changed_settings(checkpoint_dir, config)
        if changed:
            print(f"bpjax: resuming with changed settings: {'; '.join(changed)}", flush=True)
    status = "completed"
    message = ""
    try:
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
            rule_options=rule_options,
        )
        metrics = dict(result.metrics)
    except TrainingDiverged as e:
        status, message = "diverged", str(e)
        metrics = {"epochs": e.epoch, "diverged_step": e.step}
    except BaseException:  # a refused resume, an interrupt: flush and release the writer
        logger.close()
        raise
    finally:
        reporter.close()
    objective = metrics.get(objective_name, math.nan)
    metrics.update(
        {
            "status": status,
            "message": message,
            "objective_name": objective_name,
            "objective": objective,
            "compilations": _COMPILATIONS[0] - compilations_before,
            "total_seconds": time.perf_counter() - t_start,
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "overrides": list(HydraConfig.get().overrides.task)
            if HydraConfig.initialized()
            else [],
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
    _write_json_atomic(run_dir / "metrics.json", metrics)
    if status == "diverged":
        print(f"bpjax: {message}", file=sys.stderr, flush=True)
    else:
        if metrics.get("stopped_early"):
            print(
                f"bpjax: stopped early after epoch {metrics['epochs']}: no better {monitor} "
                f"in {trainer.patience} evaluations; the best epoch, {metrics['best_epoch']}, "
                f"gives the test metrics",
                flush=True,
            )
        summary = "  ".join(
            f"{k} {metrics[k]:.4f}"
            for k in ("test_accuracy", "test_loss", "test_rmse", "test_r2")
            if k in metrics
        )
        print(
            f"bpjax: {summary}  ({metrics['epochs']} epochs, {metrics['wall_seconds']:.1f} s, "
            f"{metrics['examples_per_second']:,.0f} examples/s, "
            f"{metrics['compilations']} compilations)",
            flush=True,
        )
    return metrics


def interrupted_message(cfg: DictConfig) -> str:
    """What an interrupted run says: where its last epoch is and the command that resumes it."""
    run_dir = _run_dir(cfg)
    checkpoint_dir = run_dir / "checkpoints"
    if not _has_checkpoints(checkpoint_dir):
        return "interrupted before the first epoch ended: nothing was checkpointed"
    overrides = [
        o
        for o in (HydraConfig.get().overrides.task if HydraConfig.initialized() else [])
        if not o.startswith(("trainer.resume=", "trainer.run_dir="))
    ]
    resume = ["trainer.resume=true", f"trainer.run_dir={run_dir}"]
    command = shlex.join(["python", "experiments/train.py", *overrides, *resume])
    return (
        f"interrupted: the last completed epoch is checkpointed in {checkpoint_dir}; "
        f"resume with: {command}"
    )


def _raise_interrupt(signum, frame):
    del frame  # unused
    raise KeyboardInterrupt(f"signal {signum}")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    signal.signal(signal.SIGTERM, _raise_interrupt)
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        metrics = train(cfg)
    except ResumeError as e:  # about this job's directory, not a swept value: fatal in a sweep
        print(
            f"error: {e}\n(trainer.resume=true continues a run; trainer.run_dir=<dir> picks "
            f"the directory)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if not multirun:
            sys.exit(2)
        # One invalid job (a sampled learning rate out of range, say) does not end a sweep: it
        # is recorded, like a diverged one, and ranks last in the summary (a sweep of nothing
        # but invalid jobs exits 2: see bpjax.sweep.SweepSummary).
        record = pathlib.Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
        if not record.exists():  # never over a finished run's record
            invalid = {
                "status": "invalid",
                "message": str(e),
                "objective": math.nan,
                "overrides": list(HydraConfig.get().overrides.task),
            }
            _write_json_atomic(record, invalid)
        return worst_objective()
    except KeyboardInterrupt:
        print(f"\n{interrupted_message(cfg)}", file=sys.stderr, flush=True)
        sys.exit(130)
    if metrics["status"] == "diverged" and not multirun:
        sys.exit(1)
    objective = float(metrics["objective"])
    return objective if math.isfinite(objective) or not multirun else worst_objective()


def worst_objective() -> float:
    """What a failed sweep job returns: the worst value for the sweeper's ``direction``
    (Optuna's; it refuses NaN, and a crash would end the study), or NaN without one."""
    direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction", default=None)
    if isinstance(direction, ListConfig | list | tuple):
        direction = direction[0] if len(direction) == 1 else None
    return {"minimize": math.inf, "maximize": -math.inf}.get(str(direction), math.nan)


if __name__ == "__main__":
    main()

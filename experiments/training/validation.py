"""Config checks that need no data (``validate``: every key read by something, then each
setting's type and range), and the monitor and objective resolved for a dataset. Each problem
is one ``ConfigError``, raised before any expensive work."""

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from bpjax import cli
from bpjax import losses as losses_lib
from bpjax.grad import MODES
from bpjax.train import WEIGHT_DECAY_MASKS, WEIGHT_DECAY_MODES
from bpjax.trainer import default_monitor, valid_monitors
from training.config import CONF_DIR, ConfigError, _takes, _target_name
from training.processes import _validate_processes

# Parameters of a group's _target_ that this script passes itself: a config must not set them.
_SUPPLIED = {"dataset": ("seed",)}
_SCHEMA: list[dict[str, Any]] = []


def _schema() -> dict[str, Any]:
    """What each config group may hold: conf/'s primary file and its groups' default files
    (read once per process; ``bpjax.cli.schema_from_conf``)."""
    if not _SCHEMA:
        _SCHEMA.append(cli.schema_from_conf(CONF_DIR))
    return _SCHEMA[0]


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
    per process (a plain list, not functools.cache: submitit's workers unpickle this module's
    functions by value, and a cache wrapper does not survive that)."""
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
            raise ConfigError(_named(group, node, str(e.__cause__ or e))) from None
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


def _named(group: str, node: Any, message: str) -> str:
    """``group: message``, or ``group.key: rest`` where the message starts with one of the
    node's own keys (a factory naming its argument: ``output_w_init: unknown initializer``)."""
    key, sep, rest = message.partition(": ")
    if sep and key in node:
        return f"{group}.{key}: {rest}"
    return f"{group}: {message}"


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

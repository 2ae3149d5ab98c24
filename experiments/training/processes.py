"""Several processes and devices: ``trainer.distributed`` and its settings checked, the job
joined, the labels of a process's lines, and ``trainer.devices`` against the devices jax sees."""

import jax
from omegaconf import DictConfig

from bpjax import distributed
from bpjax.logging import flatten_hparams
from bpjax.trainer import make_mesh
from training.config import ConfigError

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


def _joined_several() -> bool:
    """Whether this process joined a job of several (without starting jax if it did not)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def _process_label() -> str:
    """``[process N] `` in a job of several processes, for the lines every process prints."""
    return f"[process {jax.process_index()}] " if _joined_several() else ""


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


def check_same_config(config: dict) -> None:
    """In a job of several processes: every process got this far, with the same settings (but
    for each one's ``trainer.process_id``), or none trains."""
    if _several():
        distributed.check_same(
            "config",
            {
                key: value
                for key, value in flatten_hparams(config).items()
                if key.removeprefix("trainer.") not in _PROCESS_KEYS
            },
            hint="start every process with the same command, but for trainer.process_id",
        )

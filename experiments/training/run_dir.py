"""The run's directory (``trainer.run_dir``, Hydra's output directory, or process 0's in a job
of several processes), its checkpoints and record, and what Hydra calls the run: its overrides,
TensorBoard run name and ``[job N]`` label."""

import os
import pathlib
import tempfile
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bpjax import cli, distributed
from bpjax._atomic import atomic_write
from bpjax.checkpoint import CheckpointManager
from bpjax.reporting import run_name, tensorboard_dir
from bpjax.trainer import ResumeError
from training.config import ConfigError
from training.processes import _several


def _has_checkpoints(checkpoint_dir: pathlib.Path) -> bool:
    return bool(CheckpointManager(checkpoint_dir).all_steps())


def _write_json_atomic(path: pathlib.Path, payload: dict[str, Any]) -> None:
    text = cli.strict_json(payload) + "\n"
    atomic_write(path, lambda file: file.write(text.encode()))


def _run_dir(cfg: DictConfig) -> pathlib.Path:
    """The run's directory, absolute: ``trainer.run_dir`` with ``~`` expanded and made absolute
    against the directory the command was started in (orbax refuses relative paths; in a job of
    several processes, each started in the same directory, process 0's absolute path is the one
    they share)."""
    if cfg.trainer.get("run_dir"):
        path = os.path.expanduser(str(cfg.trainer.run_dir))
        return pathlib.Path(os.path.abspath(os.path.join(_original_cwd(), path)))
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


def _original_cwd() -> str:
    return hydra.utils.get_original_cwd() if HydraConfig.initialized() else os.getcwd()


def prepare_run_dir(cfg: DictConfig) -> pathlib.Path:
    """The run's directory, made: process 0's in a job of several processes; refused (before
    anything is written into it) where it holds another run's checkpoints and this is no
    resume."""
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
    return run_dir

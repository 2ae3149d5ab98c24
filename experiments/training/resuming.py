"""Resuming a run: the settings that differ from its checkpoint's, what a resume says once
``fit`` has accepted the checkpoint, and a resume of a run that had already ended (nothing to
do: its record is left as it was, or written where it was lost)."""

import json
import pathlib
from collections.abc import Callable
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from bpjax.checkpoint import CheckpointManager, load_metadata
from bpjax.logging import flatten_hparams
from bpjax.reporting import Console
from training.build import _fits_length
from training.config import _target_name
from training.run_dir import _has_checkpoints

# Settings a resume is expected to change; every other difference is reported.
_RESUME_KEYS = ("trainer.resume", "trainer.run_dir")
# What a changed setting does on resume, said beside it: those a run reads only at its start
# have no effect.
_ON_RESUME = {
    "trainer.feedback_distribution": "no effect: a rule's feedback weights are the checkpoint's",
    "trainer.feedback_scale": "no effect: a rule's feedback weights are the checkpoint's",
    "model.w_init": "no effect: the weights are the checkpoint's",
    "model.output_w_init": "no effect: the weights are the checkpoint's",
    "trainer.kp_decay": "applies from the resumed step on; the decay so far is the checkpoint's",
}


def _shown(value: Any) -> Any:
    """A setting's value as the command line writes it (null, not Python's None)."""
    return "null" if value in (None, "None") else value


def changed_settings(
    checkpoint_dir: pathlib.Path, config: dict[str, Any], path: pathlib.Path | None = None
) -> list[str]:
    """``key: saved -> now`` for each setting that differs from the config of checkpoint
    ``path`` (default: the latest in ``checkpoint_dir``); a longer ``trainer.epochs``, say, also
    stretches a schedule fitted to the run's length. The options read only at the start (the
    feedback weights' draw, the weights' initializers) say that they have no effect (the
    checkpoint's are used), and Kolen-Pollack's decay that it applies from then on; null is
    written null. Empty without a checkpoint,
    or if it can't be read: the resume itself then reports it."""
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
    notes = dict(_ON_RESUME)
    if now.get("trainer.grad_mode") != "kolen_pollack":  # only Kolen-Pollack reads it
        notes["trainer.kp_decay"] = "no effect: only trainer.grad_mode=kolen_pollack reads it"
    return [
        f"{k}: {_shown(before.get(k, missing))} -> {_shown(now.get(k, missing))}"
        + (f" ({notes[k]})" if k in notes else "")
        for k in keys
        if before.get(k, missing) != now.get(k, missing)
    ]


def announce_resume(
    cfg: DictConfig,
    console: Console,
    checkpoint_dir: pathlib.Path,
    config: dict[str, Any],
    total_steps: int,
    resumed: dict[str, Any],
) -> Callable[[dict[str, Any]], None] | None:
    """``fit``'s ``on_resume`` for a resume (None for a new run): it says which checkpoint and
    epoch the run continues from and which settings changed, and puts ``fit``'s account of
    where it resumed (``epoch``, ``epoch_step``, ``steps_per_epoch``, ``path``) into
    ``resumed``. Where there is nothing to resume, says so now."""
    trainer = cfg.trainer
    on_resume = None
    if trainer.resume and not _has_checkpoints(checkpoint_dir):
        console.say(f"bpjax: nothing to resume in {checkpoint_dir}; starting from scratch")
    elif trainer.resume:

        def on_resume(where: dict[str, Any]) -> None:
            # Said once fit has accepted the checkpoint (a refused resume says only why), of
            # the checkpoint it restored (a damaged latest is passed over). A run that had
            # already ended says "nothing to do" instead, after fit.
            resumed.update(where)
            if where["epoch"] >= trainer.epochs and not where["epoch_step"]:
                return
            into = ""
            if where["epoch_step"] == where["steps_per_epoch"]:  # stopped before evaluating
                into = f", and every step of epoch {where['epoch'] + 1}: evaluated first"
            elif where["epoch_step"]:
                into = (
                    f", step {where['epoch_step']} of {where['steps_per_epoch']} into epoch "
                    f"{where['epoch'] + 1}"
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
                    f"the run's length: it now decays over {total_steps} steps"
                )

    return on_resume


def already_ended(
    trainer: DictConfig,
    run_dir: pathlib.Path,
    metrics: dict[str, Any],
    logger: Any,
    console: Console,
) -> dict[str, Any] | None:
    """A resume of a run that had already ended (``fit`` trained no epoch): its record, left as
    it was, or None where it has none (killed between its last checkpoint and its record):
    ``metrics`` then lose the timings of a run that did not happen here, and are recorded."""
    record_path = run_dir / "metrics.json"
    checkpoint_dir = run_dir / "checkpoints"
    last = CheckpointManager(checkpoint_dir).path_for(metrics["epochs"])
    ended = (
        f"stopped early at epoch {metrics['epochs']} (trainer.patience={trainer.patience})"
        if metrics.get("stopped_early")
        else f"reached epoch {metrics['epochs']} (trainer.epochs={trainer.epochs})"
    ) + f": {last.name} is its last checkpoint"
    if record_path.exists():
        logger.close()
        # what lets it train on: more patience for a run that stopped early, else more epochs
        more = "trainer.patience" if metrics.get("stopped_early") else "trainer.epochs"
        console.say(
            f"bpjax: nothing to do: the run in {run_dir} already {ended}; metrics.json "
            f"is left as it was (raise {more} to train on)"
        )
        return json.loads(record_path.read_text())
    # Killed between its last checkpoint and its record: write the record now, without
    # the timings of a run that did not happen here.
    console.say(f"bpjax: the run in {run_dir} already {ended}; writing its metrics.json")
    metrics.update(
        wall_seconds=None, train_seconds=None, examples_per_second=None, epochs_this_call=0.0
    )
    return None

"""The network, loss, optimizer and learning-rate schedule of a config, built once per spec
in a process (identical jobs of a sweep share the compiled epoch), and the jitted gradient
that the gradient histograms use."""

import functools
import inspect
import json
from typing import Any

import jax
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import bpjax
from bpjax.train import make_optimizer
from training.config import ConfigError, _container, _target_name


def _memoise(fn):
    """``functools.lru_cache(maxsize=8)`` as a plain function.

    submitit's launcher pickles ``main`` with everything it uses by value, these modules too
    (train.py's ``bpjax.sweep.pickle_by_value``), and an lru_cache object pickled by value can't be
    looked up by name in its workers.
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


def build_spec(cfg: DictConfig, total_steps: int) -> dict[str, Any]:
    """What ``_build`` builds from: the config's model, loss, optimizer, schedule and the
    trainer settings the optimizer takes, and the run's length in steps."""
    trainer = cfg.trainer
    return {
        "model": _container(cfg.model),
        "loss": _container(cfg.loss),
        "optimizer": _container(cfg.optimizer),
        "schedule": _container(cfg.schedule),
        "trainer": {
            k: trainer[k]
            for k in ("clip_global_norm", "weight_decay", "weight_decay_mode", "weight_decay_mask")
        },
        "total_steps": total_steps,
    }

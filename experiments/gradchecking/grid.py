"""The grid experiments/gradcheck.py sweeps: the combination keys and dtypes, the two grids (MLPs
and image networks), ``combinations`` and ``validate`` (every name in the sweep is known before
anything is printed or compiled)."""

import json
import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

import bpjax
from bpjax import cli, losses
from gradchecking.networks import _takes, injectable_kinds, network

COMBINATION_KEYS = ("architecture", "activation", "loss", "dtype", "x_dtype")
X_DTYPES = ("uint8", "int32", "bool", "float16", "bfloat16", "float32", "float64")
DTYPES = ("float64", "float32", "bfloat16", "float16")


def _key(features: Any) -> str:
    """A hashable key of ``combinations``' ``features`` (a list of sizes or an image spec)."""
    return json.dumps(features, sort_keys=True)


# conf/, where gradcheck.yaml is
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# The two grids of the sweep: MLPs, and image networks (``combinations``).
_GRIDS = (
    ("architectures", "activations", "losses", "dtypes"),
    ("image_architectures", "image_activations", "image_losses", "dtypes"),
)


def validate(cfg: DictConfig) -> None:
    """Every name in the sweep is known, before anything is printed or compiled.

    Raises:
      ValueError: an unknown activation, loss, dtype, ``x_dtype`` or ``inject_bug`` kind
        (listing the valid ones), an architecture that is not a list of positive sizes,
        ``batch`` or ``n_in`` not a positive integer, ``seed`` not a non-negative integer, or
        an ``fd_eps`` entry for an unknown dtype or not a positive number.
    """
    config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra", None)  # Hydra checks its own
    unread = cli.check_keys(config, cli.schema_from_conf(CONF_DIR, "gradcheck"))
    if unread:  # a typo (+batchsize=4) would be ignored
        raise ValueError("; ".join(unread))
    for key, least in (("batch", 1), ("n_in", 1), ("seed", 0)):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            kind = "a positive integer" if least else "a non-negative integer"
            raise ValueError(f"{key} must be {kind}, got {value!r}")
    fd_eps = cfg.get("fd_eps")
    fd_eps = {} if fd_eps is None else fd_eps
    if not isinstance(fd_eps, DictConfig | dict):
        raise ValueError(
            f"fd_eps must map dtypes to steps, e.g. +fd_eps.float32=1e-3; got {fd_eps!r}"
        )
    for name, eps in fd_eps.items():
        if name not in DTYPES:
            raise ValueError(f"fd_eps: unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
        if not isinstance(eps, int | float) or isinstance(eps, bool) or not 0 < eps < math.inf:
            raise ValueError(f"fd_eps.{name} must be a positive number, got {eps!r}")
    examples = {"architectures": "[[8, 3], [16, 16, 3]]", "dtypes": "[float64, float32]"}
    for key in {k for keys in _GRIDS for k in keys}:
        if not isinstance(cfg[key], ListConfig):
            raise ValueError(
                f"{key} must be a list, e.g. {key}={examples.get(key, '[...]')}; got {cfg[key]!r}"
            )
    for features in cfg.architectures:
        if not isinstance(features, ListConfig):
            raise ValueError(
                f"architectures: {features!r} is not a list of sizes: each architecture is one, "
                f"e.g. architectures=[[4,3]] (not architectures=[4,3])"
            )
        if not features or not all(isinstance(f, int) and f > 0 for f in features):
            raise ValueError(f"architectures: {list(features)} is not a list of positive sizes")
    for activation in [*cfg.activations, *cfg.image_activations]:
        bpjax.activation(activation)  # raises, listing the valid names
    for loss_name in [*cfg.losses, *cfg.image_losses]:
        losses.get(loss_name)
    for spec in cfg.image_architectures:
        missing = {"name", "model", "input_shape"} - set(spec)
        if missing:
            raise ValueError(
                f"image_architectures: an entry without {', '.join(sorted(missing))}: "
                f"each is {{name, model: {{_target_: ...}}, input_shape: [h, w, c]}}"
            )
        try:
            hydra.utils.get_method(spec.model._target_)
        except Exception as e:  # Hydra's own error types vary: say which entry
            raise ValueError(f"image_architectures: {spec.name}: {e}") from None
    if not combinations(cfg):
        empty = sorted({k for keys in _GRIDS for k in keys if not len(cfg[k])})
        raise ValueError(
            f"nothing to check: {', '.join(empty)} "
            f"{'is' if len(empty) == 1 else 'are'} empty, so neither the MLP grid "
            f"({' x '.join(_GRIDS[0])}) nor the image grid ({' x '.join(_GRIDS[1])}) has a "
            "combination"
        )
    unknown = [d for d in cfg.dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"dtypes: unknown {unknown}; valid: {', '.join(DTYPES)}")
    if cfg.x_dtype is not None and cfg.x_dtype not in X_DTYPES:
        raise ValueError(
            f"x_dtype: unknown {cfg.x_dtype!r}; valid: null (the params' dtype), "
            f"{', '.join(X_DTYPES)}"
        )
    if cfg.inject_bug is not None:
        # The kinds of the networks the sweep checks: each (network, activation) it runs.
        kinds = set()
        for features, activation in {
            (_key(f), a): (f, a) for f, a, *_ in combinations(cfg)
        }.values():
            kinds |= injectable_kinds(
                network(features, activation, batch=cfg.batch, n_in=cfg.n_in)[0]
            )
        if cfg.inject_bug not in kinds:
            raise ValueError(
                f"inject_bug={cfg.inject_bug!r} matches no layer of the sweep; "
                f"valid kinds: {', '.join(sorted(kinds))}"
            )


def combinations(cfg: DictConfig) -> list[tuple[Any, str, str, str]]:
    """The sweep's ``(features, activation, loss, dtype)`` combinations: every MLP of
    ``architectures`` x activations x losses x dtypes, then every image network x
    image_activations x image_losses x dtypes (a network whose factory takes no activation
    once, at the first: its rows record the activation it has of its own, ``activation_used``)."""
    architectures = [list(map(int, f)) for f in OmegaConf.to_container(cfg.architectures)]
    return [
        (features, activation, loss_name, dtype)
        for features in architectures
        for activation in cfg.activations
        for loss_name in cfg.losses
        for dtype in cfg.dtypes
    ] + [
        (spec, activation, loss_name, dtype)
        for spec in OmegaConf.to_container(cfg.image_architectures)
        for activation in (
            cfg.image_activations
            if _takes(spec["model"], "activation")
            else cfg.image_activations[:1]
        )
        for loss_name in cfg.image_losses
        for dtype in cfg.dtypes
    ]

"""Weight initializers by name: a thin lookup over ``jax.nn.initializers``.

Convention: an initializer is ``init(key, shape, dtype) -> array`` exactly as in
``jax.nn.initializers``; nothing here re-implements one. Names are accepted wherever an
initializer is (``dense(w_init="he_normal")``, ``mlp(w_init=...)``, configs), and so is any
callable with that signature, e.g. ``jax.nn.initializers.normal(0.01)``.
"""

from collections.abc import Callable
from typing import Any

import jax.nn.initializers as jinit

Initializer = Callable[..., Any]

INITIALIZERS: dict[str, Callable[[], Initializer]] = {
    "zeros": lambda: jinit.zeros,
    "ones": lambda: jinit.ones,
    "normal": jinit.normal,
    "uniform": jinit.uniform,
    "truncated_normal": jinit.truncated_normal,
    "constant": jinit.constant,
    "glorot_normal": jinit.glorot_normal,
    "glorot_uniform": jinit.glorot_uniform,
    "xavier_normal": jinit.xavier_normal,
    "xavier_uniform": jinit.xavier_uniform,
    "he_normal": jinit.he_normal,
    "he_uniform": jinit.he_uniform,
    "kaiming_normal": jinit.kaiming_normal,
    "kaiming_uniform": jinit.kaiming_uniform,
    "lecun_normal": jinit.lecun_normal,
    "lecun_uniform": jinit.lecun_uniform,
    "orthogonal": jinit.orthogonal,
    "variance_scaling": jinit.variance_scaling,
}


def get(spec: str | Initializer, **kwargs: Any) -> Initializer:
    """Returns the initializer named ``spec`` (built with ``kwargs``), or ``spec`` if callable.

    Args:
      spec: a name from ``INITIALIZERS`` (e.g. ``"he_normal"``) or an initializer
        ``(key, shape, dtype) -> array``.
      **kwargs: arguments of the named jax.nn.initializers factory, e.g. ``stddev=0.01`` for
        ``"normal"`` or ``scale=1.0, mode="fan_in", distribution="normal"`` for
        ``"variance_scaling"``.

    Raises:
      ValueError: unknown name (the message lists the valid ones); a name whose factory
        needs arguments (``constant``, ``variance_scaling``) given none, or wrong ones.
    """
    if callable(spec):
        if kwargs:
            raise ValueError(f"initializer arguments {sorted(kwargs)} given with a callable")
        return spec
    if not isinstance(spec, str) or spec not in INITIALIZERS:
        raise ValueError(
            f"unknown initializer {spec!r}; valid names: {', '.join(sorted(INITIALIZERS))}"
        )
    try:
        return INITIALIZERS[spec](**kwargs)
    except TypeError as e:  # constant needs its value, variance_scaling its scale, mode, ...
        raise ValueError(
            f"initializer {spec!r} needs arguments ({e}); pass them "
            f"(initializers.get({spec!r}, ...)) or a callable, e.g. "
            f"jax.nn.initializers.{spec}(...)"
        ) from None

"""Optimizers: optax transformations with clipping and the two kinds of weight decay.

Everything here is optax; bpjax only composes it (``optax.chain``) and names the choices.
"""

import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

__all__ = ["WEIGHT_DECAY_MASKS", "WEIGHT_DECAY_MODES", "make_optimizer", "weights_mask"]

WEIGHT_DECAY_MODES = ("decoupled", "l2")
WEIGHT_DECAY_MASKS = ("weights", "all")


def weights_mask(params: Any) -> Any:
    """True for the leaves named ``"w"`` (dense weights, conv kernels), False elsewhere.

    The default weight-decay mask: biases, normalization scales and offsets are not decayed
    (decaying them pulls a layer's outputs towards zero, not its weights towards small norms).
    """

    def is_weight(path, _):
        last = path[-1] if path else None
        return getattr(last, "key", None) == "w"

    return jax.tree_util.tree_map_with_path(is_weight, params)


def _decay_mask(mask: str | Any) -> Any:
    if isinstance(mask, str):
        if mask not in WEIGHT_DECAY_MASKS:
            raise ValueError(
                f"unknown weight_decay_mask {mask!r}; valid: {', '.join(WEIGHT_DECAY_MASKS)}, "
                f"or a pytree/callable as optax.masked takes"
            )
        return weights_mask if mask == "weights" else None
    return mask


def make_optimizer(
    factory: Callable[..., optax.GradientTransformation],
    *,
    learning_rate: float | optax.Schedule,
    clip_global_norm: float | None = None,
    weight_decay: float = 0.0,
    weight_decay_mode: str = "decoupled",
    weight_decay_mask: str | Any = "weights",
    **kwargs: Any,
) -> optax.GradientTransformation:
    """An optax optimizer with optional global-norm clipping and weight decay.

    Weight decay comes in the two forms in use, named for what they are (Loshchilov & Hutter
    2019 show they differ for every optimizer but plain SGD):

    * ``"decoupled"`` (AdamW/SGDW-style): after the optimizer's own update ``u``, each decayed
      weight moves by ``-lr_t * weight_decay * w``, ``lr_t`` the (scheduled) learning rate:
      ``optax.chain(factory(lr), add_decayed_weights(-lr_t * weight_decay))``. With
      ``optax.adam`` this is ``optax.adamw``.
    * ``"l2"`` (coupled, the textbook L2 penalty ``weight_decay / 2 * ||w||^2``):
      ``weight_decay * w`` is added to the gradient BEFORE the optimizer, so adaptive
      optimizers rescale it (``optax.chain(add_decayed_weights(weight_decay), factory(lr))``).

    ``weight_decay_mask`` chooses the decayed leaves: ``"weights"`` (default: leaves named
    ``"w"``, see ``weights_mask``; biases and normalization scales are left alone), ``"all"``,
    or a pytree/callable of booleans as ``optax.masked`` takes. A factory with its own decoupled
    decay and a ``mask`` argument (``optax.adamw``, whose ``weight_decay`` defaults to 1e-4)
    gets the same mask unless ``kwargs`` names one; its own decay is bound to the factory (e.g.
    ``functools.partial(optax.adamw, weight_decay=1e-2)``, as a config's ``_partial_: true``
    does), not given here. Clipping (``optax.clip_by_global_norm``) comes first, on the raw
    gradient.

    Raises:
      ValueError: a non-positive constant learning rate or clip norm, a negative weight decay,
        an unknown mode or mask, or weight decay given twice (here and to a factory that has
        its own).

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """
    if not callable(learning_rate) and not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if clip_global_norm is not None and not clip_global_norm > 0:
        raise ValueError(f"clip_global_norm must be positive, got {clip_global_norm}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(
            f"unknown weight_decay_mode {weight_decay_mode!r}; valid: "
            f"{', '.join(WEIGHT_DECAY_MODES)}"
        )
    mask = _decay_mask(weight_decay_mask)
    if weight_decay and _takes(factory, "weight_decay"):
        name = getattr(factory, "__name__", factory)
        raise ValueError(
            f"weight decay given twice: {name} has its own weight_decay (give it there, "
            f"{name}(weight_decay=...)), or use the optimizer without decay (optax.adam for "
            f"optax.adamw) with this weight_decay"
        )
    if _takes(factory, "weight_decay") and _takes(factory, "mask") and "mask" not in kwargs:
        kwargs["mask"] = mask
    parts = []
    if clip_global_norm is not None:
        parts.append(optax.clip_by_global_norm(clip_global_norm))
    if weight_decay and weight_decay_mode == "l2":
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    parts.append(factory(learning_rate=learning_rate, **kwargs))
    if weight_decay and weight_decay_mode == "decoupled":
        if callable(learning_rate):
            rate = lambda count: -weight_decay * learning_rate(count)
        else:
            rate = -weight_decay * learning_rate
        parts.append(optax.add_decayed_weights(rate, mask))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def _takes(factory: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read
        return False

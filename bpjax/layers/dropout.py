"""``dropout``: inverted dropout, the one layer that draws random numbers."""

import jax
import jax.numpy as jnp

from bpjax.layers._core import Layer, _check_key
from bpjax.layers.activations import _same_shape_init


def dropout(rate: float) -> Layer:
    """Inverted dropout: zeroes each unit with probability ``rate`` at training time.

    ``rate`` is the probability of DROPPING a unit (as ``torch.nn.Dropout``; jax's stax used the
    keep probability). Training mode is ``forward(params, x, key=key)``: kept units are scaled by
    ``1 / (1 - rate)`` so evaluation needs no rescaling. ``key=None`` is evaluation mode: the
    identity.

    dx = dy * mask / (1 - rate)   (training);   dx = dy   (evaluation).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: rate is the drop probability and must be in [0, 1), got {rate}")

    def forward(params, x, *, key=None):
        del params  # unused: no parameters
        _check_key(key, "dropout")
        if key is None or rate == 0.0:
            return x, ()
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        scale = jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(x.dtype)
        return x * scale, scale

    def backward(params, cache, dy):
        del params  # unused: no parameters
        if isinstance(cache, tuple):  # evaluation mode: the identity
            return (), dy
        return (), dy * cache

    return Layer(_same_shape_init, forward, backward, f"dropout({rate})")

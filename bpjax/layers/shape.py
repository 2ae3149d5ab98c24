"""``flatten``: layers that only reshape."""

from bpjax.layers._core import Layer, _Static


def flatten() -> Layer:
    """Flattens all axes but the first (batch) one: ``[batch, ...] -> [batch, prod(...)]``.

    dx = dy reshaped back to the input shape.

    Raises:
      ValueError: at ``forward``, an input without a batch axis.
    """

    def init(key, in_shape):
        del key  # unused: no parameters
        size = 1
        for d in in_shape[1:]:
            size *= d
        return (in_shape[0], size), ()

    def forward(params, x, *, key=None):
        del params, key  # unused: no parameters, deterministic
        if x.ndim < 1:
            raise ValueError(f"flatten: input needs a leading batch axis, got shape {x.shape}")
        return x.reshape(x.shape[0], -1), _Static(x.shape)

    def backward(params, cache, dy):
        del params  # unused: no parameters
        return (), dy.reshape(cache.value)

    return Layer(init, forward, backward, "flatten")

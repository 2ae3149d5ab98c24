"""Networks built from layers: ``mlp`` (and the image networks, ``lenet5``, ``cnn``, ``resnet``).

Each factory returns a ``serial`` Layer; nothing here has a backward of its own.
"""

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

from bpjax.layers._core import Layer
from bpjax.layers.activations import activation as _activation_layer
from bpjax.layers.activations import default_w_init
from bpjax.layers.combinators import serial
from bpjax.layers.dense import dense
from bpjax.layers.dropout import dropout


def mlp(
    features: Sequence[int],
    *,
    activation: str | Layer = "relu",
    output_activation: str | Layer | None = None,
    w_init: str | Callable | None = None,
    b_init: str | Callable = "zeros",
    dropout_rate: float = 0.0,
    dtype: Any = jnp.float32,
) -> Layer:
    """A multi-layer perceptron: dense layers of the given output sizes, activations between.

    Args:
      features: output size of each dense layer, e.g. ``[100, 10]`` for 784-100-10.
      activation: hidden activation, a name from ``ACTIVATIONS`` or a Layer.
      output_activation: optional activation after the last dense layer (None = linear output,
        the right choice with ``softmax_cross_entropy``/``binary_cross_entropy`` from logits).
      w_init: weight initializer; default by activation (He for the ReLU family, Glorot for
        tanh/sigmoid and the rest).
      b_init: bias initializer.
      dropout_rate: if > 0, a ``dropout(dropout_rate)`` after every hidden activation.
      dtype: parameter dtype.
    """
    features = list(features)
    if not features:
        raise ValueError("mlp: features must name at least one layer size, got []")
    for f in features:
        if not isinstance(f, numbers.Integral) or isinstance(f, bool) or f < 1:
            raise ValueError(f"mlp: every feature size must be a positive integer, got {features}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"mlp: dropout_rate is a drop probability in [0, 1), got {dropout_rate}")
    hidden = _activation_layer(activation)
    out = None if output_activation is None else _activation_layer(output_activation)
    if w_init is None:
        w_init = default_w_init(hidden)
    layers: list[Layer] = []
    for i, n_out in enumerate(features):
        layers.append(dense(int(n_out), w_init=w_init, b_init=b_init, dtype=dtype))
        if i < len(features) - 1:
            layers.append(hidden)
            if dropout_rate > 0:
                layers.append(dropout(dropout_rate))
    if out is not None:
        layers.append(out)
    return serial(*layers)

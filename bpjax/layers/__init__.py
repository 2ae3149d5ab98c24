"""Layers as three pure functions, with the backward pass written by hand.

The convention, written once (after jax's stax, plus an explicit backward)::

    init(key, in_shape)             -> (out_shape, params)
    forward(params, x, *, key=None) -> (y, cache)      cache: what backward needs
    backward(params, cache, dy)     -> (grads, dx)     grads: same tree as params

* ``in_shape``/``out_shape`` are shapes of a whole batch, e.g. ``(batch, 784)`` or
  ``(batch, 28, 28, 1)``; ``init`` threads them so a network is built without a sample input.
  Images are channels-last, ``[batch, height, width, channels]`` (NHWC); kernels are
  ``[kh, kw, c_in, c_out]`` (HWIO).
* ``backward`` receives ``dy = dL/dy`` for a scalar loss ``L`` and returns ``dL/dparams`` (exactly
  the tree structure of ``params``) and ``dL/dx``. It never calls ``jax.grad``/``jax.vjp``: each
  layer carries its own local gradient rule, stated in its docstring.
* Parameter-free layers have ``()`` params and ``()`` grads.
* Randomness reaches ``forward`` through the keyword-only ``key``, and the key is also the
  mode: a key means *training mode* (dropout draws a mask, batch norm normalises with the batch
  statistics and updates its running averages); ``key=None`` means *evaluation mode* (dropout
  is the identity, batch norm uses its running averages). Combinators split their key, one per
  sublayer, so every draw is distinct.
* ``dense`` and the elementwise layers accept any number of leading batch axes, and a single
  example (``x`` of shape ``[n_in]``), so ``jax.vmap`` gives per-example gradients. ``flatten``,
  the convolutions, pools and batch norm keep exactly one batch axis, the first.

**State that is not a parameter** (decided once, here; after haiku's ``transform_with_state``
and equinox's ``State``). A layer with running statistics has ``init_state``::

    init_state(in_shape)                   -> state
    forward(params, x, *, key=None, state) -> (y, cache, new_state)
    backward(params, cache, dy)            -> (grads, dx)             (unchanged)

``state`` is a pytree of arrays threaded through ``forward``: the caller keeps the returned
``new_state`` for the next call. It is never a parameter: the optimizer, weight decay and the
gradient checks do not see it, and it receives no gradient; checkpoints save it with the
params. Layers without state have ``init_state=None`` and keep the two-value ``forward``
above, unchanged. A combinator has state when any sublayer has; its state is a tuple with one
entry per sublayer (``()`` where a sublayer has none). ``apply(layer, params, x, key=,
state=)`` calls either kind as ``(y, cache, new_state)`` and ``init_state(layer, in_shape)``
gives ``()`` for a layer without state: generic code (``bpjax.grad``, the trainer) uses those.

**Branches** (decided once, here; after stax). A layer may take or return a *tuple* of arrays
(``in_shape`` then a tuple of shapes): ``fan_out(n)`` copies, ``parallel(*layers)`` maps
branch-wise, ``fan_in_sum``/``fan_in_concat`` join, ``residual(block, shortcut)`` is the three
in one. Whatever reads an input twice passes back the SUM of the gradients of its readers.
``serial`` is the simple case. ``Layer.combinator`` names how a combinator's ``sublayers``
connect (``"serial"``, ``"parallel"``, ``"residual"``), so that the tools that walk a network
(``bpjax.grad.check_grads``, the learning rules in ``bpjax.credit``) know what they may assume.

**Other learning rules** (``bpjax.credit``) transform a network's backward from outside: they
change what a layer sends back as ``dx`` (feedback alignment replaces each weight ``w`` by a
fixed feedback matrix in the backward pass) or what each layer receives as ``dy`` (direct
feedback alignment), never a layer's own weight gradient. A layer gets them without knowing
they exist, as long as its parameter called ``w`` enters linearly (``dense``, ``conv2d``: the
backward's ``dw`` does not read ``w``).

A ``Layer`` also carries a ``name`` (for error messages and gradient-check tables) and, for
combinators, its ``sublayers`` (so ``check_grads`` can check each layer on its own).
"""

from bpjax.layers._core import (
    Layer,
    NeedsImages,
    _Static,  # noqa: F401  (used by bpjax.train)
    apply,
    check_layer,  # noqa: F401  (a helper for modules that take layers: bpjax.grad)
    init_state,
    is_stateful,
    out_shape,
    split_keys,
)
from bpjax.layers.activations import (
    ACTIVATIONS,
    _log_softmax_parts,  # noqa: F401  (used by bpjax.losses)
    activation,
    default_w_init,
    elu,
    gelu,
    identity,
    leaky_relu,
    log_softmax,
    relu,
    sigmoid,
    silu,
    softmax,
    softplus,
    swish,
    tanh,
)
from bpjax.layers.combinators import (
    fan_in_concat,
    fan_in_sum,
    fan_out,
    parallel,
    residual,
    serial,
)
from bpjax.layers.conv import conv2d
from bpjax.layers.dense import dense
from bpjax.layers.dropout import dropout
from bpjax.layers.models import cnn, lenet5, mlp, resnet
from bpjax.layers.normalization import batch_norm, group_norm, layer_norm
from bpjax.layers.pooling import avg_pool, global_avg_pool, max_pool
from bpjax.layers.shape import flatten

__all__ = [
    "ACTIVATIONS",
    "Layer",
    "NeedsImages",
    "activation",
    "apply",
    "batch_norm",
    "avg_pool",
    "conv2d",
    "default_w_init",
    "dense",
    "dropout",
    "elu",
    "fan_in_concat",
    "fan_in_sum",
    "fan_out",
    "flatten",
    "gelu",
    "group_norm",
    "global_avg_pool",
    "identity",
    "init_state",
    "is_stateful",
    "layer_norm",
    "leaky_relu",
    "log_softmax",
    "max_pool",
    "mlp",
    "lenet5",
    "cnn",
    "resnet",
    "out_shape",
    "parallel",
    "relu",
    "residual",
    "serial",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "split_keys",
    "swish",
    "tanh",
]

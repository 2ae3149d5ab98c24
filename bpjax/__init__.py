"""bpjax: neural networks as pure functions, with a hand-written layerwise backward pass.

Public names are re-exported here explicitly. The layer convention is documented in
``bpjax.layers``; the loss convention in ``bpjax.losses``.
"""

import importlib

from bpjax import credit, data, initializers, losses
from bpjax.grad import (
    GradCheckResult,
    as_custom_vjp,
    check_grads,
    grad_agreement,
    value_and_grad,
)
from bpjax.layers import (
    Layer,
    activation,
    avg_pool,
    batch_norm,
    cnn,
    conv2d,
    dense,
    dropout,
    elu,
    flatten,
    gelu,
    global_avg_pool,
    group_norm,
    identity,
    layer_norm,
    leaky_relu,
    lenet5,
    log_softmax,
    max_pool,
    mlp,
    relu,
    resnet,
    serial,
    sigmoid,
    silu,
    softmax,
    softplus,
    swish,
    tanh,
)
from bpjax.losses import Loss
from bpjax.train import TrainState
from bpjax.trainer import FitResult, TrainingDiverged, fit

__version__ = "0.1.0"

# The package's modules that ``import bpjax`` does not load itself (the README's table), loaded
# when first named: ``bpjax.sweep`` and ``bpjax.cli`` import Hydra, which a library user need
# not pay for.
_MODULES = frozenset(
    {"checkpoint", "cli", "distributed", "evaluate", "logging", "optim", "precision", "reporting"}
    | {"sweep", "grad", "layers", "train", "trainer"}
)


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"bpjax.{name}")
    raise AttributeError(f"module 'bpjax' has no attribute {name!r}")


__all__ = [
    "FitResult",
    "GradCheckResult",
    "Layer",
    "Loss",
    "TrainState",
    "TrainingDiverged",
    "activation",
    "as_custom_vjp",
    "batch_norm",
    "check_grads",
    "credit",
    "avg_pool",
    "conv2d",
    "data",
    "dense",
    "dropout",
    "elu",
    "fit",
    "flatten",
    "gelu",
    "global_avg_pool",
    "grad_agreement",
    "group_norm",
    "identity",
    "initializers",
    "layer_norm",
    "leaky_relu",
    "log_softmax",
    "losses",
    "max_pool",
    "mlp",
    "lenet5",
    "cnn",
    "resnet",
    "relu",
    "serial",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "swish",
    "tanh",
    "value_and_grad",
]

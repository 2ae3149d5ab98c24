"""Networks built from layers: ``mlp``, and the image networks ``lenet5``, ``cnn`` (VGG-style
stacks) and ``resnet`` (small pre-activation ResNets).

Each factory returns a ``serial`` Layer; nothing here has a backward of its own. Image networks
take NHWC images ``[batch, height, width, channels]`` (load data with ``flatten=False``) and
return logits ``[batch, n_classes]``. Weights default to the initializer that suits the
activation (He for the ReLU family, Glorot otherwise; the image networks' output layer Glorot);
``output_w_init`` sets the output layer's on its own (``"zeros"`` suits the feedback rules of
``bpjax.credit``: see ``mlp``).
"""

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

from bpjax import initializers
from bpjax.layers._core import Layer
from bpjax.layers.activations import activation as _activation_layer
from bpjax.layers.activations import default_w_init
from bpjax.layers.combinators import residual, serial
from bpjax.layers.conv import conv2d
from bpjax.layers.dense import dense
from bpjax.layers.dropout import dropout
from bpjax.layers.normalization import batch_norm as _batch_norm
from bpjax.layers.pooling import avg_pool, global_avg_pool, max_pool
from bpjax.layers.shape import flatten


def mlp(
    features: Sequence[int],
    *,
    activation: str | Layer = "relu",
    output_activation: str | Layer | None = None,
    w_init: str | Callable | None = None,
    b_init: str | Callable = "zeros",
    dropout_rate: float = 0.0,
    output_w_init: str | Callable | None = None,
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
      output_w_init: the output layer's weight initializer (a name or a callable), in place of
        ``w_init`` (None: ``w_init``'s). ``"zeros"`` is the start that feedback alignment
        and its relatives (``bpjax.credit``) train from best with Adam: the rule's feedback
        matrices carry the error back from the start, while the output weights grow toward
        their feedback from zero (Lillicrap et al. 2016, who start the weights near zero;
        Nøkland 2016, from a zero initial condition). Backprop trains from it too, slower at
        first: its error reaches the hidden layers through the output weights.
      dtype: parameter dtype.

    Raises:
      ValueError: an empty or non-positive ``features``, an unknown activation or initializer
        name, a dropout rate outside [0, 1).
    """
    features = list(features)
    if not features:
        raise ValueError("mlp: features must name at least one layer size, got []")
    for f in features:
        if not isinstance(f, numbers.Integral) or isinstance(f, bool) or f < 1:
            raise ValueError(f"mlp: every feature size must be a positive integer, got {features}")
    dropout_rate = _rate("mlp", dropout_rate)
    hidden = _activation_layer(activation)
    out = None if output_activation is None else _activation_layer(output_activation)
    w_init = default_w_init(hidden) if w_init is None else _named_init("w_init", w_init)
    layers: list[Layer] = []
    last = len(features) - 1
    for i, n_out in enumerate(features):
        init = _output_init(output_w_init, w_init) if i == last else w_init
        layers.append(dense(int(n_out), w_init=init, b_init=b_init, dtype=dtype))
        if i < last:
            layers.append(hidden)
            if dropout_rate > 0:
                layers.append(dropout(dropout_rate))
    if out is not None:
        layers.append(out)
    return serial(*layers)


POOLINGS = ("max", "avg")


def _positive_ints(name: str, what: str, values: Any) -> list[int]:
    values = [values] if isinstance(values, numbers.Integral) else list(values)
    if not values or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in values
    ):
        raise ValueError(f"{name}: {what} must be positive integers, got {values}")
    return [int(v) for v in values]


def _pool(name: str, pooling: str) -> Layer:
    if pooling not in POOLINGS:
        raise ValueError(f"{name}: unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    return max_pool(2) if pooling == "max" else avg_pool(2)


def _rate(name: str, dropout_rate: float) -> float:
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(
            f"{name}: dropout_rate is a drop probability in [0, 1), got {dropout_rate}"
        )
    return float(dropout_rate)


def _named_init(key: str, spec: str | Callable) -> str | Callable:
    """``spec``, checked by ``initializers.get``: a bad one's error names the argument ``key``."""
    try:
        initializers.get(spec)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    return spec


def _output_init(output_w_init: str | Callable | None, default: str | Callable):
    """The output layer's initializer: ``output_w_init``, or ``default`` when it is None."""
    return default if output_w_init is None else _named_init("output_w_init", output_w_init)


def lenet5(
    n_classes: int = 10,
    *,
    activation: str | Layer = "relu",
    pooling: str = "max",
    output_w_init: str | Callable | None = None,
    dtype: Any = jnp.float32,
) -> Layer:
    """LeNet-5 (LeCun et al. 1998): conv 5x5x6 -> pool -> conv 5x5x16 -> pool -> 120 -> 84 -> n.

    The first convolution pads its 28x28 input by 2 on every side, as LeCun padded MNIST to
    32x32, so C1 is 28x28x6, S2 14x14x6, C3 10x10x16, S4 5x5x16; C5 (a 5x5 convolution to 120
    maps of 1x1 in the paper) is the dense layer of the flattened S4, F6 has 84 units. The paper's
    squashing (scaled tanh), trainable subsampling and RBF output are replaced by the modern
    defaults, ReLU, max pooling and logits; ``activation="tanh", pooling="avg"`` is closer to
    the original.

    Args:
      n_classes: outputs (logits).
      activation: hidden activation, a name from ``ACTIVATIONS`` or a Layer.
      pooling: ``"max"`` or ``"avg"`` (2x2, stride 2).
      output_w_init: the output layer's weight initializer in place of Glorot's (see ``mlp``).
      dtype: parameter dtype.

    Returns:
      A ``serial`` Layer mapping ``[batch, 28, 28, c]`` to ``[batch, n_classes]`` (any input size
      whose S4 output is at least 1x1 works; the dense layers adapt to it).

    Raises:
      ValueError: a bad ``n_classes``, activation, pooling or initializer name.

    References:
      LeCun, Bottou, Bengio & Haffner, "Gradient-based learning applied to document
      recognition", Proc. IEEE 86(11), 1998, sec. II.B.
    """
    (n_classes,) = _positive_ints("lenet5", "n_classes", n_classes)
    act = _activation_layer(activation)
    w_init = default_w_init(act)
    pool = _pool("lenet5", pooling)
    return serial(
        conv2d(6, 5, padding=2, w_init=w_init, dtype=dtype),
        act,
        pool,
        conv2d(16, 5, padding="VALID", w_init=w_init, dtype=dtype),
        act,
        pool,
        flatten(),
        dense(120, w_init=w_init, dtype=dtype),
        act,
        dense(84, w_init=w_init, dtype=dtype),
        act,
        dense(n_classes, w_init=_output_init(output_w_init, default_w_init(None)), dtype=dtype),
    )


def cnn(
    channels: Sequence[int] = (32, 64),
    *,
    convs_per_stage: int = 2,
    kernel_size: int = 3,
    hidden: Sequence[int] = (128,),
    n_classes: int = 10,
    activation: str | Layer = "relu",
    pooling: str = "max",
    batch_norm: bool = False,
    dropout_rate: float = 0.0,
    output_w_init: str | Callable | None = None,
    dtype: Any = jnp.float32,
) -> Layer:
    """A VGG-style stack (Simonyan & Zisserman 2015): stages of 3x3 convolutions, each stage
    ending in a 2x2 pool, then dense layers.

    A stage with ``c`` channels is ``convs_per_stage`` times ``conv2d(c, kernel_size,
    padding="SAME")`` [-> ``batch_norm()``] -> activation, then the pool. After the last stage:
    ``flatten`` [-> dropout] -> for each width in ``hidden``: dense -> activation [-> dropout]
    -> ``dense(n_classes)`` (logits). With batch norm the convolutions have no bias (the norm's
    offset takes its place).

    Args:
      channels: channels of each stage, e.g. ``(32, 64)``: two stages.
      convs_per_stage: convolutions per stage.
      kernel_size: the convolutions' (square) kernel size.
      hidden: widths of the dense layers before the output (``()``: none).
      n_classes: outputs (logits).
      activation: hidden activation, a name from ``ACTIVATIONS`` or a Layer.
      pooling: ``"max"`` or ``"avg"`` (2x2, stride 2).
      batch_norm: a ``batch_norm()`` after every convolution.
      dropout_rate: if > 0, dropout before each dense layer.
      output_w_init: the output layer's weight initializer in place of Glorot's (see ``mlp``).
      dtype: parameter dtype.

    Returns:
      A ``serial`` Layer mapping ``[batch, h, w, c]`` to ``[batch, n_classes]``.

    Raises:
      ValueError: non-positive sizes, an unknown activation, pooling or initializer name, a
        dropout rate outside [0, 1).

    References:
      Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
      Recognition", ICLR 2015.
    """
    name = "cnn"
    channels = _positive_ints(name, "channels", channels)
    (convs_per_stage,) = _positive_ints(name, "convs_per_stage", convs_per_stage)
    (kernel_size,) = _positive_ints(name, "kernel_size", kernel_size)
    hidden = _positive_ints(name, "hidden", hidden) if len(list(hidden)) else []
    (n_classes,) = _positive_ints(name, "n_classes", n_classes)
    rate = _rate(name, dropout_rate)
    act = _activation_layer(activation)
    w_init = default_w_init(act)
    pool = _pool(name, pooling)
    layers: list[Layer] = []
    for c in channels:
        for _ in range(convs_per_stage):
            layers.append(
                conv2d(c, kernel_size, use_bias=not batch_norm, w_init=w_init, dtype=dtype)
            )
            if batch_norm:
                layers.append(_batch_norm(dtype=dtype))
            layers.append(act)
        layers.append(pool)
    layers.append(flatten())
    for width in hidden:
        if rate:
            layers.append(dropout(rate))
        layers += [dense(width, w_init=w_init, dtype=dtype), act]
    if rate:
        layers.append(dropout(rate))
    out_init = _output_init(output_w_init, default_w_init(None))
    layers.append(dense(n_classes, w_init=out_init, dtype=dtype))
    return serial(*layers)


def resnet(
    stage_channels: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int | Sequence[int] = 2,
    *,
    n_classes: int = 10,
    activation: str | Layer = "relu",
    output_w_init: str | Callable | None = None,
    dtype: Any = jnp.float32,
) -> Layer:
    """A small pre-activation ResNet (He et al. 2016b) for 28x28 or 32x32 images.

    A 3x3 convolution to ``stage_channels[0]``, then per stage ``blocks_per_stage`` residual
    blocks ``residual(serial(BN, act, conv 3x3 (stride s), BN, act, conv 3x3), shortcut)``: the
    first block of every stage after the first halves the resolution (stride 2) and doubles the
    channels, and there the shortcut is a 1x1 convolution with that stride (which reads the
    block's input, as the original ResNet's projection shortcut does); elsewhere the identity.
    Then BN -> act -> ``global_avg_pool`` -> ``dense(n_classes)``. Convolutions have no bias (the
    norms' offsets take its place). ``(16, 32, 64)`` with 3 blocks per stage is the CIFAR
    ResNet-20's layout.

    Args:
      stage_channels: channels of each stage.
      blocks_per_stage: residual blocks in each stage (an int, or one per stage).
      n_classes: outputs (logits).
      activation: the activation, a name from ``ACTIVATIONS`` or a Layer.
      output_w_init: the output layer's weight initializer in place of Glorot's (see ``mlp``).
      dtype: parameter dtype.

    Returns:
      A ``serial`` Layer with batch-norm state (``bpjax.layers.is_stateful``) mapping
      ``[batch, h, w, c]`` to ``[batch, n_classes]``.

    Raises:
      ValueError: non-positive sizes, a ``blocks_per_stage`` list of another length, an
        unknown initializer name.

    References:
      He, Zhang, Ren & Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016.
    """
    name = "resnet"
    channels = _positive_ints(name, "stage_channels", stage_channels)
    blocks = _positive_ints(name, "blocks_per_stage", blocks_per_stage)
    if len(blocks) == 1:
        blocks = blocks * len(channels)
    if len(blocks) != len(channels):
        raise ValueError(
            f"{name}: blocks_per_stage has {len(blocks)} entries for {len(channels)} stages"
        )
    (n_classes,) = _positive_ints(name, "n_classes", n_classes)
    act = _activation_layer(activation)
    w_init = default_w_init(act)

    def conv(c, kernel, stride=1):
        return conv2d(c, kernel, stride=stride, use_bias=False, w_init=w_init, dtype=dtype)

    layers = [conv(channels[0], 3)]
    c_in = channels[0]
    for stage, (c, n) in enumerate(zip(channels, blocks)):
        for b in range(n):
            stride = 2 if stage > 0 and b == 0 else 1
            block = serial(
                _batch_norm(dtype=dtype),
                act,
                conv(c, 3, stride),
                _batch_norm(dtype=dtype),
                act,
                conv(c, 3),
            )
            shortcut = None if stride == 1 and c_in == c else conv(c, 1, stride)
            layers.append(residual(block, shortcut))
            c_in = c
    layers += [
        _batch_norm(dtype=dtype),
        act,
        global_avg_pool(),
        dense(n_classes, w_init=_output_init(output_w_init, default_w_init(None)), dtype=dtype),
    ]
    return serial(*layers)

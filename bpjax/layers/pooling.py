"""Pooling over NHWC images: ``max_pool``, ``avg_pool`` and ``global_avg_pool``.

``window`` and ``stride`` are an int or a pair (``stride`` defaults to ``window``: windows that
tile the input); ``padding`` is as ``conv2d``'s (``"SAME"``, ``"VALID"``, an int, or
``[(lo, hi), (lo, hi)]``), resolved once per input shape in ``init``/``forward``. Per spatial
axis the output has ``m = (n + lo + hi - k) // s + 1`` entries; window ``(i, j)`` reads padded
rows ``i s_h .. i s_h + k_h - 1`` and columns ``j s_w .. j s_w + k_w - 1``.

The backward of both windowed pools scatters each output's gradient back over its window, one
offset ``(p, q)`` of the window at a time: the entries at offset ``(p, q)`` of all windows form
a strided slice of the padded input, so the scatter for one offset is a single ``lax.pad``
(interior padding ``s - 1`` places the entries ``s`` apart; negative edge padding crops the
padding), and overlapping windows add up.
"""

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from bpjax.layers._core import Layer, _Static
from bpjax.layers.conv import Pads, Pair, _describe, _image_shape, _padding_spec, _pair, _resolve


def _window_args(kind: str, window: Any, stride: Any, padding: Any) -> tuple[str, Pair, Pair, Any]:
    window = _pair(kind, "window", window)
    stride = window if stride is None else _pair(kind, "stride", stride)
    padding = _padding_spec(kind, padding)
    name = f"{kind}(" + _describe(f"{window[0]}x{window[1]}", stride, padding, window, "VALID")
    return name + ")", window, stride, padding


def _spatial(*pairs: Pair) -> tuple[tuple[int, int, int, int], ...]:
    """4-D window arguments for ``lax.reduce_window`` with 1 on the batch and channel axes."""
    return tuple((1, a, b, 1) for a, b in pairs)


def _pad_config(pads: Pads) -> tuple[Pair, ...]:
    return ((0, 0), *pads, (0, 0))


def _lowest(dtype: Any) -> np.ndarray:
    """The identity of max: -inf for floats, the smallest integer for integer dtypes.

    A numpy scalar, not a jax array: under ``jit`` a jax array would be traced, and autodiff
    (``jax.grad`` of the forward, the reference and ``mode="autodiff"``) only differentiates a
    ``reduce_window`` whose initial value is a known constant.
    """
    if jnp.issubdtype(dtype, jnp.inexact):
        return np.array(-np.inf, dtype)
    return np.array(jnp.iinfo(dtype).min, dtype)


def _place(values: Any, offset: Pair, stride: Pair, pads: Pads, in_hw: Sequence[int]) -> Any:
    """Scatters ``values`` [batch, m_h, m_w, c] to where the entries at window offset
    ``offset`` sit in the UNPADDED input [batch, h, w, c]; zeros elsewhere."""
    config = [(0, 0, 0)]
    for p, s, (lo, _), n, m in zip(offset, stride, pads, in_hw, values.shape[1:3]):
        first = p - lo  # unpadded position of this offset in the first window
        config.append((first, n - first - (m - 1) * s - 1, s - 1))
    config.append((0, 0, 0))
    return lax.pad(values, jnp.zeros((), values.dtype), config)


def _as_input_dtype(dx: Any, x_dtype: Any) -> Any:
    """``dx`` in its input's dtype, as ``jax.vjp`` gives it (integer inputs have none)."""
    return dx.astype(x_dtype) if jnp.issubdtype(x_dtype, jnp.inexact) else dx


def _offsets(window: Pair) -> list[Pair]:
    """The window's offsets in row-major order (the order that defines the FIRST maximum)."""
    return [(p, q) for p in range(window[0]) for q in range(window[1])]


def _window_entries(padded: Any, offset: Pair, stride: Pair, out_hw: Pair) -> Any:
    """The entries at ``offset`` of every window: a strided slice [batch, m_h, m_w, c]."""
    (p, q), (m_h, m_w) = offset, out_hw
    limit = (padded.shape[0], p + (m_h - 1) * stride[0] + 1, q + (m_w - 1) * stride[1] + 1)
    return lax.slice(padded, (0, p, q, 0), (*limit, padded.shape[3]), (1, *stride, 1))


def _first_max(x: Any, *, window: Pair, stride: Pair, pads: Pads, out_hw: Pair) -> Any:
    """The index (row-major offset in the window) of each window's FIRST maximum.

    Found in the forward, by comparing the window's entries in order (a strict ``>``: a tie
    keeps the earlier offset), and kept for the backward. A backward that compared ``x`` with
    the maximum again (``x == y``) could find NO entry equal under ``jit``, where XLA may
    compute ``x`` in two places with different rounding, and drop the window's gradient;
    an index always names one entry. (NaNs: the index then names some entry of a window whose
    output is NaN; the loss is NaN either way.)
    """
    padded = lax.pad(x, _lowest(x.dtype), [(*p, 0) for p in _pad_config(pads)])
    index = jnp.int8 if window[0] * window[1] <= 127 else jnp.int32
    best, first = None, None
    for k, offset in enumerate(_offsets(window)):
        entries = _window_entries(padded, offset, stride, out_hw)
        if best is None:
            best, first = entries, jnp.zeros(entries.shape, index)
            continue
        better = entries > best
        best = jnp.where(better, entries, best)
        first = jnp.where(better, jnp.asarray(k, index), first)
    return first


def _max_pool_dx(first: Any, dy: Any, *, window: Pair, stride: Pair, pads: Pads, in_hw: Any):
    """``max_pool``'s dx: each window's ``dy`` to its first maximum, one ``_place`` per offset
    (the entries of offset k of every window are a strided slice of the input)."""
    zeros = jnp.zeros((), dy.dtype)
    dx = None
    for k, offset in enumerate(_offsets(window)):
        part = _place(jnp.where(first == k, dy, zeros), offset, stride, pads, in_hw)
        dx = part if dx is None else dx + part
    return dx


def max_pool(
    window: int | Sequence[int],
    *,
    stride: int | Sequence[int] | None = None,
    padding: str | int | Sequence[Sequence[int]] = "VALID",
) -> Layer:
    """Max pooling: ``y[b, i, j, c] = max`` of the window ``(i, j)`` of ``x[b, :, :, c]``.

    Padding is ``-inf`` (the smallest integer for integer inputs), so it is never the maximum
    of a window that holds a finite input.

    Backward: each window's ``dy`` goes to ONE input, the FIRST maximum of the window in
    row-major order (top row first, left to right); overlapping windows add up::

        dx[b, h, w, c] = sum over windows (i, j) whose first maximum is at (h, w) of dy[b, i, j, c]

    This is ``jax.grad``'s rule (XLA's select-and-scatter with ``>=``), and ``np.argmax``'s
    choice in a loop such as CS231n's ``max_pool_backward_naive``. Ties are common (after a
    ReLU, all-zero windows): a naive mask ``x == max`` would send ``dy`` to every tied entry,
    multiplying the window's gradient by the number of ties. A window holding a NaN outputs
    NaN and its ``dy`` goes to one of its entries; the loss is NaN either way. The forward keeps
    the index of each window's first maximum (``_first_max``), so the backward never compares
    ``x`` with ``y`` again, which under ``jit`` could find no entry equal (XLA may compute ``x``
    in two places with different rounding) and drop the window's gradient.

    Args:
      window: ``k`` or ``(k_h, k_w)``.
      stride: ``s`` or ``(s_h, s_w)``; None means ``window``.
      padding: as ``conv2d`` (see ``bpjax.layers.pooling``); default ``"VALID"``.

    Returns:
      A Layer with ``()`` params; input ``[batch, h, w, c]``, output ``[batch, m_h, m_w, c]``.

    Raises:
      ValueError (naming the layer, the shapes and the argument): a non-positive window or
        stride, a bad ``padding``; at ``init``/``forward``, an input that is not rank 4 or a
        window larger than the padded input.
    """
    name, window, stride, padding = _window_args("max_pool", window, stride, padding)

    def init(key, in_shape):
        del key  # unused: no parameters
        shape = _image_shape(name, in_shape)
        _, out_hw = _resolve(name, shape, padding, window, stride)
        return (shape[0], *out_hw, shape[3]), ()

    def forward(params, x, *, key=None):
        del params, key  # unused: no parameters, deterministic
        pads, out_hw = _resolve(name, _image_shape(name, x.shape), padding, window, stride)
        dims, strides = _spatial(window, stride)
        y = lax.reduce_window(x, _lowest(x.dtype), lax.max, dims, strides, _pad_config(pads))
        first = _first_max(
            lax.stop_gradient(x), window=window, stride=stride, pads=pads, out_hw=out_hw
        )
        return y, (first, _Static((pads, x.shape[1:3], x.dtype)))

    def backward(params, cache, dy):
        """dx: each window's dy to its first maximum (row-major); overlaps add up."""
        del params  # unused: no parameters
        first, (pads, in_hw, x_dtype) = cache[0], cache[1].value
        dx = _max_pool_dx(first, dy, window=window, stride=stride, pads=pads, in_hw=in_hw)
        return (), _as_input_dtype(dx, x_dtype)

    return Layer(init, forward, backward, name)


def _window_counts(in_hw: Sequence[int], out_hw: Pair, window: Pair, stride: Pair, pads: Pads):
    """How many input (not padding) entries each window holds: [1, m_h, m_w, 1] (numpy)."""
    per_axis = []
    for n, m, k, s, (lo, _) in zip(in_hw, out_hw, window, stride, pads):
        start = np.arange(m) * s - lo  # unpadded position of each window's first entry
        per_axis.append(np.minimum(start + k, n) - np.maximum(start, 0))
    return np.outer(*per_axis).reshape(1, *out_hw, 1)


def _divisor(counts: np.ndarray) -> Any:
    """A scalar when every window holds as many inputs (no window overhangs), else ``counts``."""
    return counts.flat[0] if np.all(counts == counts.flat[0]) else counts


def avg_pool(
    window: int | Sequence[int],
    *,
    stride: int | Sequence[int] | None = None,
    padding: str | int | Sequence[Sequence[int]] = "VALID",
) -> Layer:
    """Average pooling: ``y[b, i, j, c]`` = the mean of the INPUT entries of window ``(i, j)``.

    Padding does not count in the divisor: a window that hangs over the edge averages the
    entries it holds (``count[i, j]`` of them), so a constant image pools to the same constant.
    This is TensorFlow/Keras's convention (``tf.nn.avg_pool`` with ``"SAME"``); PyTorch's
    ``AvgPool2d`` default (``count_include_pad=True``) and flax's ``avg_pool`` divide by the
    full window instead. Without padding the two agree.

    Backward: every input entry of window ``(i, j)`` gets ``dy[b, i, j, c] / count[i, j]``;
    overlapping windows add up.

    Args:
      window: ``k`` or ``(k_h, k_w)``.
      stride: ``s`` or ``(s_h, s_w)``; None means ``window``.
      padding: as ``conv2d`` (see ``bpjax.layers.pooling``); default ``"VALID"``.

    Returns:
      A Layer with ``()`` params; input ``[batch, h, w, c]``, output ``[batch, m_h, m_w, c]``.

    Raises:
      ValueError (naming the layer, the shapes and the argument): a non-positive window or
        stride, a bad ``padding``; at ``init``/``forward``, an input that is not rank 4, a
        window larger than the padded input, or a window that holds only padding.
    """
    name, window, stride, padding = _window_args("avg_pool", window, stride, padding)

    def counts_for(shape):
        pads, out_hw = _resolve(name, shape, padding, window, stride)
        counts = _window_counts(shape[1:3], out_hw, window, stride, pads)
        if counts.min() < 1:
            raise ValueError(
                f"{name}: a window holds only padding (input shape {tuple(shape)}, padding "
                f"{pads}): its average is undefined"
            )
        return pads, out_hw, counts

    def init(key, in_shape):
        del key  # unused: no parameters
        shape = _image_shape(name, in_shape)
        _, out_hw, _ = counts_for(shape)
        return (shape[0], *out_hw, shape[3]), ()

    def forward(params, x, *, key=None):
        del params, key  # unused: no parameters, deterministic
        pads, _, counts = counts_for(_image_shape(name, x.shape))
        dims, strides = _spatial(window, stride)
        sums = lax.reduce_window(
            x, np.zeros((), x.dtype), lax.add, dims, strides, _pad_config(pads)
        )
        y = sums / jnp.asarray(_divisor(counts), sums.dtype)
        return y, _Static((x.shape, x.dtype, pads))

    def backward(params, cache, dy):
        """dx: dy / count[i, j] to every input entry of window (i, j); overlaps add up."""
        del params  # unused: no parameters
        x_shape, x_dtype, pads = cache.value
        counts = _window_counts(x_shape[1:3], dy.shape[1:3], window, stride, pads)
        share = dy / jnp.asarray(_divisor(counts), dy.dtype)
        dx = None
        for offset in _offsets(window):
            part = _place(share, offset, stride, pads, x_shape[1:3])
            dx = part if dx is None else dx + part
        return (), _as_input_dtype(dx, x_dtype)

    return Layer(init, forward, backward, name)


def global_avg_pool() -> Layer:
    """The mean over the spatial axes: ``[batch, h, w, c] -> [batch, c]``.

    dx[b, h, w, c] = dy[b, c] / (h w).

    Raises:
      ValueError: at ``init``/``forward``, an input that is not rank 4.
    """
    name = "global_avg_pool"

    def init(key, in_shape):
        del key  # unused: no parameters
        shape = _image_shape(name, in_shape)
        return (shape[0], shape[3]), ()

    def forward(params, x, *, key=None):
        del params, key  # unused: no parameters, deterministic
        _image_shape(name, x.shape)
        return jnp.mean(x, axis=(1, 2)), _Static((x.shape, x.dtype))

    def backward(params, cache, dy):
        del params  # unused: no parameters
        shape, x_dtype = cache.value
        share = dy / jnp.asarray(shape[1] * shape[2], dy.dtype)
        return (), _as_input_dtype(lax.broadcast_in_dim(share, shape, (0, 3)), x_dtype)

    return Layer(init, forward, backward, name)

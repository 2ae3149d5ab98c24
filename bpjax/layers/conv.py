"""``conv2d``: 2-D convolution over NHWC images with HWIO kernels, and the spatial arguments
(window sizes, strides, padding) that ``bpjax.layers.pooling`` shares.

Convention: images are ``[batch, h, w, c]``; a kernel is ``[kh, kw, c_in // groups, n_out]``.
``padding`` is ``"SAME"``, ``"VALID"``, an int (the same on every side) or explicit
``[(lo, hi), (lo, hi)]`` per spatial axis (lax's convention, non-negative here). ``"SAME"`` is
resolved into explicit, possibly asymmetric, pads ONCE per input shape, in ``init`` and
``forward`` (``lax.padtype_to_pads``: the extra row goes at the end, as in TensorFlow), and the
backward reuses the forward's pads from the cache.

Per spatial axis, with input size ``n``, kernel size ``k``, dilation ``d`` (dilated extent
``e = (k - 1) d + 1``), stride ``s`` and pads ``(lo, hi)``, the output size is
``m = (n + lo + hi - e) // s + 1``; ``m < 1`` is an error.
"""

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bpjax import initializers
from bpjax.layers._core import Layer, NeedsImages, _check_positive_int, _Static

Pair = tuple[int, int]
Pads = tuple[Pair, Pair]

_PADDING_NAMES = ("SAME", "VALID")


def _pair(name: str, what: str, value: Any) -> Pair:
    """``value`` as a pair of positive ints (an int is used for both spatial axes)."""
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    if isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2:
        ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair)
        if ok and all(v >= 1 for v in pair):
            return int(pair[0]), int(pair[1])
    raise ValueError(f"{name}: {what} must be a positive int or a pair of them, got {value!r}")


def _padding_spec(name: str, padding: Any) -> str | Pads:
    """Validates ``padding``: ``"SAME"``/``"VALID"`` (any case), an int, or two (lo, hi)."""
    if isinstance(padding, str):
        if padding.upper() in _PADDING_NAMES:
            return padding.upper()
    elif isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        if padding >= 0:
            return ((int(padding), int(padding)),) * 2
    elif isinstance(padding, Sequence) and len(padding) == 2:
        pairs = [p for p in padding if isinstance(p, Sequence) and len(p) == 2]
        ints = [
            v
            for p in pairs
            for v in p
            if isinstance(v, numbers.Integral) and not isinstance(v, bool)
        ]
        if len(ints) == 4 and all(v >= 0 for v in ints):
            return tuple((int(lo), int(hi)) for lo, hi in pairs)
    raise ValueError(
        f"{name}: padding must be 'SAME', 'VALID', a non-negative int or "
        f"[(lo, hi), (lo, hi)] of non-negative ints, got {padding!r}"
    )


def _image_shape(name: str, shape: Sequence[int]) -> tuple[int, int, int, int]:
    if len(shape) != 4:
        raise NeedsImages(
            f"{name}: input must be rank 4 [batch, h, w, c] (NHWC), got shape {tuple(shape)}"
        )
    return tuple(shape)


def _resolve(
    name: str,
    shape: Sequence[int],
    spec: str | Pads,
    extent: Pair,
    stride: Pair,
    what: str = "window",
) -> tuple[Pads, Pair]:
    """Explicit pads and output size ``(m_h, m_w)`` for an NHWC ``shape`` and a window (or
    kernel: ``what``) of dilated ``extent``; raises when it is larger than the padded input."""
    in_hw = tuple(shape[1:3])
    if isinstance(spec, str):
        pads = tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, extent, stride, spec))
    else:
        pads = spec
    out_hw = tuple(
        (n + lo + hi - e) // s + 1 for n, (lo, hi), e, s in zip(in_hw, pads, extent, stride)
    )
    if min(out_hw) < 1:
        padded = tuple(n + lo + hi for n, (lo, hi) in zip(in_hw, pads))
        raise ValueError(
            f"{name}: the {what} (extent {extent[0]}x{extent[1]}) is larger than the padded input "
            f"{padded[0]}x{padded[1]} (input shape {tuple(shape)}, padding {pads})"
        )
    return pads, out_hw


def _describe(
    base: str,
    stride: Pair,
    padding: str | Pads,
    default_stride: Pair,
    default_padding: str,
    **extra,
) -> str:
    parts = [base]
    if stride != default_stride:
        parts.append(f"stride={stride[0]}x{stride[1]}")
    if padding != default_padding:
        parts.append(f"padding={padding if isinstance(padding, str) else list(padding)}")
    parts += [f"{key}={value}" for key, value in extra.items() if value is not None]
    return ", ".join(parts)


def conv2d(
    n_out: int,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[Sequence[int]] = "SAME",
    dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    use_bias: bool = True,
    w_init: str | Callable | None = None,
    b_init: str | Callable = "zeros",
    dtype: Any = jnp.float32,
) -> Layer:
    """A 2-D convolution ``y = conv(x, w) + b`` (cross-correlation, as ``lax.conv``).

    Per spatial axis (see the module docstring for ``n, k, d, s, lo, hi, m``), with ``x~`` the
    input padded by ``(lo, hi)`` and ``g = feature_group_count`` groups (output channel ``o``
    reads only the input channels of its group)::

        y[b, i, j, o] = sum_{p, q, c} x~[b, i s_h + p d_h, j s_w + q d_w, c] w[p, q, c, o] + b[o]

    Backward (each gradient a single convolution, after Dumoulin & Visin's transposed
    convolution and jax's own transpose rules)::

        dx = conv(dy dilated by s (s - 1 zeros between entries), w flipped in space with its
                  in/out channels swapped per group; dilation d, stride 1,
                  pads ((k - 1) d - lo, n - 1 - (m - 1) s + lo), g groups)
        dw = conv(x with its batch and channel axes swapped, dy as the kernel (contracting
                  the batch axis) dilated by s; stride d,
                  pads (lo, (m - 1) s + (k - 1) d + 1 - n - lo), the g groups as batch groups)
        db = sum(dy over batch, h, w)

    A negative pad crops: ``dw``'s high pad drops the trailing input rows that a strided forward
    never read, so they contribute nothing, and ``dx`` there is exactly zero.

    Args:
      n_out: output channels (divisible by ``feature_group_count``).
      kernel_size: ``k`` or ``(kh, kw)``.
      stride: ``s`` or ``(s_h, s_w)``.
      padding: ``"SAME"`` (output ``ceil(n / s)``), ``"VALID"`` (no padding), an int, or
        ``[(lo_h, hi_h), (lo_w, hi_w)]``; zeros are padded.
      dilation: kernel dilation ``d`` or ``(d_h, d_w)`` (atrous convolution).
      feature_group_count: groups ``g``; ``g == c_in`` is a depthwise convolution.
      use_bias: if False, params are ``{"w": w}`` only.
      w_init: initializer name or callable for ``w`` ``[kh, kw, c_in // g, n_out]``; None means
        ``"glorot_uniform"``, as ``dense``. Fan-in is ``kh kw c_in / g`` and fan-out
        ``kh kw n_out`` (``jax.nn.initializers``' receptive-field rule for HWIO).
      b_init: initializer name or callable for ``b`` ``[n_out]``.
      dtype: parameter dtype.

    Returns:
      A Layer with params ``{"w": [kh, kw, c_in // g, n_out], "b": [n_out]}``; input
      ``[batch, h, w, c_in]``, output ``[batch, m_h, m_w, n_out]``. An input and params of
      different dtypes are computed in their promoted dtype; each gradient has its primal's.

    Raises:
      ValueError (naming the layer, the shapes and the argument): a non-positive ``n_out``,
        kernel size, stride, dilation or group count; ``n_out`` not divisible by the groups; a
        bad ``padding``; at ``init``/``forward``, an input that is not rank 4, channels not
        divisible by the groups or not those of the params, or a kernel larger than the padded
        input.

    References:
      V. Dumoulin and F. Visin, "A guide to convolution arithmetic for deep learning",
      arXiv:1603.07285 (2016), section 4 (transposed convolution).
    """
    n_out = _check_positive_int("conv2d", "n_out", n_out)
    kernel = _pair("conv2d", "kernel_size", kernel_size)
    stride = _pair("conv2d", "stride", stride)
    dilation = _pair("conv2d", "dilation", dilation)
    groups = _check_positive_int("conv2d", "feature_group_count", feature_group_count)
    padding = _padding_spec("conv2d", padding)
    name = (
        "conv2d("
        + _describe(
            f"{n_out}, {kernel[0]}x{kernel[1]}",
            stride,
            padding,
            (1, 1),
            "SAME",
            dilation=f"{dilation[0]}x{dilation[1]}" if dilation != (1, 1) else None,
            groups=groups if groups != 1 else None,
        )
        + ")"
    )
    if n_out % groups:
        raise ValueError(f"{name}: n_out={n_out} is not divisible by feature_group_count={groups}")
    w_initializer = initializers.get("glorot_uniform" if w_init is None else w_init)
    b_initializer = initializers.get(b_init)
    extent = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))

    def check_channels(shape, c_in_params=None):
        c_in = shape[3]
        if c_in % groups:
            raise ValueError(
                f"{name}: input channels {c_in} (input shape {tuple(shape)}) are not divisible "
                f"by feature_group_count={groups}"
            )
        if c_in_params is not None and c_in != c_in_params * groups:
            raise ValueError(
                f"{name}: input has shape {tuple(shape)} ({c_in} channels) but the params expect "
                f"{c_in_params * groups} channels ({c_in_params} per group x {groups} groups)"
            )

    def init(key, in_shape):
        shape = _image_shape(name, in_shape)
        check_channels(shape)
        _, out_hw = _resolve(name, shape, padding, extent, stride, "kernel")
        w_key, b_key = jax.random.split(key)
        params = {"w": w_initializer(w_key, (*kernel, shape[3] // groups, n_out), dtype)}
        if use_bias:
            params["b"] = b_initializer(b_key, (n_out,), dtype)
        return (shape[0], *out_hw, n_out), params

    def forward(params, x, *, key=None):
        del key  # unused: a convolution is deterministic
        w = params["w"]
        shape = _image_shape(name, x.shape)
        if w.ndim != 4 or w.shape[:2] != kernel or w.shape[3] != n_out:
            raise ValueError(
                f"{name}: w has shape {w.shape}, expected [{kernel[0]}, {kernel[1]}, "
                f"c_in // {groups}, {n_out}]"
            )
        check_channels(shape, w.shape[2])
        pads, _ = _resolve(name, shape, padding, extent, stride, "kernel")
        compute_dtype = jnp.result_type(x, w)
        y = lax.conv_general_dilated(
            x.astype(compute_dtype),
            w.astype(compute_dtype),
            window_strides=stride,
            padding=pads,
            rhs_dilation=dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )
        if use_bias:
            y = y + params["b"].reshape(1, 1, 1, n_out)
        return y, (x, _Static(pads))

    def backward(params, cache, dy):
        """dx, dw: one convolution each (see ``conv2d``); db = sum(dy over batch, h, w)."""
        x, pads = cache[0], cache[1].value
        w = params["w"]
        kh, kw, c_in_group, _ = w.shape
        in_hw, out_hw = x.shape[1:3], dy.shape[1:3]
        # Per group, the transposed kernel maps dy's channels back to x's: split n_out into
        # (groups, n_out // groups) and move the group axis next to c_in // groups (group-major,
        # as the forward's input channels), then read it with O and I swapped.
        w_t = w.astype(dy.dtype).reshape(kh, kw, c_in_group, groups, n_out // groups)
        w_t = w_t.transpose(0, 1, 4, 3, 2).reshape(kh, kw, n_out // groups, groups * c_in_group)
        # Both convolutions are written in the canonical layouts (NHWC input and output, HWIO
        # kernel), transposing explicitly: XLA's CPU backend hands canonical convolutions to its
        # fast library, and inside a while loop (an epoch's lax.scan) it did not canonicalize
        # others, which then ran 2-4x slower there (LeNet-5: 43 against 23 ms a step).
        dx = lax.conv_general_dilated(
            dy,
            lax.rev(w_t, (0, 1)),
            window_strides=(1, 1),
            padding=[
                (e - 1 - lo, n - 1 - (m - 1) * s + lo)
                for n, m, e, s, (lo, _) in zip(in_hw, out_hw, extent, stride, pads)
            ],
            lhs_dilation=stride,
            rhs_dilation=dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )
        # Swapping batch and channels makes the batch the contracted axis: x as [c_in, h, w,
        # batch] and dy as a kernel [h', w', batch, n_out]; the output's "batch" axis is then
        # c_in // groups, its features n_out: [c_in // groups, kh, kw, n_out], then HWIO.
        dw = lax.conv_general_dilated(
            x.astype(dy.dtype).transpose(3, 1, 2, 0),
            dy.transpose(1, 2, 0, 3),
            window_strides=dilation,
            padding=[
                (lo, (m - 1) * s + e - n - lo)
                for n, m, e, s, (lo, _) in zip(in_hw, out_hw, extent, stride, pads)
            ],
            rhs_dilation=stride,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            batch_group_count=groups,
        ).transpose(1, 2, 0, 3)
        grads = {"w": dw.astype(w.dtype)}
        if use_bias:
            grads["b"] = jnp.sum(dy, axis=(0, 1, 2)).astype(params["b"].dtype)
        if jnp.issubdtype(x.dtype, jnp.inexact):  # integer inputs have no gradient dtype
            dx = dx.astype(x.dtype)
        return grads, dx

    return Layer(init, forward, backward, name)

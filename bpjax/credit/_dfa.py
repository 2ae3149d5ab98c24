"""Direct feedback alignment (Nøkland 2016) on a ``serial`` network, read as segments.

A layer is *parametric* if it has parameters; each parametric layer's *segment* is it and the
parameter-free layers after it up to the next parametric one (see
``bpjax.grad.value_and_grad`` for the rule, and ``bpjax.credit.init_rule_state`` for ``B``).
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bpjax.credit._common import check_feedback
from bpjax.layers import Layer, apply, out_shape


def _where(path: tuple[int, ...], layer: Layer) -> str:
    return f"layer {'.'.join(map(str, path))} ({layer.name})" if path else layer.name


def flatten(layer: Layer, path: tuple[int, ...] = ()) -> list[tuple[tuple[int, ...], Layer]]:
    """The layers of a serial network in order, nested serials flattened, with their index paths."""
    if layer.combinator != "serial":
        return [(path, layer)]
    return [item for i, sub in enumerate(layer.sublayers) for item in flatten(sub, (*path, i))]


def at(tree: Any, path: tuple[int, ...]) -> Any:
    for i in path:
        tree = tree[i]
    return tree


def _nest(layer: Layer, value_at: Callable, path: tuple[int, ...] = ()) -> Any:
    """A tree shaped like a serial network's params: ``value_at(path)`` for each layer."""
    if layer.combinator != "serial":
        return value_at(path)
    return tuple(_nest(sub, value_at, (*path, i)) for i, sub in enumerate(layer.sublayers))


def _flat_caches(layer: Layer, cache: Any) -> list[Any]:
    if layer.combinator != "serial":
        return [cache]
    if not isinstance(cache, tuple) or len(cache) != len(layer.sublayers):
        raise ValueError(
            f"direct_feedback_alignment: {layer.name} says it is serial but its cache is not one "
            f"entry per layer (a wrapper that changed its forward?)"
        )
    return [
        c for sub, sub_cache in zip(layer.sublayers, cache) for c in _flat_caches(sub, sub_cache)
    ]


def check_network(net: Layer) -> None:
    """What DFA can't apply to, known from the network's structure alone."""
    for path, layer in flatten(net):
        if layer.combinator is not None or layer.sublayers:
            kind = layer.combinator or "combinator"
            raise ValueError(
                f"direct_feedback_alignment can't apply to this network: {_where(path, layer)} is "
                f"a {kind} block, and DFA is defined for a serial network only (each hidden "
                f"layer's output is where the output error is injected; a branch has no single "
                f"such place). feedback_alignment, sign_symmetry and kolen_pollack work through "
                f"branches"
            )


class _Segment(NamedTuple):
    """A parametric layer (``head``, an index into the flattened network) and the parameter-free
    layers after it up to the next parametric one (``head + 1 .. end - 1``)."""

    head: int
    end: int
    out_shape: tuple[int, ...]  # the segment's output shape: where the error is injected
    feedback_shape: tuple[int, ...] | None  # B: [n_outputs, units]; None for the output layer


def segments(net: Layer, flat: list, layer_params: list, in_shape: tuple) -> list[_Segment]:
    """The segments of a serial network for inputs of ``in_shape``, or one ValueError naming the
    layer DFA can't apply to."""
    shapes = [tuple(in_shape)]
    for _, layer in flat:
        shapes.append(out_shape(layer, shapes[-1]))
    heads = [i for i, p in enumerate(layer_params) if jax.tree_util.tree_leaves(p)]
    if not heads:
        raise ValueError(f"direct_feedback_alignment: {net.name} has no parameters to train")
    for i in heads:
        p = layer_params[i]
        if not (isinstance(p, dict) and "w" in p):
            names = sorted(p) if isinstance(p, dict) else type(p).__name__
            raise ValueError(
                f"direct_feedback_alignment can't apply to {_where(*flat[i])}: it has parameters "
                f"({names}) but no weight 'w' whose input the output error can train "
                f"(normalization scales and offsets have no DFA rule)"
            )
    e_shape = shapes[heads[-1] + 1]
    if not (isinstance(e_shape, tuple) and 1 <= len(e_shape) <= 2):
        raise ValueError(
            f"direct_feedback_alignment needs the output layer {_where(*flat[heads[-1]])} to "
            f"give [batch, n_outputs] (or one example's [n_outputs]), got {e_shape}"
        )
    lead, n_outputs = e_shape[:-1], e_shape[-1]
    out = []
    for k, head in enumerate(heads):
        end = heads[k + 1] if k + 1 < len(heads) else len(flat)
        shape = shapes[end]
        if k + 1 == len(heads):
            out.append(_Segment(head, end, shape, None))
            continue
        if not (all(isinstance(d, int) for d in shape) and shape[: len(lead)] == lead):
            raise ValueError(
                f"direct_feedback_alignment can't inject the output error after "
                f"{_where(*flat[end - 1])}: its output {shape} is not one array with the "
                f"output's batch axes {lead}"
            )
        out.append(_Segment(head, end, shape, (n_outputs, math.prod(shape[len(lead) :]))))
    return out


def expected_feedback(net: Layer, flat: list, layer_params: list, parts: list[_Segment]) -> Any:
    """The DFA feedback tree's layout: ``[n_outputs, units]`` (in the layer's ``w`` dtype) for
    each hidden parametric layer, ``()`` for every other layer, nested as the network's params."""
    specs = {
        flat[s.head][0]: jax.ShapeDtypeStruct(s.feedback_shape, layer_params[s.head]["w"].dtype)
        for s in parts
        if s.feedback_shape
    }
    return _nest(net, lambda path: specs.get(path, ()))


def value_and_grad(net: Layer, loss: Any) -> Callable:
    """``f(params, x, target, key, state, feedback) -> (value, y, new_state, grads)`` by DFA.

    The network's own forward (its keys, dropout masks and state), then per segment: the output
    segment's parameter-free layers carry ``dL/dy`` back to the output layer's error ``e``; each
    hidden segment gets ``e @ B`` at its output and its parameter-free layers carry it back to
    its parametric layer, whose backward gives the weight gradient (its ``dx`` is not used:
    nothing is chained through a parametric layer, and under jit XLA drops those products).
    """
    flat = flatten(net)

    def f(params, x, target, key, state, feedback):
        layer_params = [at(params, path) for path, _ in flat]
        parts = segments(net, flat, layer_params, jnp.shape(x))
        expected = expected_feedback(net, flat, layer_params, parts)
        check_feedback("direct_feedback_alignment", expected, feedback)
        y, cache, new_state = apply(net, params, x, key=key, state=state)
        value, loss_cache = loss.forward(y, target)
        dy = loss.backward(loss_cache)
        caches = _flat_caches(net, cache)

        def back(i, d):
            return flat[i][1].backward(layer_params[i], caches[i], d)

        grads = [jax.tree_util.tree_map(jnp.zeros_like, p) for p in layer_params]
        output = parts[-1]
        for i in reversed(range(output.head + 1, output.end)):
            _, dy = back(i, dy)
        error = dy  # the output layer's error: Nøkland's e (its pre-activation gradient)
        grads[output.head], _ = back(output.head, error)
        for segment in parts[:-1]:
            b = at(feedback, flat[segment.head][0]).astype(error.dtype)
            d = (error @ b).reshape(segment.out_shape)
            for i in reversed(range(segment.head + 1, segment.end)):
                _, d = back(i, d)
            grads[segment.head], _ = back(segment.head, d)
        by_path = {path: g for (path, _), g in zip(flat, grads)}
        return value, y, new_state, _nest(net, by_path.__getitem__)

    return f

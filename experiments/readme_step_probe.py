"""Why the README's plain training step was slower in manual mode (issue 10 #18): a probe.

Fixed since (``softmax_cross_entropy`` builds its labels' one-hot as a scatter, a source of
its own, as autodiff's program has): the probe now shows the README's manual step at parity;
docs/benchmarks.md has both its runs, before and after.

Times, interleaved in one process, the README's step (``jax.jit`` of ``bpjax.value_and_grad``
followed by an optax SGD update) in manual and autodiff mode, the same manual step carrying an
``int32`` step counter (one tiny independent instruction more, nothing else), the manual step
with its carry donated, and ``bpjax.train.make_step`` in both modes. Writes the optimized HLO of
the manual step with and without the counter beside each other (``--hlo DIR``): a ``diff`` of
their entry computations' instruction names shows that one instruction (a plain ``diff`` also
shows renumbered names and metadata). See docs/benchmarks.md (2026-11-29).

    python experiments/readme_step_probe.py           # mlp([100, 10]) relu, batch 128
    python experiments/readme_step_probe.py --batch 64 \
        --widths 256 256 256 256 256 256 256 256 256 256 10
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bpjax
from bpjax.train import init_state, make_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[100, 10])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--calls", type=int, default=200, help="steps per sample")
    parser.add_argument("--hlo", type=pathlib.Path, default=None, help="write the HLO here")
    args = parser.parse_args()
    for name in ("batch", "rounds", "calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.widths or min(args.widths) < 1:
        parser.error(f"--widths must be positive, got {args.widths}")
    if args.activation not in bpjax.layers.ACTIVATIONS:
        parser.error(
            f"unknown --activation {args.activation!r}; valid: "
            f"{', '.join(sorted(bpjax.layers.ACTIVATIONS))}"
        )

    net = bpjax.mlp(args.widths, activation=args.activation)
    loss = bpjax.losses.get("softmax_cross_entropy")
    opt = optax.sgd(0.01)
    state = init_state(net, opt, jax.random.key(0), (args.batch, 784))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((args.batch, 784), np.float32))
    y = jnp.arange(args.batch) % args.widths[-1]

    def readme(mode: str, counter: bool = False):
        grad_fn = bpjax.value_and_grad(net, loss, mode=mode)

        def step(carry, x, y):
            params, opt_state, *i = carry
            value, grads = grad_fn(params, x, y)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, *[j + 1 for j in i]), value

        return step

    def made(mode: str):
        step = make_step(net, loss, opt, grad_mode=mode)
        return lambda s, x, y: (step(s, x, y)[0], ())

    plain = (state.params, state.opt_state)
    variants = {
        "readme manual": (readme("manual"), plain, ()),
        "readme autodiff": (readme("autodiff"), plain, ()),
        "readme manual + counter": (readme("manual"), (*plain, jnp.int32(0)), ()),
        "readme manual, donated": (readme("manual"), plain, (0,)),
        "make_step manual": (made("manual"), state, ()),
        "make_step autodiff": (made("autodiff"), state, ()),
    }
    timed = {}
    for name, (fn, carry, donate) in variants.items():
        compiled = jax.jit(fn, donate_argnums=donate).lower(carry, x, y).compile()
        if args.hlo and name in ("readme manual", "readme manual + counter"):
            args.hlo.mkdir(parents=True, exist_ok=True)
            (args.hlo / (name.replace(" ", "_").replace("+", "with") + ".hlo")).write_text(
                compiled.as_text()
            )
        carry = jax.tree_util.tree_map(jnp.copy, carry)  # a donated carry is consumed
        timed[name] = [compiled, carry, []]
    for r in range(args.rounds):
        for name in list(timed) if r % 2 == 0 else list(timed)[::-1]:
            compiled, carry, samples = timed[name]
            jax.block_until_ready(carry)
            start = time.perf_counter()
            for _ in range(args.calls):
                carry = compiled(carry, x, y)[0]
            jax.block_until_ready(carry)
            samples.append((time.perf_counter() - start) / args.calls * 1e3)
            timed[name][1] = carry
    reference = statistics.median(timed["readme autodiff"][2])
    print(f"mlp({args.widths}) {args.activation}, batch {args.batch}; median ms per step")
    for name, (_, _, samples) in timed.items():
        median = statistics.median(samples)
        print(f"  {name:26s} {median:8.4f} ms  / readme autodiff {median / reference:.3f}")


if __name__ == "__main__":
    main()

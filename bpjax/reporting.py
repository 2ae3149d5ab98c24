"""What a training script shows and records per epoch: console lines (and a progress bar on a
terminal), TensorBoard scalars and histograms, and a watch for an exploding loss.

Convention: ``EpochReporter`` is a ``bpjax.fit`` callback (one call per epoch record);
``Console`` owns the console. On a terminal every epoch keeps its line above the progress bar
(``tqdm.write``); elsewhere (a log file, a pipe) the same lines are printed plainly; in a sweep
every line carries the job's label. TensorBoard events are flushed at every epoch end, so a
``kill -9`` loses at most the epoch that was running. A TensorBoard run is named after the
run's command-line overrides (``run_name``).

The scalar tags (``train/loss``, ``val/accuracy``, ``layers/layer{i}/grad_norm``,
``gradcheck/...``, ``perf/...``) and histogram tags (``weights/layer{i}/w``, ``grads/...``) are
those the README's TensorBoard table lists.
"""

from __future__ import annotations

import hashlib
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from bpjax._trees import at_path, path_name
from bpjax.distributed import host_copy
from bpjax.logging import Logger

__all__ = [
    "EXPLODED",
    "Console",
    "EpochReporter",
    "count",
    "format_number",
    "run_name",
    "tensorboard_dir",
]

# An epoch's mean training loss above EXPLODED times the loss of the first step trained (the
# untrained network's, on its first batch: a scale the task sets) is a loss that exploded. A
# relative rule, so it holds for any loss's units; against the first step, not the best epoch,
# so a loss that merely wobbles near zero (1e-6 -> 1e-3) is not flagged.
EXPLODED = 1e3


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: ``1 epoch``, ``0 compilations``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_number(value: float) -> str:
    """4 decimals for ordinary values; 4 significant digits beyond 1e4 (a loss of 8e29)."""
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


class Console:
    """A run's console lines: labelled (``label``, e.g. ``"[job 1] "`` in a sweep) and, on a
    terminal with ``progress``, written above a progress bar so every line stays.

    The bar counts minibatch steps: ``advance(step)`` sets its position (moved at every chunk of
    an epoch; a resumed run starts where it left off).

    Args:
        label: put before every line.
        progress: show a bar when stdout is a terminal.
        quiet: say nothing and show no bar (the processes other than process 0 of a job of
            several, whose errors their caller prints).
    """

    def __init__(self, label: str = "", *, progress: bool = True, quiet: bool = False) -> None:
        self.label = label
        self.quiet = quiet
        self.progress = progress and sys.stdout.isatty() and not quiet
        self.bar = None

    def start(self, total: int) -> None:
        """Shows the bar (``total`` steps), if there is to be one."""
        if self.progress and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                unit="step",
                dynamic_ncols=True,
                file=sys.stdout,
                desc=self.label.strip() or None,
            )

    def say(self, text: str, *, err: bool = False) -> None:
        """Prints ``text`` (each line labelled) to stdout, or stderr with ``err``."""
        if self.quiet:
            return
        file = sys.stderr if err else sys.stdout
        text = "\n".join(f"{self.label}{line}" for line in text.split("\n"))
        if self.bar is not None:
            self.bar.write(text, file=file)  # clears the bar, writes, redraws it below
            file.flush()
        else:
            print(text, file=file, flush=True)

    def advance(self, step: int, postfix: str = "") -> None:
        """Moves the bar to ``step`` with ``postfix`` after it."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(postfix)

    def close(self) -> None:
        """Removes the bar (the lines said stay)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# Per-step signals of a chunk (``bpjax.fit``'s step metrics) -> their TensorBoard tag prefix.
STEP_SIGNALS = {"grad_check/": "gradcheck/", "alignment/": "alignment/"}


def network_table(net: Any, in_shape: Sequence[int]) -> str:
    """The network as a markdown table: one row per top-level layer (the ``layer{i}`` of the
    per-layer TensorBoard tags) with its name, parameter count and output shape. Nothing is
    allocated: shapes come from ``jax.eval_shape`` of ``init``."""
    from bpjax.layers import out_shape

    layers = net.sublayers if net.combinator == "serial" else (net,)
    rows = ["| tag | layer | params | output |", "|---|---|---|---|"]
    shape, total = tuple(in_shape), 0
    for i, layer in enumerate(layers):
        params = jax.eval_shape(
            lambda k, layer=layer, shape=shape: layer.init(k, shape)[1], jax.random.PRNGKey(0)
        )
        count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
        shape = out_shape(layer, shape)
        total += count
        rows.append(f"| layer{i} | `{layer.name}` | {count:,} | {tuple(shape)} |")
    rows.append(f"| | total | {total:,} | |")
    return "\n".join(rows)


class EpochReporter:
    """A ``bpjax.fit`` callback: per epoch, TensorBoard scalars and histograms (flushed to
    disk), one console line, and the exploding-loss watch (``EXPLODED``).

    Args:
        logger: a ``bpjax.logging`` logger.
        epochs: the run's epochs (for ``epoch 3/20`` and the last histogram).
        steps_per_epoch: optimizer steps per epoch (places per-step signals at their step).
        schedule: the learning-rate schedule, step -> rate (logged as ``opt/learning_rate``).
        console: where lines go (a plain ``Console`` if None).
        histogram_every: epochs between weight/gradient histograms (0: none).
        grad_fn: ``(params, x, y) -> (loss, grads)`` for the histograms' gradients.
        batch: the fixed ``(x, y)`` the histograms' gradients are taken on.
        explosion_hint: added to the exploding-loss warning (e.g. the learning rate).
        network: a text summary of the network (``network_table``), logged as ``network`` at
            step 0 with the first record: a run that trains nothing (a refused or finished
            resume) writes nothing.
    """

    def __init__(
        self,
        logger: Logger,
        *,
        epochs: int,
        steps_per_epoch: int,
        schedule: Callable[[int], Any],
        console: Console | None = None,
        histogram_every: int = 0,
        grad_fn: Callable[..., Any] | None = None,
        batch: Sequence[Any] = (),
        explosion_hint: str = "",
        network: str = "",
    ) -> None:
        self.logger, self.schedule = logger, schedule
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.console = console if console is not None else Console()
        self.histogram_every, self.grad_fn, self.batch = histogram_every, grad_fn, batch
        self.explosion_hint = explosion_hint
        self.first_loss: float | None = None
        self.exploded: dict[str, Any] | None = None  # epoch, train_loss, first_step_loss
        self.epochs_seen = 0
        self.network = network

    def _log_network(self) -> None:
        if self.network:
            self.logger.text("network", self.network, 0)
            self.network = ""

    def __call__(self, record: dict[str, Any]) -> None:
        epoch, step = record["epoch"], record["step"]
        self._log_network()
        self.epochs_seen += 1
        log = self.logger
        scalars = {"train/loss": record["train_loss"]}
        for split in ("train", "val", "test"):
            for metric in ("loss", "accuracy", "rmse", "r2"):
                if f"{split}_{metric}" in record:
                    scalars[f"{split}/{metric}"] = record[f"{split}_{metric}"]
        scalars["opt/learning_rate"] = float(self.schedule(step))
        if record["examples_per_second"] is not None:  # None: every chunk compiled
            scalars["perf/examples_per_second"] = record["examples_per_second"]
        scalars["perf/epoch_seconds"] = record["epoch_seconds"]
        for name, values in record["step_metrics"].items():
            finite = np.flatnonzero(np.isfinite(values))
            if name.startswith("layer_stats/") and finite.size:
                scalars["layers/" + name.removeprefix("layer_stats/")] = float(values[finite[-1]])
        log.scalars(scalars, step)
        every = self.histogram_every
        if every and self.grad_fn is not None and (epoch % every == 0 or epoch == self.epochs):
            # Host copies: in a job of several processes, process 0 alone computes these, on its
            # own device, where the run's arrays span every process's devices.
            params = host_copy(record["params"])
            # the step's own rule (feedback weights) and, for a network with state, its state
            # in evaluation mode (the histograms' gradients are on a fixed batch, no key)
            _, grads = self.grad_fn(
                params,
                *self.batch,
                state=host_copy(record.get("net_state")) or None,
                feedback=host_copy(record.get("rule_state", ())),
            )
            per_layer = zip(params, grads) if isinstance(params, tuple) else [(params, grads)]
            for i, (p, g) in enumerate(per_layer):
                for path, leaf in jax.tree_util.tree_flatten_with_path(p)[0]:
                    name = path_name(path)  # "w", "b", or e.g. "0/2/w" inside a residual block
                    grad = at_path(g, path)
                    log.histogram(f"weights/layer{i}/{name}", np.asarray(leaf), step)
                    log.histogram(f"grads/layer{i}/{name}", np.asarray(grad), step)
        log.flush()  # on disk at every epoch end: a kill -9 loses at most the epoch running
        self._watch_loss(record)
        self._progress(record)

    def chunk(self, record: dict[str, Any]) -> None:
        """A ``bpjax.fit`` ``on_chunk`` callback: the per-step signals of a chunk of an epoch
        (``gradcheck/...``: manual vs autodiff, per layer; ``alignment/...``: the angle of each
        layer's update to the true gradient) at the steps they were measured, and the progress
        bar moved to the chunk's last step."""
        self._log_network()
        log, step = self.logger, record["step"]
        for name, values in record["step_metrics"].items():
            prefix = next((p for p in STEP_SIGNALS if name.startswith(p)), None)
            if prefix is None:
                continue
            first_step = step - len(values)
            tag = STEP_SIGNALS[prefix] + name.removeprefix(prefix)
            for j in np.flatnonzero(np.isfinite(values)):
                log.scalar(tag, float(values[j]), first_step + int(j))
        part = f"epoch {record['epoch']}/{self.epochs}  loss {format_number(record['train_loss'])}"
        self.console.advance(step, part)

    def _watch_loss(self, record: dict[str, Any]) -> None:
        losses = np.asarray(record["step_metrics"]["loss"])
        if self.first_loss is None and losses.size:
            self.first_loss = float(losses[0])
        loss, first = record["train_loss"], self.first_loss
        if self.exploded is None and first and first > 0 and loss > EXPLODED * first:
            self.exploded = {"epoch": record["epoch"], "train_loss": loss, "first_step_loss": first}
            hint = f"; {self.explosion_hint}" if self.explosion_hint else ""
            self.console.say(f"bpjax: warning: {self.explosion()}{hint}", err=True)

    def explosion(self) -> str:
        """What happened to the loss, in words ("" if it did not explode)."""
        if self.exploded is None:
            return ""
        e = self.exploded
        return (
            f"the training loss exploded at epoch {e['epoch']}: {e['train_loss']:.4g}, over "
            f"{EXPLODED:g} times the first step's {e['first_step_loss']:.4g}"
        )

    def _progress(self, record: dict[str, Any]) -> None:
        parts = [f"loss {format_number(record['train_loss'])}"]
        for key in ("val_loss", "val_accuracy", "val_rmse"):
            if key in record:
                parts.append(f"{key} {format_number(record[key])}")
        if record["examples_per_second"] is not None:  # None: every chunk compiled
            parts.append(f"{record['examples_per_second']:,.0f} ex/s")
        self.console.say(f"epoch {record['epoch']}/{self.epochs}  " + "  ".join(parts))
        self.console.advance(record["step"], "  ".join(parts))

    def close(self) -> None:
        """Removes the progress bar."""
        self.console.close()


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


# Overrides that say where and how a run is kept or shown, not what it is.
_BOOKKEEPING_KEYS = ("trainer.run_dir", "trainer.resume", "trainer.progress", "logger")
_BOOKKEEPING_PREFIXES = ("logger.", "hydra.", "hydra/")


def run_name(overrides: Sequence[str]) -> str:
    """A TensorBoard run's name: its command-line overrides.

    Bookkeeping overrides (``trainer.run_dir``, ``trainer.resume``, ``trainer.progress``,
    ``logger*``, ``hydra*``) are left out; the rest are joined by ``,`` with ``/`` written as
    ``_`` (a file name); ``defaults`` if none is left. Names longer than 200 bytes are cut and
    end in a hash of the whole.

    Args:
        overrides: e.g. ``["optimizer=adam", "optimizer.learning_rate=0.1"]``.

    Returns:
        e.g. ``"optimizer=adam,optimizer.learning_rate=0.1"``.
    """
    kept = [
        o
        for o in overrides
        if _override_key(o) not in _BOOKKEEPING_KEYS
        and not _override_key(o).startswith(_BOOKKEEPING_PREFIXES)
    ]
    name = ",".join(kept).replace("/", "_").replace("\\", "_") or "defaults"
    if len(name.encode()) > 200:  # file names have 255 bytes
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name.encode()[:180].decode(errors='ignore')}-{digest}"
    return name


def tensorboard_dir(run_dir: str | pathlib.Path, name: str) -> pathlib.Path:
    """Where a run's TensorBoard events go: ``run_dir/tb/<name>``, or, where ``run_dir/tb``
    already holds a run (this run, resumed), that run's directory, so its curves continue."""
    tb = pathlib.Path(run_dir) / "tb"
    if tb.is_dir():
        if any(tb.glob("events.out.tfevents.*")):  # a run written before runs had names
            return tb
        existing = sorted(p for p in tb.iterdir() if p.is_dir())
        if existing:
            return existing[0]
    return tb / name

"""The training engine, pure: state, update step, epochs as ``lax.scan``s of update steps.

Convention:

* ``TrainState(params, opt_state, step, key, net_state, rule_state)`` is a pytree. ``key`` is
  the run's *training* key and never changes: every draw derives from it by ``fold_in`` with a
  stream id and a counter (shuffling: ``(SHUFFLE, epoch)``; dropout: ``(DROPOUT, step)``), so no
  key is ever reused and a resumed run redraws exactly what an uninterrupted run would have
  drawn.
* Gradients come from ``bpjax.grad.value_and_grad(mode=grad_mode)``; the step never knows which.
  A learning rule of ``bpjax.credit`` (``grad_mode="feedback_alignment"``, ...) gets its state
  (feedback weights) from ``init_state``, drawn from ``fold_in(key, FEEDBACK)``; it rides in
  ``TrainState.rule_state``, which the optimizer, weight decay and gradient checks never see.
* An epoch shuffles the training set on device (``epoch_order``) and scans the update step over
  ``n // batch_size`` minibatches gathered by index. The ``n % batch_size`` examples left over
  by that epoch's permutation are not used *in that epoch* (they differ from epoch to epoch), so
  every step has the same shape and the scan compiles once. ``make_epoch`` scans a whole epoch
  in one call; ``make_chunk`` scans a slice of it (``chunk_plan``), so a caller can report
  progress and stop between chunks, and the same steps give the same state either way.
* Optimizers are optax ``GradientTransformation``s, used as they are (``bpjax.optim``).
  Evaluation and target encoding are in ``bpjax.evaluate``; both are re-exported here.

The engine is kept in private modules: ``bpjax._train_step`` holds the state and the update
step (``TrainState``, ``init_state``, ``make_step``, ...), ``bpjax._train_epochs`` the epochs
(``epoch_order``, ``chunk_plan``, ``make_epoch``, ``make_chunk``); the learning rule's wiring
is in ``bpjax._rule_wiring``.
"""

from bpjax._rule_wiring import RULE_OPTIONS, check_rule
from bpjax._train_epochs import chunk_plan, epoch_order, make_chunk, make_epoch
from bpjax._train_step import (
    DROPOUT,
    FEEDBACK,
    SHUFFLE,
    TrainState,
    init_state,
    layer_stats,
    make_step,
    output_shape,
    updates_applied,
)
from bpjax._train_step import INIT as INIT  # not public, but the tests draw from its stream
from bpjax.evaluate import (
    encode_targets,
    make_eval,
    pad_batches,
    single_output_binary,
    target_mismatch,
)
from bpjax.optim import WEIGHT_DECAY_MASKS, WEIGHT_DECAY_MODES, make_optimizer, weights_mask

__all__ = [
    "DROPOUT",
    "FEEDBACK",
    "RULE_OPTIONS",
    "SHUFFLE",
    "WEIGHT_DECAY_MASKS",
    "WEIGHT_DECAY_MODES",
    "TrainState",
    "check_rule",
    "chunk_plan",
    "encode_targets",
    "epoch_order",
    "init_state",
    "layer_stats",
    "make_chunk",
    "make_epoch",
    "make_eval",
    "make_optimizer",
    "make_step",
    "output_shape",
    "pad_batches",
    "single_output_binary",
    "target_mismatch",
    "updates_applied",
    "weights_mask",
]

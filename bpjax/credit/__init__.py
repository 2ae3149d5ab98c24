"""Learning rules other than backprop, as transforms of a network's backward pass.

The convention, written once (``bpjax.layers``, "Other learning rules"): a rule changes what a
layer sends back as ``dx``, or what each layer receives as ``dy``, never how a layer turns its
``dy`` into its own weight gradient. So a layer written tomorrow gets every rule without knowing
the rules exist, as long as its weight is the parameter leaf named ``"w"`` and enters linearly
(``dense``, ``conv2d``: their backward's ``dw`` reads ``x`` and ``dy``, not ``w``).

* **Feedback rules** (``feedback_alignment``, ``sign_symmetry``, ``kolen_pollack``) run the
  network's OWN backward once, with params in which every leaf named ``"w"`` is replaced by its
  feedback (``feedback_params``) and every other leaf (biases, normalization scales) is the
  real one. For a layer linear in ``w`` only the ``dx`` it sends back changes (``dy @ B.T`` for
  ``dense``, the transposed convolution with ``B`` for ``conv2d``); its weight gradient is its
  own. The substitution is tree-wide, so these rules pass through residual and parallel blocks
  and through layers with state. One backward, no extra cost.
* **Direct feedback alignment** (``direct_feedback_alignment``) sends the output error to each
  hidden layer of a ``serial`` network through a fixed random matrix; see ``init_rule_state``
  and ``bpjax.grad.value_and_grad`` for exactly where it is injected.
* **Rule state** is not a parameter: the optimizer, weight decay and gradient checks never see
  it; it is drawn from a key (``init_rule_state``) and, for Kolen-Pollack, updated after the
  optimizer (``update_rule_state``). It is a pytree of arrays a checkpoint saves: for the
  feedback rules it has the params' structure with each ``"w"`` leaf replaced by its feedback
  matrix and every other leaf by ``()``; for DFA see ``init_rule_state``; ``()`` for backprop
  and sign symmetry (which reads the current ``w`` at every step). The trainer holds
  Kolen-Pollack's ``B`` as a ``KolenPollackState`` (``B = w + scale * offset``: ``w - B`` only
  decays, so a step updates one scalar instead of a second weight-sized matrix per layer).
* **The signal** (``alignment``): per layer, the angle in degrees between a rule's update and
  the true gradient, and between each ``w`` and its feedback.

Gradients from a rule come from ``bpjax.grad.value_and_grad(net, loss, mode=<rule>)``.
"""

from bpjax.credit._angles import alignment, angle
from bpjax.credit._common import (
    RULES,
    KolenPollackState,
    feedback_params,
    kolen_pollack_feedback,
    kolen_pollack_state,
)
from bpjax.credit._rules import rule_value_and_grad  # noqa: F401  (used by bpjax.grad)
from bpjax.credit._state import (
    DISTRIBUTIONS,
    KP_DECAY,
    SCALES,
    init_rule_state,
    kolen_pollack_update,
    update_rule_state,
)

__all__ = [
    "DISTRIBUTIONS",
    "KP_DECAY",
    "KolenPollackState",
    "RULES",
    "SCALES",
    "alignment",
    "angle",
    "feedback_params",
    "init_rule_state",
    "kolen_pollack_feedback",
    "kolen_pollack_state",
    "kolen_pollack_update",
    "update_rule_state",
]

"""Atomic checkpoints of a training-state pytree, plus JSON metadata, written by orbax-checkpoint.

Convention: a checkpoint is ONE directory, written by orbax's ``Checkpointer`` (``save``) or
``CheckpointManager`` (``CheckpointManager.save``), which lay it out the same way::

    ckpt_000003/
      arrays/               orbax PyTree item: {"leaf_00000": array, ...}, the tree's leaves in
                            jax.tree_util flattening order (empty leaves are not stored)
      meta/bpjax.json       {"format": "bpjax.checkpoint", "version": 2,
                             "treedef": "PyTreeDef(...)",          # str() of the tree's treedef
                             "leaves": [{"path": ".params[0]['w']", "dtype": "float32",
                                         "shape": [3, 4]}, ...],
                             "metadata": {...}}                    # the caller's (epoch, ...)
      _CHECKPOINT_METADATA  orbax's own record of the checkpoint

``meta/bpjax.json`` is strict JSON (NaN and infinities are written as ``{"$float": "nan"}``) and
is read without touching the arrays (``load_metadata``). Typed PRNG keys (``jax.random.key``)
are stored as their ``jax.random.key_data`` and re-wrapped on restore (their leaf record also has
``"key_impl"``); raw ``uint32`` keys (``jax.random.PRNGKey``), ``bfloat16`` and every other
dtype are stored as they are, so every restored array is bit-identical to the saved one.

Atomicity: orbax writes a checkpoint into ``<name>.orbax-checkpoint-tmp-<time>`` next to its
final name and renames that directory onto the final name only once every item is written.
The rename is atomic, and orbax lists only finished names as checkpoints, so a crash or a
``kill -9`` mid-save never leaves a partial checkpoint under a checkpoint's name: the temporary
directory is ignored, and deleted by the next ``CheckpointManager.save``. Saves are synchronous:
when ``save`` returns, the checkpoint is complete. orbax does not fsync before it renames, so a
power failure (not a process crash) can still leave the newest checkpoint damaged; a resume
then passes over it (``CheckpointManager.restore_latest``).

``restore`` loads into the structure of a template pytree (e.g. a freshly initialized state or
``jax.eval_shape`` of one), onto the template's shardings, and refuses, naming the leaf, any
checkpoint whose structure, shapes or dtypes differ, before any array is read. A checkpoint that
cannot be read raises ``UnreadableCheckpoint`` (a ValueError naming it), never an error from
orbax's internals.

Several processes: orbax coordinates them. Every process calls the same function with its
part of the same global arrays; each writes its own shards, process 0 writes the metadata (and
renames and deletes), and barriers keep them in step. Nothing is needed for one process.

The former format, one ``.npz`` file per checkpoint (``ckpt_000003.npz``), is still read by
``load_metadata``, ``restore`` and ``CheckpointManager``: a run checkpointed by an older bpjax
resumes, and continues in the new format.

orbax is imported on first use: importing it takes about 0.4 s on top of jax (measured 0.37 s
and 0.45 s on the 2-core development machine), which commands that never checkpoint don't pay.
"""

from bpjax.checkpoint._format import load_metadata, restore, save
from bpjax.checkpoint._manager import CheckpointManager, DamagedCheckpointWarning
from bpjax.checkpoint._records import UnreadableCheckpoint
from bpjax.checkpoint._records import _to_json as _to_json  # for bpjax.trainer

__all__ = [
    "CheckpointManager",
    "DamagedCheckpointWarning",
    "UnreadableCheckpoint",
    "load_metadata",
    "restore",
    "save",
]

"""One training job over several processes (hosts), on jax's multi-process runtime.

Convention: every process runs the same program on the same data with the same settings; jax
makes one global mesh of all their devices, and each process computes on its own devices' share
of every batch. What the processes must do alike, they do alike: every collective (a jitted
function of global arrays, a checkpoint) is called by every process at the same point, and every
decision (stop early, stop on a diverged loss, stop on an interrupt) is taken from values that
``agree`` made the same everywhere. Process 0 alone writes the run's files (metrics, TensorBoard)
and speaks; checkpoints are written by all of them together (``bpjax.checkpoint``).

- ``initialize``: join the job, from arguments, ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/
  ``JAX_PROCESS_ID``, or the cluster (SLURM, Open MPI, Cloud TPU pods); gloo collectives on CPU;
  heartbeat and start-up timeouts; one error line where jax would abort.
- ``mesh_devices``: the devices of the data-parallel mesh (``devices`` counts per process).
- ``host_copy``, ``agree``, ``all_texts``, ``check_same`` (``JobMismatch``),
  ``shared_directory``: results on the host without ``device_get`` of arrays this process can't
  address, process 0's values for all, and checks that the processes run the same job in one
  shared directory; ``announce_failure`` and ``ProcessFailed``: one process's failure to start,
  told to the others.
- ``deferred_interrupts``, ``process_lost``, ``ProcessLost``, ``exit_now``: an interrupt stops
  every process at the same chunk; a lost process stops the others with a message naming it.

In one process every function here is trivial (``agree`` returns its input, ``all_texts`` a
list of one), so code written for several processes runs unchanged in one.
"""

from bpjax.distributed._agree import (
    JobMismatch,
    ProcessFailed,
    agree,
    all_texts,
    announce_failure,
    check_same,
    host_copy,
    is_primary,
    shared_directory,
)
from bpjax.distributed._faults import (
    EXIT_LOST,
    Interrupted,
    Interrupts,
    ProcessLost,
    deferred_interrupts,
    exit_now,
    process_lost,
)
from bpjax.distributed._mesh import mesh_devices
from bpjax.distributed._start import (
    ENV_COORDINATOR,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    EXIT_NOT_STARTED,
    Cluster,
    cluster,
    initialize,
    resolve,
)

__all__ = [
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "EXIT_LOST",
    "Interrupted",
    "EXIT_NOT_STARTED",
    "Cluster",
    "Interrupts",
    "JobMismatch",
    "ProcessFailed",
    "ProcessLost",
    "agree",
    "all_texts",
    "announce_failure",
    "check_same",
    "cluster",
    "deferred_interrupts",
    "exit_now",
    "host_copy",
    "initialize",
    "is_primary",
    "mesh_devices",
    "process_lost",
    "resolve",
    "shared_directory",
]

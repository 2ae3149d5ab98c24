"""Joining a job of several processes: settings from arguments or the environment, checked
before jax's runtime starts, and jax's failures at start-up turned into one clear error."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
from jax._src import distributed as jax_distributed

from bpjax.distributed._service import (
    ServiceProcess,
    _port_in_use,
    start_service,
    wait_for_lingering_service,
)

# What jax.distributed.initialize reads itself (the coordinator), and what it does not (the count
# and the id), under the names the issue and jax's own documentation use.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

# Exit status of a process that gives up because the job could not start (every process did not
# join in time): the settings' fault as often as not, as train.py's exit 2 for a bad setting.
EXIT_NOT_STARTED = 2


class Cluster(NamedTuple):
    """The job a process has joined (``initialize``'s result).

    Attributes:
        process_id: this process's index, 0 .. num_processes - 1 (process 0 hosts the
            coordinator and writes the run's files).
        num_processes: processes in the job.
        coordinator_address: ``host:port`` of the coordinator, or None where jax detected the
            cluster itself (SLURM, Open MPI, a Cloud TPU pod).
        initialization_timeout: seconds every process had to join; also the bound on bpjax's
            own start-up exchanges (``bpjax.distributed.all_texts``).
        heartbeat_timeout: seconds without a heartbeat after which jax's runtime declares a
            process dead and stops the others.
    """

    process_id: int
    num_processes: int
    coordinator_address: str | None
    initialization_timeout: int
    heartbeat_timeout: int


_joined: list[Cluster] = []


def cluster() -> Cluster:
    """The job this process belongs to: ``initialize``'s settings, or, for a process started
    without it (one process, or ``jax.distributed.initialize`` called directly), jax's count and
    index with jax's default timeouts (300 s to start, 100 s of heartbeat)."""
    if _joined:
        return _joined[0]
    return Cluster(jax.process_index(), jax.process_count(), None, 300, 100)


def _int_setting(value: Any, name: str, env: str, environ: Mapping[str, str]) -> tuple[Any, str]:
    """An integer setting and where it came from: the argument, else the environment."""
    if value is not None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value, name
    text = environ.get(env)
    if text is None or not text.strip():
        return None, name
    try:
        return int(text), env
    except ValueError:
        raise ValueError(f"{env}={text!r} is not an integer") from None


def _check_address(address: str, source: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{source}={address!r} is not host:port (e.g. 10.0.0.1:1234, a port between 1 and "
            f"65535 on the host of process 0)"
        )


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    prefix: str = "",
) -> tuple[str | None, int | None, int | None]:
    """The settings a process joins a job with: each argument given, else its environment
    variable (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), else None,
    left for jax to detect from the cluster (SLURM, Open MPI, a Cloud TPU pod).

    Args:
        coordinator_address: ``host:port`` where process 0 serves the coordinator.
        num_processes: processes in the job (>= 1).
        process_id: this process's index, 0 .. num_processes - 1.
        environ: the environment to read (``os.environ`` if None).
        prefix: put before the settings' names in errors (e.g. ``"trainer."``).

    Returns:
        ``(coordinator_address, num_processes, process_id)``, None where still unknown.

    Raises:
        ValueError: a malformed address, a count < 1, or an id out of range, naming the setting
            or the environment variable it came from.
    """
    environ = os.environ if environ is None else environ
    source = f"{prefix}coordinator_address"
    if coordinator_address is None and environ.get(ENV_COORDINATOR, "").strip():
        coordinator_address, source = environ[ENV_COORDINATOR].strip(), ENV_COORDINATOR
    if coordinator_address is not None:
        if not isinstance(coordinator_address, str):
            raise ValueError(f"{source} must be host:port, got {coordinator_address!r}")
        _check_address(coordinator_address, source)
    count, count_from = _int_setting(
        num_processes, f"{prefix}num_processes", ENV_NUM_PROCESSES, environ
    )
    index, index_from = _int_setting(process_id, f"{prefix}process_id", ENV_PROCESS_ID, environ)
    if count is not None and count < 1:
        raise ValueError(f"{count_from}={count}: a job needs at least 1 process")
    if index is not None and index < 0:
        raise ValueError(f"{index_from}={index}: process ids start at 0")
    if count is not None and index is not None and index >= count:
        raise ValueError(
            f"{index_from}={index} is out of range for {count_from}={count} (ids 0..{count - 1})"
        )
    return coordinator_address, count, index


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except OSError:
        return False


def _give_up(message: str) -> None:
    """Ends the process with ``message``: jax would abort it a moment later with a stack trace."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_NOT_STARTED)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 60,
) -> Cluster:
    """Joins this process to a job of several (``jax.distributed.initialize``), once.

    Settings are ``resolve``'s: arguments, else ``JAX_*`` environment variables, else jax's
    detection of the cluster (SLURM, Open MPI, Cloud TPU pods). CPU collectives go through gloo,
    so a job runs on CPUs alone (several processes on one machine, for instance). A process that
    dies is detected by jax's coordination service after ``heartbeat_timeout`` seconds without
    its heartbeat; the service then stops every other process (``bpjax.trainer.fit`` names the
    lost process sooner where a collective fails first: see ``ProcessLost``). Processes that
    end normally wait up to ``heartbeat_timeout`` seconds for each other at exit.

    On process 0, jax's coordination service runs in a small process of its own
    (``bpjax.distributed._service``), not inside process 0 as jax would run it: losing process
    0 is then named like losing any other (``ProcessLost``), instead of aborting every other
    process at once. It ends with process 0 (a few seconds later where process 0 was lost).

    Where jax itself would abort the process with a stack trace, after ``initialization_timeout``
    seconds in which not every process joined (a coordinator that nobody serves, a wrong
    address, a process count that is too high, a process that never started), this process
    prints one ``error:`` line instead, just before, and exits with status 2.

    jax's preemption service is turned off (``jax_enable_preemption_service``): its native
    SIGTERM handler would replace the process's own, and bpjax agrees on interrupts itself
    (``agree``'s ``stop``, ``deferred_interrupts``); the SIGTERM handler in place before stays.

    Must run before anything else uses jax's devices. Calling it again returns the job joined.

    Args:
        coordinator_address, num_processes, process_id: as ``resolve``.
        initialization_timeout: seconds (>= 1) for every process to join.
        heartbeat_timeout: seconds (>= 1) of silence after which a process is declared dead.

    Returns:
        The ``Cluster`` joined.

    Raises:
        ValueError: bad settings (``resolve``), too little to go on (no cluster detected and
            no count or id given), the coordinator's port in use on process 0's host, or jax's
            devices already in use (initialize must come first).
    """
    if _joined:
        return _joined[0]
    for name, value in (
        ("initialization_timeout", initialization_timeout),
        ("heartbeat_timeout", heartbeat_timeout),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a whole number of seconds >= 1, got {value!r}")
    address, count, index = resolve(coordinator_address, num_processes, process_id)
    bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS")
    if index == 0 and address is not None and bind is None:
        wait_for_lingering_service(address)  # a job started again just after its end
        if _port_in_use(address):
            raise ValueError(_PORT_IN_USE.format(address=address))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # jax's preemption service would take SIGTERM from the process's own handler (a native one
    # that only marks a sync point nobody reads): a SIGTERM to a job that had joined but not yet
    # started training was lost, and the job trained to its end. bpjax agrees on interrupts
    # itself (agree's stop), so the service stays off and the handler in place is put back.
    jax.config.update("jax_enable_preemption_service", False)
    on_main_thread = threading.current_thread() is threading.main_thread()
    sigterm_handler = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    watchdog = threading.Timer(
        max(0.5, initialization_timeout - 1.0),
        lambda: _give_up(_not_joined(index, address, count, initialization_timeout)),
    )
    watchdog.daemon = True
    watchdog.start()
    try:
        with _service_in_its_own_process():
            jax.distributed.initialize(
                coordinator_address=address,
                num_processes=count,
                process_id=index,
                initialization_timeout=initialization_timeout,
                heartbeat_timeout_seconds=heartbeat_timeout,
                shutdown_timeout_seconds=heartbeat_timeout,
            )
    except (ValueError, RuntimeError) as e:
        raise ValueError(_start_error(e, address, count, index)) from None
    finally:
        watchdog.cancel()
        if sigterm_handler is not None:
            signal.signal(signal.SIGTERM, sigterm_handler)
    joined = Cluster(
        jax.process_index(), jax.process_count(), address, initialization_timeout, heartbeat_timeout
    )
    _joined.append(joined)
    return joined


@contextlib.contextmanager
def _service_in_its_own_process() -> Iterator[None]:
    """Has ``jax.distributed.initialize`` serve process 0's coordination service from a process
    of its own (``bpjax.distributed._service``: so that losing process 0 stops the others with
    bpjax's line, not jax's abort), by putting ``start_service`` in the place of the jaxlib
    function it calls; jax's own where its internals differ from those this was written for
    (jax 0.10)."""
    internals = getattr(jax_distributed, "_jax", None)
    original = getattr(internals, "get_distributed_runtime_service", None)
    if original is None or not hasattr(jax_distributed, "global_state"):
        yield
        return
    internals.get_distributed_runtime_service = start_service
    try:
        yield
    except BaseException:
        # The client did not join: stop the service process that was started for it.
        service = jax_distributed.global_state.service
        if isinstance(service, ServiceProcess):
            service.shutdown()
            jax_distributed.global_state.service = None
        raise
    finally:
        internals.get_distributed_runtime_service = original


def _not_joined(index: int | None, address: str | None, count: int | None, timeout: int) -> str:
    where = address or "the address the cluster gave"
    expected = f"{count} processes" if count is not None else "every process"
    if address is not None and not _reachable(address):
        cause = f"nothing answers at {address}: is process 0 running there, on this address?"
    else:
        cause = (
            f"the coordinator at {where} is up, but not all {expected} joined: is every process "
            f"started, with the same address and process count, and ids 0..{(count or 0) - 1}?"
        )
    label = "" if index is None else f"[process {index}] "
    return (
        f"{label}error: the job did not start: {expected} did not all join within {timeout} s "
        f"(initialization_timeout); {cause}"
    )


_PORT_IN_USE = (
    "process 0 could not serve the coordinator at {address}: its port is in use on this host "
    "(choose another port for every process of this job; if another job's coordinator serves "
    "it, stop this job's other processes now: joining that coordinator ends that job)"
)


def _start_error(
    error: BaseException, address: str | None, count: int | None, index: int | None
) -> str:
    text = str(error)
    if "Failed to start RPC server" in text:
        return _PORT_IN_USE.format(address=address)
    if "must be called before" in text:
        return f"{text.rstrip('.')} (start the job before anything else touches jax's devices)"
    if address is None or count is None or index is None:
        missing = [
            name
            for name, value in (
                (f"coordinator_address ({ENV_COORDINATOR})", address),
                (f"num_processes ({ENV_NUM_PROCESSES})", count),
                (f"process_id ({ENV_PROCESS_ID})", index),
            )
            if value is None
        ]
        return (
            f"no cluster found (SLURM, Open MPI, a Cloud TPU pod) to supply "
            f"{', '.join(missing)}: set them ({text})"
        )
    return f"could not join the job at {address}: {text}"

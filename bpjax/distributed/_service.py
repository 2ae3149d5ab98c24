"""jax's coordination service in a small process of its own, beside process 0.

jax serves its coordination service (the job's membership, heartbeats, key-value store) from
inside process 0. When process 0 dies (kill -9, a crash), the service dies with it, and every
other process's jax client aborts at once (SIGABRT, with a C++ stack trace) before bpjax can
name the lost process. Served from a process of its own, started by process 0's ``initialize``,
the service outlives process 0 long enough for the survivors to find out who is gone
(``bpjax.distributed.process_lost``) and stop with bpjax's one line and exit status 75, as
they do when any other process is lost.

The service process prints ``ready`` once it listens (or one ``error:`` line, and exits 1),
and stops when process 0 tells it to (jax's shutdown at process 0's exit calls
``ServiceProcess.shutdown``) or, when process 0 is gone without telling it, ``linger``
seconds later. It ignores SIGINT and SIGTERM: a Ctrl-C in the terminal or a scheduler's
SIGTERM reaches every process of the job, which then stop together through the service.
While it lingers it names itself in a file (``pid_file``), so that process 0 of a job started
again at once waits for the port instead of refusing it as taken.

Not covered: process 0's host going down takes this process with it (the survivors' jax
clients then abort as before).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bpjax._atomic import atomic_write_text

# Seconds a survivor waits for the others to say they are alive (bpjax.distributed.process_lost).
_MAX_ALIVE_WAIT = 10.0
# Seconds the service outlives process 0 beyond that wait: a survivor's failed collective may
# come a little after process 0's end (the survivor was between two collectives).
_LINGER_MARGIN = 5.0
# Seconds process 0 gives its service process to start (import jax, listen).
_START_TIMEOUT = 120.0


def alive_wait(heartbeat_timeout: float) -> float:
    """Seconds a surviving process waits for the others' word that they are alive, once a
    collective failed: a third of the heartbeat timeout (so that it ends before jax's own
    verdict, which aborts), between 1 and 10."""
    return min(_MAX_ALIVE_WAIT, max(1.0, heartbeat_timeout / 3))


def pid_file(port: int | str) -> Path:
    """The file in which a service process that outlives its process 0 names itself."""
    return Path(tempfile.gettempdir()) / f"bpjax-coordinator-{port}.pid"


def _port(address: str) -> str:
    return address.rpartition(":")[2]


class ServiceProcess:
    """What jax keeps as process 0's coordination service (``jax.distributed``'s
    ``global_state.service``): the process serving it. ``shutdown()``, which jax calls at
    process 0's exit (``jax.distributed.shutdown``), stops it."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    def shutdown(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.process.stdin.write(b"stop\n")
                self.process.stdin.flush()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _close_pipes(self.process)


def _close_pipes(process: subprocess.Popen) -> None:
    for pipe in (process.stdin, process.stdout):
        with contextlib.suppress(OSError):
            pipe.close()


def _port_in_use(address: str) -> bool:
    """Whether another program listens on ``address``'s port here, where process 0 is to serve
    the coordinator on every interface (as jax binds it, address reuse allowed)."""
    port = int(_port(address))
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
                return False
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
    return False


def start_service(address: str, num_nodes: int, **options: Any) -> ServiceProcess:
    """Starts jax's coordination service at ``address`` in a process of its own; jaxlib's
    ``get_distributed_runtime_service`` signature (``heartbeat_timeout``,
    ``shutdown_timeout``, ``cluster_register_timeout``, ``recoverable``), so that
    ``initialize`` can put it in that function's place for ``jax.distributed.initialize``.

    Raises:
        RuntimeError: the service did not start (jax's message: a port in use says "Failed to
            start RPC server"), or not within 120 s.
    """
    if _port_in_use(address):  # jaxlib's service then fails, or, now and then, segfaults
        raise RuntimeError(f"Failed to start RPC server at {address}: its port is in use")
    linger = alive_wait(options.get("heartbeat_timeout") or 100) + _LINGER_MARGIN
    settings = {"address": address, "num_nodes": num_nodes, "options": options, "linger": linger}
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVE, json.dumps(settings)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # jax's own log lines; the job's processes say what matters
        start_new_session=True,  # a Ctrl-C in the terminal is for the job's processes
    )
    ready, _, _ = select.select([process.stdout], [], [], _START_TIMEOUT)
    line = process.stdout.readline().decode(errors="replace").strip() if ready else ""
    if line != "ready":
        ended = process.poll() if ready else None
        process.kill()
        process.wait()
        _close_pipes(process)
        why = f"ended (status {ended})" if ended is not None else "did not listen in time"
        raise RuntimeError(
            line.removeprefix("error: ")
            or f"the coordination service's process {why}, at {address}"
        )
    return ServiceProcess(process)


def wait_for_lingering_service(address: str) -> None:
    """Waits for a service process of an earlier job on ``address``'s port, still lingering
    after its process 0 ended, to end (at most its linger time)."""
    path = pid_file(_port(address))
    try:
        pid, until = (float(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return
    while time.time() < until + 1.0:
        try:
            os.kill(int(pid), 0)
        except OSError:  # gone (or not ours to ask about: then not ours to wait for)
            return
        time.sleep(0.1)


# The service process's program (not ``-m`` this module: bpjax.distributed imports it first).
_SERVE = (
    "import json, sys; from bpjax.distributed._service import _serve; "
    "sys.exit(_serve(json.loads(sys.argv[1])))"
)


def _serve(settings: dict[str, Any]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    from jax._src.lib import _jax  # here: importing jax takes a second, in this process only

    try:
        service = _jax.get_distributed_runtime_service(
            settings["address"], settings["num_nodes"], **settings["options"]
        )
    except Exception as e:  # jax's error, for process 0 to report
        print(f"error: {' '.join(str(e).split())}", flush=True)
        return 1
    print("ready", flush=True)
    told = sys.stdin.readline()  # "stop" from process 0, or nothing: process 0 is gone
    path = pid_file(_port(settings["address"]))
    if told.strip() != "stop":
        with contextlib.suppress(OSError):
            atomic_write_text(path, f"{os.getpid()} {time.time() + settings['linger']}\n")
        time.sleep(settings["linger"])
    service.shutdown()
    with contextlib.suppress(OSError):
        path.unlink()
    return 0

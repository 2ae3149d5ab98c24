"""bpjax.distributed, and training as several processes (``fit`` and ``experiments/train.py``).

In one process every function is checked to be trivial. Several processes are real ones, on
127.0.0.1 with a free port each and CPU devices (gloo collectives), started and killed by
``test_checkpoint.processes`` with a timeout on every wait: the library's exchanges (2 processes
x 2 devices), the script's runs (1 x 1, 2 x 1 and 2 x 2 give the same result), an interrupt and a
resume (bit-identical), a process killed with -9, and start-ups that fail (one error line).
"""

import json
import os
import pathlib
import re
import signal
import socket
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import once_per_session, xla_flags
from test_checkpoint import _free_port, processes
from test_experiments import SCRIPT, compose, train_script

from bpjax import checkpoint, distributed
from bpjax.distributed import _service, _start
from bpjax.reporting import Console

# Each public name, and the test that checks it.
TESTED = {
    "ENV_COORDINATOR": "test_resolve",
    "ENV_NUM_PROCESSES": "test_resolve",
    "ENV_PROCESS_ID": "test_resolve",
    "EXIT_LOST": "test_kill_9_stops_the_other_process",
    "EXIT_NOT_STARTED": "test_unreachable_coordinator_is_one_error_line",
    "Cluster": "test_one_process_is_trivial",
    "Interrupted": "test_interrupts_are_held_in_one_process_too",
    "Interrupts": "test_one_process_is_trivial",
    "JobMismatch": "test_library_across_processes",
    "ProcessFailed": "test_library_across_processes",
    "ProcessLost": "test_kill_9_stops_the_other_process",
    "agree": "test_library_across_processes",
    "all_texts": "test_library_across_processes",
    "announce_failure": "test_library_across_processes",
    "check_same": "test_library_across_processes",
    "cluster": "test_one_process_is_trivial",
    "deferred_interrupts": "test_sigterm_then_resume_is_bit_identical",
    "exit_now": "test_kill_9_stops_the_other_process",
    "host_copy": "test_library_across_processes",
    "initialize": "test_library_across_processes",
    "is_primary": "test_one_process_is_trivial",
    "mesh_devices": "test_library_across_processes",
    "process_lost": "test_kill_9_stops_the_other_process",
    "resolve": "test_resolve",
    "shared_directory": "test_library_across_processes",
}


def test_public_names_are_tested():
    assert set(TESTED) == set(distributed.__all__)
    names = {name for name, value in globals().items() if name.startswith("test_")}
    assert set(TESTED.values()) <= names


# --------------------------------------------------------------------------------------------
# Settings and one process


@pytest.mark.parametrize(
    ("arguments", "environ", "expected"),
    [
        ((None, None, None), {}, (None, None, None)),  # left to jax's cluster detection
        (
            (None, None, None),
            {
                "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                "JAX_NUM_PROCESSES": "4",
                "JAX_PROCESS_ID": "3",
            },
            ("10.0.0.1:1234", 4, 3),
        ),
        (("h:9", 2, 0), {"JAX_COORDINATOR_ADDRESS": "x:1", "JAX_PROCESS_ID": "5"}, ("h:9", 2, 0)),
        ((None, 2, None), {"JAX_PROCESS_ID": "1"}, (None, 2, 1)),
    ],
)
def test_resolve(arguments, environ, expected):
    assert distributed.resolve(*arguments, environ=environ) == expected


@pytest.mark.parametrize(
    ("arguments", "environ", "message"),
    [
        (("10.0.0.1", 2, 0), {}, "trainer.coordinator_address='10.0.0.1' is not host:port"),
        ((":80", 2, 0), {}, "is not host:port"),
        (("h:0", 2, 0), {}, "is not host:port"),
        (("h:70000", 2, 0), {}, "is not host:port"),
        ((None, 2, 2), {}, r"trainer.process_id=2 is out of range for trainer.num_processes=2 "
                           r"\(ids 0..1\)"),
        ((None, 0, None), {}, "trainer.num_processes=0: a job needs at least 1 process"),
        ((None, None, -1), {}, "trainer.process_id=-1: process ids start at 0"),
        ((None, 2, None), {"JAX_PROCESS_ID": "7"}, "JAX_PROCESS_ID=7 is out of range"),
        ((None, None, None), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an"),
        ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h"}, "JAX_COORDINATOR_ADDRESS='h' is"),
        ((None, 1.5, None), {}, "trainer.num_processes must be an integer"),
        ((None, None, True), {}, "trainer.process_id must be an integer"),
    ],
)  # fmt: skip
def test_resolve_refuses_bad_settings(arguments, environ, message):
    with pytest.raises(ValueError, match=message):
        distributed.resolve(*arguments, environ=environ, prefix="trainer.")


@pytest.mark.parametrize(
    "timeouts",
    [{"initialization_timeout": 0}, {"heartbeat_timeout": 2.5}, {"heartbeat_timeout": -1}],
)
def test_initialize_refuses_bad_timeouts_before_starting(timeouts):
    with pytest.raises(ValueError, match="whole number of seconds >= 1"):
        distributed.initialize("127.0.0.1:1", 2, 1, **timeouts)
    assert not jax.distributed.is_initialized()


def test_interrupts_are_held_in_one_process_too():
    # One process holds a signal too (bpjax.fit checks it where its state and count of steps
    # agree); a second interrupts at once; the handlers are put back; SIG_DFL/SIG_IGN are left.
    def interrupt(signum, frame):
        raise distributed.Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with distributed.deferred_interrupts() as interrupts:
            assert isinstance(interrupts, distributed.Interrupts) and not interrupts.requested
            signal.raise_signal(signal.SIGTERM)
            assert interrupts.requested == signal.SIGTERM  # held, not raised
            with pytest.raises(distributed.Interrupted) as second:
                signal.raise_signal(signal.SIGTERM)
            assert (second.value.signum, second.value.own) == (signal.SIGTERM, True)
            assert str(second.value) == f"signal {signal.SIGTERM}"
        assert signal.getsignal(signal.SIGTERM) is interrupt
        # Nested (a job's start-up, then fit): the inner context starts with the held signal,
        # and stops at its first check (a SIGTERM while a 2-process job started up was lost).
        with distributed.deferred_interrupts() as start_up:
            signal.raise_signal(signal.SIGTERM)
            assert start_up.requested == signal.SIGTERM
            with distributed.deferred_interrupts() as fitting:
                assert fitting.requested == signal.SIGTERM
                with pytest.raises(KeyboardInterrupt, match="signal"):  # a second: at once
                    signal.raise_signal(signal.SIGTERM)
            assert signal.getsignal(signal.SIGTERM) is not interrupt  # the outer one holds
        with distributed.deferred_interrupts() as after:
            assert not after.requested  # nothing held once the outer context has ended
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with distributed.deferred_interrupts():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_one_process_is_trivial(tmp_path):
    assert distributed.cluster() == distributed.Cluster(0, 1, None, 300, 100)
    assert distributed.is_primary()
    x = jnp.arange(4.0)
    tree = {"a": x, "b": (np.float32(2.0), 3)}
    copied = distributed.host_copy(tree)
    assert isinstance(copied["a"], np.ndarray) and copied["b"][1] == 3
    np.testing.assert_array_equal(copied["a"], [0, 1, 2, 3])
    agreed, stop = distributed.agree(copied, stop=True)
    assert stop is True and agreed["b"][0] == 2.0
    assert distributed.agree({}, stop=15)[1] == 15 and distributed.agree({})[1] is False
    with pytest.raises(ValueError, match="stop must be a bool or a signal number 1-255"):
        distributed.agree({}, stop=256)
    assert distributed.agree({"x": np.zeros(0)})[0]["x"].shape == (0,)
    assert distributed.all_texts("t", "only") == ["only"]
    distributed.check_same("same", {"a": 1})
    assert distributed.shared_directory(tmp_path / "run") == tmp_path / "run"
    assert (tmp_path / "run").is_dir() and not list((tmp_path / "run").iterdir())
    distributed.announce_failure("nobody listens")  # no job: nothing to tell
    assert distributed.process_lost(RuntimeError("Gloo AllReduce failed: peer")) is None
    assert distributed.mesh_devices(1) == jax.devices()[:1]
    assert distributed.mesh_devices("all") == jax.devices()
    for bad in (0, len(jax.devices()) + 1, "some", True):
        with pytest.raises(ValueError, match="devices"):
            distributed.mesh_devices(bad)


class _RacingClient:
    """A coordination-service client for ``all_texts``'s race: the first read of the exchange
    misses process 1's post; by the time the failures are read, process 1 has posted and then
    announced a failure of something later."""

    def __init__(self, misses: int):
        self.reads, self.misses = 0, misses

    def key_value_set(self, key, value):
        pass

    def key_value_dir_get(self, directory):
        if directory.startswith("bpjax/failed/"):
            return [("bpjax/failed/1", "a later step failed")]
        self.reads += 1
        posts = [(directory + "0", "from 0"), (directory + "1", "from 1")]
        return posts[:1] if self.reads <= self.misses else posts


def test_all_texts_returns_an_exchange_completed_before_a_failure(monkeypatch):
    from bpjax.distributed import _agree

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    client = _RacingClient(misses=1)
    monkeypatch.setattr(_agree, "_client", lambda: client)
    assert distributed.all_texts("race", "from 0", timeout=5) == ["from 0", "from 1"]
    assert client.reads == 2
    client = _RacingClient(misses=2)  # still incomplete when read again: the failure is raised
    with pytest.raises(distributed.ProcessFailed, match="process 1 failed: a later step"):
        distributed.all_texts("race", "from 0", timeout=5)


def test_a_quiet_console_says_nothing(capsys):
    console = Console("[x] ", progress=True, quiet=True)
    console.start(10)
    console.say("a line")
    console.say("an error", err=True)
    assert console.bar is None
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.process_id=1"], "trainer.process_id=1 but trainer.distributed=false"),
        (
            ["trainer.distributed=true", "trainer.num_processes=2", "trainer.process_id=2"],
            "trainer.process_id=2 is out of range for trainer.num_processes=2",
        ),
        (
            ["trainer.distributed=true", "trainer.coordinator_address=nohost"],
            "trainer.coordinator_address='nohost' is not host:port",
        ),
        (["trainer.heartbeat_timeout=0"], "trainer.heartbeat_timeout must be a whole number"),
        (["trainer.distributed=maybe"], "trainer.distributed must be true or false"),
    ],
)
def test_script_refuses_bad_process_settings(overrides, message):
    cfg = compose("dataset=digits", *overrides)
    with pytest.raises(train_script.ConfigError, match=re.escape(message)):
        train_script.validate(cfg)


# --------------------------------------------------------------------------------------------
# Several processes: the library


# The persistent compilation cache shared by every process these tests start: the jobs compile
# the same few dozen programs, about a third of a job's time on 2 busy cores, so once is enough.
_CACHE: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    _CACHE.update(
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    yield
    _CACHE.clear()


def _cpu_env(devices_per_process: int = 1) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **_CACHE}
    env["XLA_FLAGS"] = xla_flags(devices_per_process if devices_per_process > 1 else None)
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES):
        env.pop(name, None)
    env.pop(distributed.ENV_PROCESS_ID, None)
    return env


_LIBRARY_WORKER = """
import json, os, pathlib, signal, sys
import numpy as np
from bpjax import distributed

port, index, directory = int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
os.environ["JAX_PROCESS_ID"] = str(index)  # the id from the environment, the rest as arguments
terms = []
signal.signal(signal.SIGTERM, lambda signum, frame: terms.append(signum))
joined = distributed.initialize(f"127.0.0.1:{port}", 2, initialization_timeout=60,
                                heartbeat_timeout=15)
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

out = {"cluster": list(joined), "primary": distributed.is_primary()}
# The process's own SIGTERM handler still gets SIGTERM (jax's preemption notifier took it)
signal.raise_signal(signal.SIGTERM)
out["sigterm"] = [terms, jax.config.jax_enable_preemption_service]
out["mesh_1"] = [(d.process_index, d.id) for d in distributed.mesh_devices(1)]
out["mesh_all"] = [(d.process_index, d.id) for d in distributed.mesh_devices("all")]
try:
    distributed.mesh_devices(3)
except ValueError as e:
    out["mesh_3"] = str(e)
mesh = jax.sharding.Mesh(np.array(distributed.mesh_devices("all")), ("data",))
rows = np.arange(8.0, dtype=np.float32)
sharded = jax.make_array_from_callback((8,), NamedSharding(mesh, P("data")), lambda i: rows[i])
out["host_copy"] = distributed.host_copy(sharded).tolist()
agreed, stop = distributed.agree({"x": np.float32(index + 0.5), "n": np.arange(3) + index},
                                 stop=index == 1)
out["agree"] = [float(agreed["x"]), agreed["n"].tolist(), stop]
# a signal's number: every process learns the largest (each exits 128 + it)
out["agree_signal"] = [distributed.agree({}, stop=(0, 15)[index])[1],
                       distributed.agree({}, stop=(2, True)[index])[1],
                       distributed.agree({}, stop=False)[1]]
out["texts"] = distributed.all_texts("hello", f"from {index}")
distributed.check_same("same", {"a": 1, "b": [1, 2]})
try:
    distributed.check_same("differ", {"seed": index, "same": 0}, hint="start alike")
except distributed.JobMismatch as e:
    out["mismatch"] = str(e)
run = distributed.shared_directory(directory / f"run-{index}")  # each names its own: 0's wins
out["shared"] = [str(run), sorted(p.name for p in run.iterdir())]
if index == 1:
    distributed.announce_failure("no data here")
else:
    try:
        distributed.all_texts("after", "waiting")
    except distributed.ProcessFailed as e:
        out["failed"] = [e.process_id, e.reason, str(e)]
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_library_across_processes(tmp_path):
    port = _free_port()
    commands = [
        [sys.executable, "-c", _LIBRARY_WORKER, str(port), str(i), str(tmp_path)] for i in (0, 1)
    ]
    with processes(commands, env=_cpu_env(2)) as procs:
        outputs = [proc.communicate(timeout=180) for proc in procs]
    results = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    for index, result in enumerate(results):
        assert result["cluster"] == [index, 2, f"127.0.0.1:{port}", 60, 15]
        assert result["primary"] == (index == 0)
        # devices counts per process; the mesh lists process 0's devices first
        assert [p for p, _ in result["mesh_1"]] == [0, 1]
        assert [p for p, _ in result["mesh_all"]] == [0, 0, 1, 1]
        assert "devices=3 per process, but process 0 of 2 has 2 cpu device(s)" in result["mesh_3"]
        assert result["host_copy"] == list(range(8))  # a sharded array, gathered, everywhere
        # process 0's values everywhere, and the stop that only process 1 asked for
        assert result["agree"] == [0.5, [0, 1, 2], True]
        assert result["agree_signal"] == [15, 2, False]
        assert result["sigterm"] == [[signal.SIGTERM], False]
        assert result["texts"] == ["from 0", "from 1"]
        assert result["mismatch"] == (
            "the 2 processes do not run the same job (seed: 1 in process 1, 0 in process 0): "
            "start alike"
        )
        # process 0's directory; only its marker file in it, while the processes looked
        assert result["shared"][0] == str(tmp_path / "run-0")
        assert all(name.startswith(".bpjax-shared-") for name in result["shared"][1])
    assert not list((tmp_path / "run-0").iterdir())  # the marker is gone once all have seen it
    assert not (tmp_path / "run-1").exists()
    assert results[0]["failed"] == [1, "no data here", "process 1 failed: no data here"]


# --------------------------------------------------------------------------------------------
# Several processes: experiments/train.py

# Digits, 35 steps of 32 an epoch in chunks of 5 (7 chunks: an interrupt lands mid-epoch), short
# heartbeat so that a killed process is noticed soon (the kill -9 test's is shorter still). The
# kill comes after checkpoint 1; the interrupt after checkpoint 2, which the processes have left
# behind when it is listed (checkpoint 1 is listed while they may still be ending epoch 1: an
# interrupt there has nothing left to save, and process 1 can be gone before its own signal). An
# interrupted run saves the epoch it stops in (3, 4 if late) under its number: 5 epochs leave it
# more to do when resumed.
EPOCHS = 5
COMMON = [
    "dataset=digits",
    "model.features=[16,10]",
    "trainer.batch_size=32",
    "trainer.chunk_steps=5",
    f"trainer.epochs={EPOCHS}",
    "trainer.grad_check_every=0",
    "trainer.layer_stats=false",
    "trainer.histogram_every=0",
    "trainer.progress=false",
    "trainer.heartbeat_timeout=15",
    "trainer.initialization_timeout=120",
]


def _commands(
    run_dir: pathlib.Path, processes_: int, *extra: str, port: int | None = None
) -> list[list[str]]:
    """The commands of a job: one process without trainer.distributed, or several."""
    if processes_ == 1:
        return [[sys.executable, str(SCRIPT), *COMMON, f"trainer.run_dir={run_dir}", *extra]]
    port = _free_port() if port is None else port
    job = [
        "trainer.distributed=true",
        f"trainer.coordinator_address=127.0.0.1:{port}",
        f"trainer.num_processes={processes_}",
    ]
    return [
        [
            sys.executable,
            str(SCRIPT),
            *COMMON,
            f"trainer.run_dir={run_dir}",
            *job,
            f"trainer.process_id={i}",
            *extra,
        ]
        for i in range(processes_)
    ]


def _run(run_dir, processes_, devices=1, *extra, timeout=300):
    """Runs a job to its end: ``[(returncode, stdout, stderr)]`` by process."""
    commands = _commands(run_dir, processes_, f"trainer.devices={devices}", *extra)
    with processes(commands, env=_cpu_env(devices), cwd=run_dir.parent) as procs:
        outputs = [proc.communicate(timeout=timeout) for proc in procs]
    return [(proc.returncode, *output) for proc, output in zip(procs, outputs, strict=True)]


def _assert_ok(results) -> None:
    for index, (returncode, _, stderr) in enumerate(results):
        assert returncode == 0, f"process {index}: {stderr[-3000:]}"


def _leaves(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A checkpoint's arrays, read as numpy arrays (whatever devices wrote them)."""
    reader = ocp.PyTreeCheckpointer()
    names = dict(reader.metadata(path / "arrays").item_metadata)
    args = {name: ocp.RestoreArgs(restore_type=np.ndarray) for name in names}
    return reader.restore(path / "arrays", args=ocp.args.PyTreeRestore(restore_args=args))


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, request):
    """The same run as 1 process x 1 device, 2 x 1 (with TensorBoard) and 2 x 2, once per test
    session: pytest-xdist's workers share the runs and their results through one directory
    (the tests that read them may land on both workers, which would each start the same 5
    processes on a shared CPU)."""
    shapes = {"1x1": (1, 1, "logger=none"), "2x1": (2, 1), "2x2": (2, 2, "logger=none")}

    def run_all(root):
        return {
            name: [list(r) for r in _run(root / name, processes_, devices, *extra)]
            for name, (processes_, devices, *extra) in shapes.items()
        }

    root, results = once_per_session(request, tmp_path_factory, "distributed-jobs", run_all)
    return {name: (root / name, [tuple(r) for r in results[name]]) for name in shapes}


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["2x1", "2x2"])
def test_processes_train_as_one(jobs, shape):
    one_dir, (one,) = jobs["1x1"]
    run_dir, results = jobs[shape]
    assert one[0] == 0, one[2][-3000:]
    _assert_ok(results)
    reference = json.loads((one_dir / "metrics.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["processes"] == 2 and reference["processes"] == 1
    assert metrics["device"].startswith(f"{2 * int(shape[-1])} x ")
    assert metrics["steps"] == reference["steps"] == EPOCHS * (1150 // 32)
    assert metrics["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-5)
    assert metrics["best_val_loss"] == pytest.approx(reference["best_val_loss"], rel=1e-5)
    # One writer: one metrics.json, one TensorBoard run, one result line; process 1 says nothing
    # of the run (gloo itself prints a line for each group of devices it connects).
    assert [p.relative_to(run_dir) for p in run_dir.rglob("metrics.json")] == [
        pathlib.Path("metrics.json")
    ]
    if shape == "2x1":
        assert len(list((run_dir / "tb").rglob("events.out.tfevents.*"))) == 1
    out0, out1 = results[0][1], results[1][1]
    assert len(re.findall(r"^bpjax: test_accuracy", out0, re.M)) == 1
    assert len(re.findall(rf"^epoch \d+/{EPOCHS}", out0, re.M)) == EPOCHS
    assert _only_gloo_lines(out1), out1  # its lines may interleave, from 2 threads
    assert results[1][2].strip() == ""


# gloo's own start-up line ("[Gloo] Rank 2 is connected to 3 peer ranks. Expected number of
# connected peer ranks is : 3"), written by two threads at once, a piece at a time: the pieces of
# two lines can interleave anywhere between them ("[Gloo] Rank [Gloo] Rank 2 is connected ...",
# or "... 3 peer ranks. [Gloo] Rank 3 ... Expected number ..."), so each fixed piece is removed
# on its own, every piece as often as the others (whole lines), and only the lines' numbers may
# be left; anything else process 1 prints still fails the test.
_GLOO_PIECES = (
    "[Gloo] Rank",
    "is connected to",
    "peer ranks.",
    "Expected number of connected peer ranks is :",
)


def _only_gloo_lines(text: str) -> bool:
    counts = {text.count(piece) for piece in _GLOO_PIECES}
    rest = re.sub("|".join(map(re.escape, _GLOO_PIECES)), " ", text).split()
    return len(counts) == 1 and all(token.isdigit() for token in rest)


def _finished_steps(run_dir: pathlib.Path) -> list[int]:
    return checkpoint.CheckpointManager(run_dir / "checkpoints").all_steps()


def _wait_for_checkpoint(run_dir: pathlib.Path, step: int, procs, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while step not in _finished_steps(run_dir):
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_identical(jobs, tmp_path):
    run_dir = tmp_path / "run"
    commands = _commands(run_dir, 2, "trainer.devices=1", "logger=none")
    with processes(commands, env=_cpu_env(), cwd=tmp_path) as procs:
        _wait_for_checkpoint(run_dir, 2, procs)
        # At different moments, 0.1 s apart: both stop after the same chunk, which both
        # checkpoint. (Not further apart: where the interrupt meets an epoch's end, with nothing
        # left to save, process 1 can be gone 0.3 s after process 0's signal, and a signal as it
        # exits kills it: -15.)
        procs[0].send_signal(signal.SIGTERM)
        time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=120) for proc in procs]
    # 128 + SIGTERM (it was 130, Ctrl-C's)
    assert [proc.returncode for proc in procs] == [143, 143], [e[-2000:] for _, e in outputs]
    assert "interrupted: every process stopped after the same step" in outputs[0][1]
    assert "trainer.resume=true" in outputs[0][1]
    assert "interrupted" not in outputs[1][1]  # one message for the job
    stopped_at = max(_finished_steps(run_dir))
    assert stopped_at < EPOCHS  # interrupted, not finished
    resumed = _run(run_dir, 2, 1, "logger=none", "trainer.resume=true")
    _assert_ok(resumed)
    assert f"resumed from {run_dir / 'checkpoints'}" in resumed[0][1]
    uninterrupted, _ = jobs["2x1"]
    last = f"ckpt_{EPOCHS:06d}"
    final = _leaves(run_dir / "checkpoints" / last)
    expected = _leaves(uninterrupted / "checkpoints" / last)
    assert final.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(final[name], expected[name], err_msg=name)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        metrics["test_loss"]
        == json.loads((uninterrupted / "metrics.json").read_text())["test_loss"]
    )


# The lost process named: bpjax's message, or, where jax's heartbeat check came first (the
# survivor was saving a checkpoint), jax's own, which names the task by its id.
def _names_lost(lost: int) -> re.Pattern:
    return re.compile(
        rf"process {lost}( \(the coordinator\))? of 2 was lost|Task {lost} heartbeat timeout"
        rf"|stopped sending heartbeats\):\s*{lost}\b"
    )


@pytest.mark.slow
@pytest.mark.parametrize("lost", [1, 0])
def test_kill_9_stops_the_other_process(tmp_path, lost):
    # Process 0 hosts the job's coordinator; its coordination service runs in a process of its
    # own (bpjax.distributed._service), so losing process 0 is named like losing another.
    # A 6 s heartbeat: the survivor waits a third of it (2 s) for the lost process to answer,
    # well before jax's own verdict (6 s), which would end it with jax's message.
    run_dir = tmp_path / "run"
    commands = _commands(
        run_dir, 2, "trainer.devices=1", "logger=none", "trainer.heartbeat_timeout=6"
    )
    survivor = 1 - lost
    with processes(commands, env=_cpu_env(), cwd=tmp_path) as procs:
        _wait_for_checkpoint(run_dir, 1, procs)
        saved = _finished_steps(run_dir)
        procs[lost].kill()
        killed = time.monotonic()
        _, err = procs[survivor].communicate(timeout=90)
        seconds = time.monotonic() - killed
        procs[lost].communicate()
    status = procs[survivor].returncode
    assert status != 0 and seconds < 60, (status, seconds, err[-3000:])
    assert _names_lost(lost).search(err), err[-3000:]
    if "was lost" in err:  # bpjax's own: one line, labelled, and its exit status
        assert status == distributed.EXIT_LOST
        (line,) = [x for x in err.splitlines() if "was lost" in x]
        assert line.startswith(f"[process {survivor}] error: process {lost}")
        assert "start all 2 processes again" in line and "Traceback" not in err
        assert f"trainer.resume=true trainer.run_dir={run_dir}" in err  # and how
        assert f"(process {survivor}'s: " in err
    # Nothing checkpointed is lost: every checkpoint saved before the kill is still there, and
    # the latest reads back whole (resuming from one is test_sigterm_then_resume_is_bit_identical).
    assert set(saved) <= set(_finished_steps(run_dir))
    latest = checkpoint.CheckpointManager(run_dir / "checkpoints").latest()
    assert checkpoint.load_metadata(latest)["step"] >= max(saved)
    leaves = _leaves(latest)
    assert leaves and all(np.all(np.isfinite(v)) for v in leaves.values() if v.dtype.kind == "f")


@pytest.mark.slow
def test_a_process_that_cannot_start_stops_the_job(tmp_path):
    # Process 1 can't load its data; process 0 learns why instead of waiting for it.
    run_dir = tmp_path / "run"
    missing = tmp_path / "nowhere.npz"
    commands = _commands(run_dir, 2, "logger=none")
    commands[1] += ["dataset=npz", f"dataset.path={missing}"]
    with processes(commands, env=_cpu_env(), cwd=tmp_path) as procs:
        outputs = [proc.communicate(timeout=180) for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2], [e[-2000:] for _, e in outputs]
    errors = [[x for x in err.splitlines() if "error:" in x] for _, err in outputs]
    assert len(errors[1]) == 1 and errors[1][0].startswith("[process 1] error: dataset npz")
    assert len(errors[0]) == 1 and errors[0][0].startswith("[process 0] error: process 1 failed:")
    assert str(missing) in errors[0][0]
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_processes_with_other_settings_are_refused(tmp_path):
    commands = _commands(tmp_path / "run", 2, "logger=none")
    commands[1].append("seed=1")
    with processes(commands, env=_cpu_env(), cwd=tmp_path) as procs:
        outputs = [proc.communicate(timeout=180) for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2]
    for index, (_, err) in enumerate(outputs):
        (line,) = [x for x in err.splitlines() if "error:" in x]
        assert line.startswith(f"[process {index}] error: the 2 processes do not run the same")
        assert "seed: 1 in process 1, 0 in process 0" in line


@pytest.mark.slow
def test_batch_not_divisible_by_every_process_device_is_one_error_line(tmp_path):
    # 2 processes x 2 devices: 4 devices in all, which 30 examples a step don't divide.
    commands = _commands(tmp_path / "run", 2, "trainer.devices=all", "trainer.batch_size=30")
    with processes(commands, env=_cpu_env(2), cwd=tmp_path) as procs:
        outputs = [proc.communicate(timeout=180) for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2], [e[-2000:] for _, e in outputs]
    for index, (_, err) in enumerate(outputs):
        (line,) = [x for x in err.splitlines() if "error:" in x]
        assert line == (
            f"[process {index}] error: trainer.batch_size=30 is not divisible by the 4 devices "
            f"of trainer.devices=all (2 processes x 2)"
        )
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_unreachable_coordinator_is_one_error_line(tmp_path):
    port = _free_port()  # nobody serves it: process 0 is never started
    command = _commands(tmp_path / "run", 2, "trainer.initialization_timeout=1", port=port)[1]
    started = time.monotonic()
    with processes([command], env=_cpu_env(), cwd=tmp_path) as (proc,):
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == distributed.EXIT_NOT_STARTED, err[-3000:]
    assert time.monotonic() - started < 60
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines == [
        f"[process 1] error: the job did not start: 2 processes did not all join within 1 s "
        f"(initialization_timeout); nothing answers at 127.0.0.1:{port}: is process 0 running "
        f"there, on this address?"
    ]


@pytest.mark.slow
def test_coordinator_port_in_use_is_one_error_line(tmp_path):
    with socket.socket(socket.AF_INET6) as busy:
        busy.bind(("::", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = _commands(tmp_path / "run", 1)[0] + [
            "trainer.distributed=true",
            f"trainer.coordinator_address=127.0.0.1:{port}",
            "trainer.num_processes=1",
            "trainer.process_id=0",
        ]
        with processes([command], env=_cpu_env(), cwd=tmp_path) as (proc,):
            _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith("error: trainer.distributed=true: jax.distributed.initialize()")
    assert f"127.0.0.1:{port}: its port is in use on this host" in line
    assert "stop this job's other processes now" in line  # a trial: they would end that job


def test_coordination_service_runs_in_a_process_of_its_own():
    # What process 0's initialize starts in place of jax's in-process service: it listens,
    # ignores the job's signals (the processes stop together through it), and stops when
    # process 0's jax shuts it down, freeing the port.
    port = _free_port()
    service = _service.start_service(f"[::]:{port}", 2, heartbeat_timeout=6)
    try:
        assert _start._reachable(f"127.0.0.1:{port}")
        for signum in (signal.SIGINT, signal.SIGTERM):
            service.process.send_signal(signum)
        time.sleep(0.5)
        assert service.process.poll() is None
    finally:
        service.shutdown()
    assert service.process.returncode == 0
    assert not _service._port_in_use(f"127.0.0.1:{port}")
    assert not _service.pid_file(port).exists()  # said stop: no linger


def test_a_service_that_cannot_listen_says_why():
    with socket.socket(socket.AF_INET6) as busy:
        busy.bind(("::", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=r"Failed to start RPC server.*in use"):
            _service.start_service(f"[::]:{port}", 2)
        # and initialize's message for it
        message = _start._start_error(
            RuntimeError("UNKNOWN: Failed to start RPC server"), f"127.0.0.1:{port}", 2, 0
        )
        assert "its port is in use on this host" in message


def test_a_service_outlives_a_lost_process_0_then_frees_its_port():
    # Process 0 gone without a word (its end of the pipe closed): the service stays for the
    # survivors to find out who is lost (alive_wait), then ends; a job started again at once
    # waits for it instead of finding the port taken.
    port = _free_port()
    service = _service.start_service(f"[::]:{port}", 2, heartbeat_timeout=3)
    linger = _service.alive_wait(3) + _service._LINGER_MARGIN
    assert linger == 6.0
    started = time.monotonic()
    service.process.stdin.close()
    deadline = time.monotonic() + 10
    while not _service.pid_file(port).exists():
        assert time.monotonic() < deadline, "the service did not say it lingers"
        time.sleep(0.05)
    assert service.process.poll() is None and _service._port_in_use(f"127.0.0.1:{port}")
    _service.wait_for_lingering_service(f"127.0.0.1:{port}")
    waited = time.monotonic() - started
    service.process.wait(timeout=10)
    service.process.stdout.close()
    assert linger - 1 <= waited <= linger + 5, waited
    assert not _service.pid_file(port).exists()
    assert not _service._port_in_use(f"127.0.0.1:{port}")


@pytest.mark.parametrize(("heartbeat", "expected"), [(1, 1.0), (6, 2.0), (30, 10.0), (300, 10.0)])
def test_alive_wait_is_a_third_of_the_heartbeat_within_1_to_10_s(heartbeat, expected):
    assert _service.alive_wait(heartbeat) == expected


def test_initialize_puts_its_service_in_jax_s_place_for_the_call_only(monkeypatch):
    # jax.distributed.initialize calls jaxlib's get_distributed_runtime_service on process 0:
    # during initialize it is start_service; before and after, jax's own.
    from jax._src import distributed as jax_distributed

    original = jax_distributed._jax.get_distributed_runtime_service
    seen = []

    def fake_initialize(**kwargs):
        seen.append(jax_distributed._jax.get_distributed_runtime_service)
        raise RuntimeError("stop here")

    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    monkeypatch.setattr(_start, "_joined", [])
    with pytest.raises(ValueError, match="stop here"):
        distributed.initialize(f"127.0.0.1:{_free_port()}", 1, 0)
    assert seen == [_service.start_service]
    assert jax_distributed._jax.get_distributed_runtime_service is original


@pytest.mark.parametrize(
    ("last_checkpoint", "expected"),
    [
        ("/runs/a/checkpoints/ckpt_000003", "resuming, to continue"),
        (None, "no checkpoint was written yet; start all 1 processes again to run it from"),
    ],
)
def test_a_lost_process_message_says_how_to_go_on(monkeypatch, last_checkpoint, expected):
    # With nothing checkpointed it said "resuming" (a trial): there is nothing to resume.
    from bpjax.distributed import _faults

    monkeypatch.setattr(_faults, "_lost_after", lambda error: (0,))
    lost = distributed.process_lost(
        ValueError("Gloo AllGather failed: Connection reset by peer"),
        last_checkpoint=last_checkpoint,
    )
    assert isinstance(lost, distributed.ProcessLost) and lost.lost == (0,)
    text = str(lost)
    assert text.startswith("process 0 (the coordinator) of 1 was lost") and expected in text
    assert ("resuming" in text) == (last_checkpoint is not None)
    assert "Gloo AllGather failed" in text

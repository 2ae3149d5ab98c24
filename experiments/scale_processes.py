"""Examples per second of one training job run as 1, 2, 4, ... processes on this machine.

Each job is ``experiments/train.py`` with the same settings and global batch, started as N
processes with ``trainer.distributed=true`` on 127.0.0.1 (one CPU device each, gloo
collectives); N=1 runs without ``trainer.distributed``. The table gives, per N, the
``examples_per_second`` and ``test_accuracy`` that process 0 writes to ``metrics.json``, and the
job's wall time.

On one machine this is a **correctness test, not a speed claim**: the processes share its
cores and memory bandwidth, and every step all-reduces the gradient through gloo over loopback.
Real scaling needs one process per host or accelerator.

    python experiments/scale_processes.py                       # 1, 2, 4 processes, MNIST MLP
    python experiments/scale_processes.py --processes 1 2 -- dataset=digits trainer.epochs=2

Everything after ``--`` is passed to every process as Hydra overrides.

Exit status: 0 when every job completed, 1 otherwise (its processes' stderr is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

SCRIPT = pathlib.Path(__file__).resolve().parent / "train.py"
DEFAULTS = [
    "dataset=mnist",
    "trainer.epochs=2",
    "trainer.batch_size=128",
    "trainer.progress=false",
    "trainer.grad_check_every=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(n: int, run_dir: pathlib.Path, overrides: list[str], timeout: float) -> dict:
    """Runs one job as ``n`` processes; returns process 0's metrics and the wall time."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    base = [sys.executable, str(SCRIPT), *overrides, f"trainer.run_dir={run_dir}"]
    if n == 1:
        commands = [base]
    else:
        port = free_port()
        job = [
            "trainer.distributed=true",
            f"trainer.coordinator_address=127.0.0.1:{port}",
            f"trainer.num_processes={n}",
        ]
        commands = [[*base, *job, f"trainer.process_id={i}"] for i in range(n)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    deadline = start + timeout  # one deadline for the whole job, not one per process
    outputs = []
    try:
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=max(deadline - time.perf_counter(), 0.1)))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                out, err = p.communicate()
                outputs.append((out, f"{err}\n(killed: the job ran past --timeout {timeout:g} s)"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs += [p.communicate() for p in procs[len(outputs) :]]
    wall = time.perf_counter() - start
    failed = [
        (i, p.returncode, err)
        for i, (p, (_, err)) in enumerate(zip(procs, outputs))
        if p.returncode
    ]
    metrics_file = run_dir / "metrics.json"
    if failed or not metrics_file.exists():
        for i, code, err in failed:
            print(f"process {i} of the {n}-process job exited {code}:\n{err}", file=sys.stderr)
        return {"processes": n, "status": "failed", "wall_seconds": wall}
    metrics = json.loads(metrics_file.read_text())
    return {
        "processes": n,
        "status": metrics["status"],
        "examples_per_second": metrics["examples_per_second"],
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "steps": metrics["steps"],
        "wall_seconds": wall,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=pathlib.Path, default=None, help="where the runs go")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.processes):
        parser.error(f"--processes must be positive, got {args.processes}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout:g}")
    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="bpjax-scale-"))
    overrides = [*DEFAULTS, *overrides]
    rows = []
    for n in args.processes:
        rows.append(run_job(n, out / f"processes-{n}", overrides, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()
    print(
        f"\nsettings: {' '.join(overrides)}; {os.cpu_count()} CPUs; load average "
        f"{load[0]:.2f} at the end; runs in {out}"
    )
    print("| processes | examples/s | test accuracy | test loss | steps | job wall s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["status"] == "failed":
            print(f"| {r['processes']} | failed | | | | {r['wall_seconds']:.1f} |")
            continue
        speed = r["examples_per_second"]  # None: every chunk compiled (trainer.epochs=1)
        print(
            f"| {r['processes']} | {'not timed' if speed is None else f'{speed:.0f}'} | "
            f"{r['test_accuracy']:.4f} | "
            f"{r['test_loss']:.6f} | {r['steps']} | {r['wall_seconds']:.1f} |"
        )
    return 0 if all(r["status"] == "completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

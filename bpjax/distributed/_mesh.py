"""Which devices a data-parallel mesh takes, in one process or several."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax


def mesh_devices(devices: int | str | Sequence[Any] = 1) -> list[Any]:
    """The devices of a one-axis data-parallel mesh, process by process.

    In one process, ``devices`` is a count of ``jax.devices()`` (the first ones) or ``"all"``.
    In a job of several processes it counts each process's devices: ``1`` (the default) is one
    device per process (one GPU per SLURM task, say), ``"all"`` every device of every process;
    the mesh lists process 0's devices first, then process 1's, ..., so that each process's
    share of a batch is one contiguous block. Every process computes the same list (it sees
    every process's devices), so a bad count is the same error everywhere.

    Args:
        devices: a count, ``"all"``, or the device objects themselves (taken as given).

    Returns:
        The devices, in mesh order.

    Raises:
        ValueError: a count below 1 or above what a process has, naming the process.
    """
    if not isinstance(devices, int | str):
        return list(devices)
    if isinstance(devices, bool) or (isinstance(devices, str) and devices != "all"):
        raise ValueError(f"devices must be a positive count or 'all', got {devices!r}")
    every = jax.devices()
    count = jax.process_count()
    if count == 1:
        if devices == "all":
            return every
        if not 1 <= devices <= len(every):
            raise ValueError(
                f"devices={devices} but {len(every)} {every[0].platform} device(s) are available"
            )
        return every[:devices]
    by_process: list[list[Any]] = [[] for _ in range(count)]
    for device in sorted(every, key=lambda d: (d.process_index, d.id)):
        by_process[device.process_index].append(device)
    if devices == "all":
        return [d for local in by_process for d in local]
    fewest = min(range(count), key=lambda i: len(by_process[i]))
    if not 1 <= devices <= len(by_process[fewest]):
        raise ValueError(
            f"devices={devices} per process, but process {fewest} of {count} has "
            f"{len(by_process[fewest])} {every[0].platform} device(s)"
        )
    return [d for local in by_process for d in local[:devices]]

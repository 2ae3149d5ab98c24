"""What the command-line scripts share: config keys checked against what reads them, strict
JSON records, the command that reruns a script, and the run directory's config resolvers.

Convention: a key of a composed Hydra config is valid when something reads it. A node with a
``_target_`` is read by that callable, so its keys are the callable's parameters (anything, if
it takes ``**kwargs``); a config group without a target (``trainer``, ``logger``) is read by the
script, and its keys are those of the group's default option file (``conf/trainer/default.yaml``
is the schema of ``trainer``); the top level holds the keys of the primary config file and one
key per config group of its defaults list. Hydra's own keys (``hydra.*``) are Hydra's to check.

Importing this module registers two OmegaConf resolvers used by ``conf/config.yaml``:
``bpjax.run_dir`` (``trainer.run_dir`` when it is set, else a new directory) and
``bpjax.hydra_subdir`` (where Hydra writes ``.hydra/`` for a run: ``.hydra``, or
``.hydra/DATE_TIME`` where the directory already holds a run's ``.hydra/config.yaml``, so a
resumed run never overwrites the record of the run it continues). Sweep workers import it with
the script's functions.

The config key checks are defined in ``bpjax._cli_keys`` and ``composition_error`` in
``bpjax._cli_composition``; both are re-exported here.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from bpjax._cli_composition import composition_error, run_command_line
from bpjax._cli_keys import (
    bool_parameters,
    check_bools,
    check_keys,
    schema_from_conf,
    target_parameters,
)

__all__ = [
    "bool_parameters",
    "check_bools",
    "check_keys",
    "composition_error",
    "hydra_quote",
    "rerun_command",
    "run_command_line",
    "schema_from_conf",
    "strict_json",
    "target_parameters",
]

# ----------------------------------------------------------------------------------------------
# Strict JSON
# ----------------------------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "__array__"):  # numpy and jax scalars and arrays
        return _plain(np.asarray(value).tolist(), where)
    raise TypeError(f"{where or 'value'}: cannot write {type(value).__name__} as JSON: {value!r}")


def strict_json(payload: Any, *, indent: int | None = 2) -> str:
    """``payload`` as strict JSON text (RFC 8259): NaN and +-inf become ``null``.

    Python's ``json`` writes the bare tokens ``NaN`` and ``Infinity`` by default, which strict
    parsers (JavaScript's ``JSON.parse``, ``jq``, Go, ...) reject.

    Args:
        payload: nested mappings, lists, tuples, str, bool, int, float, None, paths, and numpy
            or jax scalars and arrays (written as numbers and lists).
        indent: as ``json.dumps``.

    Returns:
        The JSON text, keys in their insertion order.

    Raises:
        TypeError: a value of another type, named with where it is in ``payload``.
    """
    return json.dumps(_plain(payload, ""), indent=indent, allow_nan=False)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

_PLAIN_VALUE = re.compile(r"[\w./+@%~:-]*")


def hydra_quote(value: str) -> str:
    """``value`` as Hydra's override grammar reads it back unchanged: as it is when it has no
    character the grammar treats specially (``,`` sweeps, ``=``, brackets, quotes, spaces, ...),
    else single-quoted with ``\\'`` for quotes (and doubled backslashes before a quote)."""
    if _PLAIN_VALUE.fullmatch(value):
        return value
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"


def _interpreter(cwd: pathlib.Path, project_root: pathlib.Path) -> str:
    # Not resolved: a venv's python is a symlink to the base interpreter, which lacks the venv.
    executable = pathlib.Path(os.path.abspath(sys.executable))
    venv = project_root / ".venv"
    if executable.is_relative_to(venv) and cwd.is_relative_to(project_root):
        return os.path.relpath(executable, cwd)
    return str(executable)


def rerun_command(
    script: str | os.PathLike,
    overrides: Sequence[str],
    *,
    cwd: str | os.PathLike,
    project_root: str | os.PathLike,
) -> str:
    """The shell command that runs ``script`` with ``overrides`` again, from ``cwd``.

    The interpreter is the one running now (``sys.executable``): relative to ``cwd`` when it is
    the project's own ``.venv`` and ``cwd`` is inside the project (``.venv/bin/python``), else
    absolute, so the command works without an activated venv. The script is relative to
    ``cwd`` when it lies below it. Every word is quoted for a POSIX shell (``shlex``);
    overrides are passed as they are (Hydra's grammar: quote values with ``hydra_quote``).
    """
    cwd = pathlib.Path(os.path.abspath(cwd))
    script = pathlib.Path(os.path.abspath(script))
    shown = os.path.relpath(script, cwd) if script.is_relative_to(cwd) else str(script)
    project = pathlib.Path(os.path.abspath(project_root))
    return shlex.join([_interpreter(cwd, project), shown, *overrides])


# ----------------------------------------------------------------------------------------------
# Resolvers of conf/config.yaml
# ----------------------------------------------------------------------------------------------


def _run_dir(run_dir: Any, default: str) -> str:
    return str(run_dir) if run_dir not in (None, "", "None") else default


def _hydra_subdir(output_dir: str) -> str:
    if not (pathlib.Path(output_dir) / ".hydra" / "config.yaml").exists():
        return ".hydra"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return f".hydra/{stamp}"


for _name, _resolver in (("bpjax.run_dir", _run_dir), ("bpjax.hydra_subdir", _hydra_subdir)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)

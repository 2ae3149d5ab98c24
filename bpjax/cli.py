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
"""

from __future__ import annotations

import datetime
import difflib
import importlib
import inspect
import json
import math
import os
import pathlib
import re
import shlex
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
from omegaconf import OmegaConf

__all__ = [
    "bool_parameters",
    "check_bools",
    "check_keys",
    "composition_error",
    "hydra_quote",
    "rerun_command",
    "schema_from_conf",
    "strict_json",
    "target_parameters",
]

# Keys Hydra's instantiate reads itself, in any node with a _target_.
_INSTANTIATE_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})


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
# Config keys against what reads them
# ----------------------------------------------------------------------------------------------


def _locate(path: str) -> Any:
    """The object at a dotted path (``optax.sgd``, ``bpjax.data.digits``)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for j, attr in enumerate(parts[i:], start=i):
            if not hasattr(obj, attr):
                names = [n for n in dir(obj) if not n.startswith("_")]
                near = difflib.get_close_matches(attr, names, n=1)
                hint = f" (did you mean {'.'.join(parts[:j] + near)}?)" if near else ""
                raise LookupError(f"{'.'.join(parts[:j])} has no {attr!r}{hint}")
            obj = getattr(obj, attr)
        return obj
    raise LookupError(f"no module {parts[0]!r} to import")


def target_parameters(target: str | Any) -> tuple[list[str], bool, list[str]]:
    """The keyword parameters a ``_target_`` takes.

    Args:
        target: a dotted path (as in a config's ``_target_``) or the callable itself.

    Returns:
        ``(names, takes_any, required)``: the parameters that may be given by keyword, whether
        it also takes ``**kwargs`` (or its signature can't be read: then any key is accepted),
        and those without a default.

    Raises:
        LookupError: the path names nothing importable (the message suggests a near name).
    """
    obj = _locate(target) if isinstance(target, str) else target
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return [], True, []
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in parameters if p.kind in keyword]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    required = [
        p.name for p in parameters if p.kind in keyword and p.default is inspect.Parameter.empty
    ]
    return names, takes_any, required


def bool_parameters(target: str | Any) -> set[str]:
    """The parameters of a ``_target_`` annotated ``bool`` (a string such as ``no`` given there
    would read as true)."""
    obj = _locate(target) if isinstance(target, str) else target
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in parameters if p.annotation in (bool, "bool")}


def check_bools(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    """Every true/false setting given something else: one line each.

    Args:
        config: the composed config as plain containers.
        defaults: per group without a ``_target_`` (``trainer``, ``logger``), its default
            option's keys and values: a key whose default is a bool must stay one.

    Returns:
        One message per key that must be true or false and isn't: a group setting whose
        default is a bool, or a ``_target_`` parameter annotated ``bool``, at any depth.
    """
    problems: list[str] = []

    def visit(node: Any, where: str) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            flags = set()
            if isinstance(target, str):
                try:
                    flags = bool_parameters(target)
                except LookupError:
                    flags = set()
            for key, value in node.items():
                here = f"{where}.{key}" if where else str(key)
                if key in flags and value is not None and not isinstance(value, bool):
                    problems.append(f"{here} must be true or false, got {value!r}")
                else:
                    visit(value, here)
        elif isinstance(node, list):
            for i, child in enumerate(node):
                visit(child, f"{where}[{i}]")

    for group, values in config.items():
        default = defaults.get(group)
        if isinstance(values, dict) and isinstance(default, dict) and "_target_" not in values:
            for key, value in values.items():
                if isinstance(default.get(key), bool) and not isinstance(value, bool):
                    problems.append(f"{group}.{key} must be true or false, got {value!r}")
        visit(values, group)
    return problems


def _suggest(key: str, valid: Collection[str], prefix: str) -> str:
    near = difflib.get_close_matches(key, sorted(valid), n=1)
    return f"did you mean {prefix}{near[0]}? " if near else ""


def _check_target(node: dict, where: str, supplied: Collection[str], problems: list[str]) -> None:
    target = node["_target_"]
    try:
        names, takes_any, required = target_parameters(str(target))
    except LookupError as e:
        problems.append(f"{where}._target_={target}: {e}")
        return
    keys = [k for k in node if k not in _INSTANTIATE_KEYS]
    prefix = f"{where}." if where else ""
    reported = len(problems)
    for key in keys:
        if key in supplied:
            problems.append(
                f"{prefix}{key} is set by the script itself, not by this config ({target} "
                f"gets it from elsewhere: see the group's file under conf/)"
            )
        elif key not in names and not takes_any:
            valid = [n for n in names if n not in supplied]
            problems.append(
                f"{prefix}{key} is not a parameter of {target}: {_suggest(key, valid, prefix)}"
                f"({target} takes {', '.join(valid) or 'nothing'})"
            )
    # A misspelt parameter also leaves the real one missing: the misspelling says it all.
    if len(problems) == reported and not node.get("_partial_", False) and "_args_" not in node:
        missing = [n for n in required if n not in node and n not in supplied]
        if missing:
            problems.append(
                f"{where} needs {', '.join(f'{prefix}{n}' for n in missing)} ({target} has no "
                f"default for {'it' if len(missing) == 1 else 'them'})"
            )
    for key in keys:
        _check_values(node[key], f"{prefix}{key}", problems)


def _check_values(value: Any, where: str, problems: list[str]) -> None:
    """Targets nested anywhere in a value: a layer spec in a list, an initializer, ..."""
    if isinstance(value, dict):
        if "_target_" in value:
            _check_target(value, where, (), problems)
        else:
            for key, child in value.items():
                _check_values(child, f"{where}.{key}", problems)
    elif isinstance(value, list):
        for i, child in enumerate(value):
            _check_values(child, f"{where}[{i}]", problems)


def schema_from_conf(conf_dir: str | os.PathLike, config_name: str = "config") -> dict[str, Any]:
    """The schema ``check_keys`` takes, read from a Hydra config directory.

    Args:
        conf_dir: the config directory (``conf/``).
        config_name: the primary config file's name, without ``.yaml``.

    Returns:
        ``{key: None}`` for each top-level key of the primary file, and ``{group: keys}`` for
        each config group of its defaults list (``- trainer: default``): the keys of that
        default option's file, or ``None`` where the option has a ``_target_`` (its
        signature is the schema) or where the group is a ``# @package _global_`` preset.

    Raises:
        FileNotFoundError: a file of the defaults list is missing.
    """
    conf_dir = pathlib.Path(conf_dir)
    primary = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{config_name}.yaml"))
    schema: dict[str, Any] = {k: None for k in primary if k not in ("defaults", "hydra")}
    for entry in primary.get("defaults", []):
        if not isinstance(entry, dict):  # _self_
            continue
        ((group, option),) = entry.items()
        if option is None or group.startswith(("override ", "hydra/", "optional ")):
            continue
        path = conf_dir / group / f"{option}.yaml"
        if "@package _global_" in path.read_text():
            continue
        default = OmegaConf.to_container(OmegaConf.load(path))
        default.pop("defaults", None)
        schema[group.replace("/", ".")] = None if "_target_" in default else list(default)
    return schema


def check_keys(
    config: Mapping[str, Any],
    schema: Mapping[str, Any],
    *,
    supplied: Mapping[str, Collection[str]] | None = None,
) -> list[str]:
    """Every key of ``config`` that nothing reads: one line each, naming the nearest valid key.

    Args:
        config: the composed config as plain containers
            (``OmegaConf.to_container(cfg, resolve=False)``), without ``hydra``.
        schema: from ``schema_from_conf``: for each top-level key, ``None`` or the list of keys
            its group may hold. A group node with a ``_target_`` is checked against the
            target's signature whatever the schema says (another option of the group may
            name another target), and so is every ``_target_`` nested in any value.
        supplied: per top-level group, the parameters the script passes itself
            (``{"dataset": ["seed"]}``): a config must not set them, and need not.

    Returns:
        One message per problem (empty: every key is read): a key that is not a parameter of
        its target, not a setting of its group, or not a top-level key; a required parameter
        with no value; a ``_target_`` that can't be imported.
    """
    supplied = supplied or {}
    problems: list[str] = []
    for key, value in config.items():
        if key not in schema:
            valid = [k for k in schema if k != "hydra"]
            problems.append(
                f"{key} is not a setting: {_suggest(key, valid, '')}"
                f"(top-level keys: {', '.join(valid)})"
            )
        elif isinstance(value, dict) and "_target_" in value:
            _check_target(value, key, supplied.get(key, ()), problems)
        elif isinstance(value, dict) and schema[key] is not None:
            for sub in value:
                if sub not in schema[key]:
                    problems.append(
                        f"{key}.{sub} is not a setting, and nothing reads it: "
                        f"{_suggest(sub, schema[key], f'{key}.')}"
                        f"({key} settings: {', '.join(schema[key])})"
                    )
            for sub, child in value.items():
                _check_values(child, f"{key}.{sub}", problems)
        else:
            _check_values(value, key, problems)
    return problems


def _chosen_option(conf_dir: pathlib.Path, group: str, overrides: Sequence[str]) -> str | None:
    """The option of ``group`` the command line chose (``model=cnn``), or the primary config's
    default for it; None when neither names one."""
    for override in reversed(overrides):
        key, eq, value = override.lstrip("+~").partition("=")
        if eq and key == group and value:
            return value
    primary = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml"))
    for entry in primary.get("defaults", []) if isinstance(primary, dict) else []:
        if isinstance(entry, dict) and isinstance(entry.get(group), str):
            return entry[group]
    return None


def _keys_a_group_takes(conf_dir: pathlib.Path, group: str, option: str | None = None) -> set[str]:
    """Every key ``option`` of ``group`` may hold (every option's, when None or unknown): its
    file's keys and its target's params. A file packaged ``_global_`` (an image model that also
    sets ``dataset.flatten``) is read at its ``group`` key."""
    keys: set[str] = set()
    paths = sorted((conf_dir / group).glob("*.yaml"))
    if option is not None and (conf_dir / group / f"{option}.yaml").is_file():
        paths = [conf_dir / group / f"{option}.yaml"]
    for path in paths:
        option = OmegaConf.to_container(OmegaConf.load(path))
        if not isinstance(option, dict):
            continue
        if "# @package _global_" in path.read_text().split("\n", 1)[0]:
            option = option.get(group.split("/")[-1], {})
            if not isinstance(option, dict):
                continue
        keys |= {k for k in option if k not in ("defaults", *_INSTANTIATE_KEYS)}
        target = option.get("_target_")
        if isinstance(target, str):
            try:
                keys |= set(target_parameters(target)[0])
            except LookupError:
                pass
    return keys


def composition_error(
    error: Exception, conf_dir: str | os.PathLike, overrides: Sequence[str] = ()
) -> str:
    """Hydra's refusal of a command line, as one line naming the nearest valid choice.

    Hydra refuses an override of a key that no config file holds (``trainer.epoch=3``: it is
    not added without ``+``) and an option that no file provides (``dataset=digitz``), in a
    few lines that name neither the key nor the option meant.

    Args:
        error: the ``hydra.errors.ConfigCompositionException`` (or ``MissingConfigException``,
            ``OverrideParseException``) that composing the config raised.
        conf_dir: the config directory (``conf/``).
        overrides: the command line's overrides: a key is looked for in the group's option
            they choose (``model=cnn``), else in the default option.

    Returns:
        The message, one line, without ``error:``.
    """
    conf_dir = pathlib.Path(conf_dir)
    text = str(error)
    override = re.match(r"Could not override '([^']+)'", text)
    if override and not override.group(1).startswith("hydra."):
        key = override.group(1)
        group, _, leaf = key.rpartition(".")
        schema = schema_from_conf(conf_dir)
        if not group:
            valid = set(schema)
        elif (conf_dir / group.replace(".", "/")).is_dir():
            chosen = _chosen_option(conf_dir, group.replace(".", "/"), overrides)
            valid = _keys_a_group_takes(conf_dir, group.replace(".", "/"), chosen)
        else:
            valid = set()
        if leaf in valid:
            return (
                f"{key} is not in this config; to give it, add it: +{key}=... (a key that "
                f"the config's files don't set needs the +)"
            )
        prefix = f"{group}." if group else ""
        near = _suggest(leaf, valid, prefix).strip()
        return f"{key} is not a setting{': ' + near if near else ''} (nothing reads it)"
    options = getattr(error, "options", None)
    missing = getattr(error, "missing_cfg_file", None)
    if options and missing:
        group, _, option = str(missing).rpartition("/")
        near = difflib.get_close_matches(option, options, n=1)
        hint = f"did you mean {group}={near[0]}? " if near else ""
        return (
            f"{group}={option}: no such option (no conf/{group}/{option}.yaml): {hint}"
            f"(options: {', '.join(options)})"
        )
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    bad = getattr(error, "override", None)  # OverrideParseException: the override's text
    return f"{bad}: {text}" if bad and str(bad) not in text else text


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

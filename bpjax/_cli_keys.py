"""``bpjax.cli``'s config keys checked against what reads them: ``target_parameters``,
``bool_parameters``, ``check_bools``, ``schema_from_conf`` and ``check_keys`` (re-exported by
``bpjax.cli``, whose docstring states the convention). The public functions' ``__module__`` is
``bpjax.cli``, where users import them from."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pathlib
from collections.abc import Collection, Mapping
from typing import Any

from omegaconf import OmegaConf

# Keys Hydra's instantiate reads itself, in any node with a _target_.
_INSTANTIATE_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})


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
    return f"did you mean {prefix}{near[0]}?" if near else ""


def _unknown(head: str, key: str, valid: Collection[str], prefix: str, listing: str) -> str:
    """``head: did you mean ...? (listing)``, or ``head (listing)`` where nothing is near."""
    near = _suggest(key, valid, prefix)
    return f"{head}: {near} ({listing})" if near else f"{head} ({listing})"


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
                _unknown(
                    f"{prefix}{key} is not a parameter of {target}",
                    key,
                    valid,
                    prefix,
                    f"{target} takes {', '.join(valid) or 'nothing'}",
                )
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
        For each top-level key of the primary file: its keys where it holds a non-empty mapping
        (a section of settings: compare_rules.yaml's ``compare``), else ``None`` (a value, or
        ``{}``: a mapping whose keys are the user's). And ``{group: keys}`` for each config
        group of its defaults list (``- trainer: default``): the keys of that default option's
        file, or ``None`` where the option has a ``_target_`` (its signature is the schema) or
        where the group is a ``# @package _global_`` preset.

    Raises:
        FileNotFoundError: a file of the defaults list is missing.
    """
    conf_dir = pathlib.Path(conf_dir)
    primary = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{config_name}.yaml"))
    schema: dict[str, Any] = {
        k: list(v) if isinstance(v, dict) and v else None
        for k, v in primary.items()
        if k not in ("defaults", "hydra")
    }
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
                _unknown(
                    f"{key} is not a setting", key, valid, "", f"top-level keys: {', '.join(valid)}"
                )
            )
        elif isinstance(value, dict) and "_target_" in value:
            _check_target(value, key, supplied.get(key, ()), problems)
        elif isinstance(value, dict) and schema[key] is not None:
            for sub in value:
                if sub not in schema[key]:
                    problems.append(
                        _unknown(
                            f"{key}.{sub} is not a setting, and nothing reads it",
                            sub,
                            schema[key],
                            f"{key}.",
                            f"{key} settings: {', '.join(schema[key])}",
                        )
                    )
            for sub, child in value.items():
                _check_values(child, f"{key}.{sub}", problems)
        else:
            _check_values(value, key, problems)
    return problems


for _public in (target_parameters, bool_parameters, check_bools, schema_from_conf, check_keys):
    _public.__module__ = "bpjax.cli"  # re-exported there, their public home
del _public

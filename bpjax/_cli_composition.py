"""``bpjax.cli.composition_error``: Hydra's refusal of a command line (a key or an option that
no config file provides) as one line naming the nearest valid choice, and
``bpjax.cli.run_command_line``, which runs an entry script's ``@hydra.main`` with it (re-exported
by ``bpjax.cli``; their ``__module__`` is ``bpjax.cli``, where users import them from)."""

from __future__ import annotations

import difflib
import os
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from bpjax._cli_keys import _INSTANTIATE_KEYS, _unknown, schema_from_conf, target_parameters


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
    error: Exception,
    conf_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    config_name: str = "config",
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
        config_name: the primary config file's name, without ``.yaml`` (``gradcheck``).

    Returns:
        The message, one line, without ``error:``.
    """
    conf_dir = pathlib.Path(conf_dir)
    text = str(error)
    override = re.match(r"Could not override '([^']+)'", text)
    if override and not override.group(1).startswith("hydra."):
        key = override.group(1)
        group, _, leaf = key.rpartition(".")
        schema = schema_from_conf(conf_dir, config_name)
        if not group:
            valid = set(schema)
        elif (conf_dir / group.replace(".", "/")).is_dir():
            chosen = _chosen_option(conf_dir, group.replace(".", "/"), overrides)
            valid = _keys_a_group_takes(conf_dir, group.replace(".", "/"), chosen)
        else:  # a node of the primary file itself (compare_rules.yaml's compare)
            node = OmegaConf.select(OmegaConf.load(conf_dir / f"{config_name}.yaml"), group)
            valid = set(node) if isinstance(node, DictConfig) else set()
            if isinstance(node, DictConfig) and not node:  # {}: its keys are the user's
                return (
                    f"{key} is not in this config; to give it, add it: +{key}=... ({group} "
                    f"is empty by default: every key given to it needs the +)"
                )
        if leaf in valid:
            return (
                f"{key} is not in this config; to give it, add it: +{key}=... (a key that "
                f"the config's files don't set needs the +)"
            )
        prefix = f"{group}." if group else ""
        return _unknown(f"{key} is not a setting", leaf, valid, prefix, "nothing reads it")
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


composition_error.__module__ = "bpjax.cli"  # re-exported there, its public home


def run_command_line(
    main: Callable[[], Any], conf_dir: str | os.PathLike, *, config_name: str = "config"
) -> None:
    """Runs an entry script's ``@hydra.main`` function with Hydra's refusals of the command line
    itself (a key that no config file holds, given without ``+``; an option that doesn't
    exist; bad override syntax) as one ``error:`` line naming the nearest valid choice
    (``composition_error``), exit 2, like every other config error. Any other exception keeps
    its traceback (``HYDRA_FULL_ERROR`` is set while it runs, then put back).

    Args:
        main: the decorated function, called without arguments (Hydra reads ``sys.argv``).
        conf_dir, config_name: as ``composition_error``'s.

    Raises:
        SystemExit: 2, after the error line.
    """
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises, instead of printing and exiting 1
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as e:
        overrides = [a for a in sys.argv[1:] if not a.startswith("-")]
        message = composition_error(e, conf_dir, overrides, config_name=config_name)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error


run_command_line.__module__ = "bpjax.cli"

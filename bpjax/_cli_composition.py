"""``bpjax.cli.composition_error``: Hydra's refusal of a command line (a key or an option that
no config file provides) as one line naming the nearest valid choice (re-exported by
``bpjax.cli``). ``composition_error.__module__`` is ``bpjax.cli``, where users import it from."""

from __future__ import annotations

import difflib
import os
import pathlib
import re
from collections.abc import Sequence

from omegaconf import OmegaConf

from bpjax._cli_keys import _INSTANTIATE_KEYS, _suggest, schema_from_conf, target_parameters


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


composition_error.__module__ = "bpjax.cli"  # re-exported there, its public home

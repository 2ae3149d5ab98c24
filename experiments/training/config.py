"""The config as experiments/train.py reads it: where conf/ and the script are, the error a
config that cannot run raises, and small readers of config nodes."""

import pathlib
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bpjax import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"  # as train.py's @hydra.main's config_path
SCRIPT = ROOT / "experiments" / "train.py"


class ConfigError(ValueError):
    """A configuration that cannot run; reported as one line before anything is compiled."""


def _target_name(node: Any) -> str:
    if not isinstance(node, DictConfig):
        return ""
    return str(node.get("_target_", "")).rsplit(".", 1)[-1]


def _takes(node: Any, parameter: str) -> bool:
    """Whether a config node's ``_target_`` takes ``parameter`` (False without a target)."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return False
    names, takes_any, _ = cli.target_parameters(str(node._target_))
    return parameter in names or takes_any


def _model_setting(cfg: DictConfig, key: str) -> Any:
    """``model.<key>`` where the model is one node that has it (not a list of layer specs)."""
    return cfg.model.get(key) if isinstance(cfg.model, DictConfig) else None


def _container(node: DictConfig) -> Any:
    return OmegaConf.to_container(node, resolve=True)

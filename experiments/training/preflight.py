"""What is checked of the data and the model before anything is compiled: the data loaded
(a damaged or missing file is one ``ConfigError``), the batch, monitor, objective and loss
against them, the model's outputs against the data's, and the learning rule against the
network."""

import math
import zipfile
import zlib
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from bpjax._errors import first_line
from bpjax.layers import NeedsImages
from bpjax.reporting import Console
from bpjax.train import check_rule, output_shape, single_output_binary, target_mismatch
from training.config import ConfigError, _model_setting, _takes, _target_name
from training.validation import resolve_monitor_and_objective

# Losses that take logits, and the squashing they apply to them.
_SQUASHED_TWICE = {"softmax_cross_entropy": "softmax", "binary_cross_entropy": "sigmoid"}

# What a data loader raises for a damaged, missing or unreadable file: numpy's np.load raises
# zipfile.BadZipFile for a truncated .npz, EOFError for an empty file, zlib.error for a corrupt
# compressed member; the rest are ValueError (wrong arrays, dtypes, a text file) or OSError.
_DATA_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _data_error(cfg: DictConfig, error: BaseException) -> ConfigError:
    message = str(error) or type(error).__name__
    if not isinstance(error, ValueError | OSError):  # names no file and says little
        message = f"{message} ({type(error).__module__}.{type(error).__name__})"
    path = cfg.dataset.get("path")
    where = f" from {path}" if path and str(path) not in message else ""
    return ConfigError(f"dataset {_target_name(cfg.dataset)} could not be loaded{where}: {message}")


def _load_data(cfg: DictConfig):
    try:
        return instantiate(cfg.dataset, seed=cfg.seed)
    except InstantiationException as e:  # Hydra's wrapper; report the loader's own error
        if isinstance(e.__cause__, _DATA_ERRORS):
            raise _data_error(cfg, e.__cause__) from None
        raise
    except _DATA_ERRORS as e:
        raise _data_error(cfg, e) from None


def _takes_flat(net: Any, batch_size: int, data: Any) -> bool:
    """Whether ``net`` maps the data's examples, flattened, to ``[batch, outputs]`` (an MLP
    given images does; a network with convolutions does not)."""
    try:
        out = output_shape(net, (batch_size, math.prod(data.input_shape)))
    except (NeedsImages, ValueError):
        return False
    return len(out) == 2


def _possessive(name: str) -> str:
    """``mnist's``, ``digits'``."""
    return f"{name}'" if name.endswith("s") else f"{name}'s"


def check_data(cfg: DictConfig, data: Any) -> tuple[str, str]:
    """The batch size, monitor, objective and loss against the loaded data; returns the
    monitor and the objective's name (``resolve_monitor_and_objective``)."""
    trainer = cfg.trainer
    if trainer.batch_size > data.n_train:
        raise ConfigError(
            f"trainer.batch_size={trainer.batch_size} exceeds the {data.n_train} training "
            f"examples of {data.name}"
        )
    monitor, objective_name = resolve_monitor_and_objective(cfg, data)
    mismatch = target_mismatch(_target_name(cfg.loss), data.task, data.y_train)
    if mismatch:
        raise ConfigError(f"loss on {data.name}: {mismatch}")
    return monitor, objective_name


def warn_squashed_twice(cfg: DictConfig, console: Console) -> None:
    """A warning where the model squashes the outputs that the loss squashes itself."""
    squash = _SQUASHED_TWICE.get(_target_name(cfg.loss))
    if squash is not None and _model_setting(cfg, "output_activation") == squash:
        console.say(
            f"bpjax: warning: model.output_activation={squash} before {_target_name(cfg.loss)}, "
            f"which applies {squash} itself to its logits: outputs are squashed twice, which "
            f"usually trains badly (model.output_activation=null gives it logits)",
            err=True,
        )


def check_outputs(cfg: DictConfig, net: Any, data: Any, loss_name: str) -> int:
    """Whether the network takes the data's inputs and maps them to as many outputs as the
    data need; returns its number of outputs."""
    trainer = cfg.trainer
    try:
        out = output_shape(net, (trainer.batch_size, *data.input_shape))
    except NeedsImages as e:
        # Only images loaded flat can be loaded as images: not iris's rows, which stay flat
        # with dataset.flatten=false (a CNN model's config sets it).
        images = len(data.input_shape) == 1 and cfg.dataset.get("flatten") is True
        hint = " (dataset.flatten=false loads them as images)" if images else ""
        raise ConfigError(f"the model takes images [batch, h, w, c]: {e}{hint}") from None
    except ValueError as e:  # a layer that can't take its input: too small for a kernel, ...
        shape = "x".join(map(str, data.input_shape))
        reason = first_line(e) or type(e).__name__
        raise ConfigError(
            f"the model does not fit {_possessive(data.name)} {shape} inputs: {reason}"
        ) from None
    if len(out) != 2:
        # A model that takes them flat (an MLP given images): load them flat, first.
        flat = len(data.input_shape) > 1 and _takes_flat(net, trainer.batch_size, data)
        fix = "dataset.flatten=true loads them flat, or put" if flat else "put"
        raise ConfigError(
            f"the model maps {_possessive(data.name)} {tuple(data.input_shape)} inputs to "
            f"{tuple(out[1:])} per example, not to outputs: {fix} bpjax.flatten() before "
            f"its dense layers"
        )
    n_out = out[-1]
    if n_out != data.n_outputs and not single_output_binary(n_out, data.n_classes, loss_name):
        hint = (
            f" (set model.features=[..., {data.n_outputs}])"
            if _takes(cfg.model, "features")
            else f" (make its last layer {data.n_outputs} wide)"
        )
        raise ConfigError(
            f"the model has {n_out} outputs but {data.name} needs {data.n_outputs}{hint}"
        )
    return n_out


def check_rules(trainer: DictConfig, net: Any, in_shape: tuple[int, ...]) -> dict[str, Any]:
    """The learning rule's options, checked (for every mode), then the rule against the
    network; returns the options."""
    rule_options = {
        "distribution": trainer.feedback_distribution,
        "scale": trainer.feedback_scale,
        "kp_decay": trainer.kp_decay,
    }
    # A bad rule option (checked for every mode), then a rule that can't apply to the network.
    for mode, keys in (
        ("manual", "trainer.feedback_distribution, feedback_scale, kp_decay"),
        (trainer.grad_mode, f"trainer.grad_mode={trainer.grad_mode}"),
    ):
        try:
            check_rule(mode, net, in_shape, rule_options)
        except ValueError as e:
            raise ConfigError(f"{keys}: {e}") from None
    return rule_options

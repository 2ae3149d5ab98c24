"""The top-level `bpjax` namespace: every re-export is the submodule's own object."""

import pathlib
import tomllib

import pytest

import bpjax
from bpjax import credit, data, grad, initializers, layers, losses, train, trainer

# Where each top-level name comes from (a new re-export must be added here).
SOURCES = {
    "FitResult": trainer,
    "GradCheckResult": grad,
    "Layer": layers,
    "Loss": losses,
    "TrainState": train,
    "TrainingDiverged": trainer,
    "activation": layers,
    "as_custom_vjp": grad,
    "batch_norm": layers,
    "avg_pool": layers,
    "check_grads": grad,
    "conv2d": layers,
    "dense": layers,
    "dropout": layers,
    "elu": layers,
    "fit": trainer,
    "flatten": layers,
    "gelu": layers,
    "global_avg_pool": layers,
    "grad_agreement": grad,
    "group_norm": layers,
    "identity": layers,
    "layer_norm": layers,
    "leaky_relu": layers,
    "log_softmax": layers,
    "max_pool": layers,
    "mlp": layers,
    "lenet5": layers,
    "cnn": layers,
    "resnet": layers,
    "relu": layers,
    "serial": layers,
    "sigmoid": layers,
    "silu": layers,
    "softmax": layers,
    "softplus": layers,
    "swish": layers,
    "tanh": layers,
    "value_and_grad": grad,
}
SUBMODULES = {"credit": credit, "data": data, "initializers": initializers, "losses": losses}


def test_all_is_exactly_the_table():
    assert len(bpjax.__all__) == len(set(bpjax.__all__))
    assert set(bpjax.__all__) == set(SOURCES) | set(SUBMODULES)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_reexport_is_the_submodule_object(name):
    assert getattr(bpjax, name) is getattr(SOURCES[name], name)
    assert name in SOURCES[name].__all__  # public where it is defined, too


def test_submodules_are_reachable():
    for name, module in SUBMODULES.items():
        assert getattr(bpjax, name) is module


def test_every_activation_constructor_is_reexported():
    """The activation names that are constructors in `bpjax.layers` are top-level too."""
    for name in layers.ACTIVATIONS:
        if name in layers.__all__:
            assert getattr(bpjax, name) is layers.ACTIVATIONS[name]


def test_version_matches_pyproject():
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert bpjax.__version__ == tomllib.loads(pyproject.read_text())["project"]["version"]


@pytest.mark.parametrize(
    ("error", "limit", "expected"),
    [
        (ValueError("  first\nsecond"), None, "first"),
        (ValueError("abcdef"), 3, "abc"),
        (ValueError(""), None, ""),
        (KeyError("k"), None, "'k'"),
    ],
)
def test_first_line_quotes_an_exception_in_one_line(error, limit, expected):
    from bpjax._errors import first_line

    assert first_line(error, limit) == expected

"""The top-level `bpjax` namespace: every re-export is the submodule's own object."""

import pathlib
import re
import subprocess
import sys
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


def test_every_module_of_the_readme_is_an_attribute_of_bpjax():
    # A trial: bpjax.sweep and bpjax.cli raised AttributeError after `import bpjax` (the others
    # of the README's table were loaded by some import). Loaded when named, in a fresh
    # interpreter: `import bpjax` alone does not import Hydra.
    code = (
        "import sys, bpjax; hydra_first = 'hydra' in sys.modules; "
        f"modules = [getattr(bpjax, m).__name__ for m in {sorted(bpjax._MODULES)!r}]; "
        "print(hydra_first, modules == ['bpjax.' + m for m in sorted(bpjax._MODULES)])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    named = set(re.findall(r"`bpjax\.(\w+)`", readme)) & {
        p.stem for p in pathlib.Path(bpjax.__file__).parent.iterdir() if not p.stem.startswith("_")
    }
    assert named <= set(bpjax._MODULES) | set(SUBMODULES), named
    with pytest.raises(AttributeError, match="module 'bpjax' has no attribute 'swep'"):
        bpjax.swep  # noqa: B018 (the attribute access is the test)


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

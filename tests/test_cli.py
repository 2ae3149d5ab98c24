"""Tests of `bpjax.cli`: config keys against what reads them, strict JSON, the rerun command and
the run directory's resolvers. The real ``conf/`` is the schema wherever one is needed; the
script that uses all of this is tested in ``test_experiments.py``."""

import json
import math
import os
import pathlib
import shlex
import sys

import hydra
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import OmegaConf

from bpjax import cli

CONF = pathlib.Path(__file__).resolve().parents[1] / "conf"

# What each public name of `bpjax.cli` is tested by (a new name must be added here).
TESTED = {
    "bool_parameters": "test_check_bools",
    "check_bools": "test_check_bools",
    "check_keys": "test_check_keys",
    "composition_error": "test_composition_error",
    "hydra_quote": "test_hydra_quote_round_trips",
    "rerun_command": "test_rerun_command_*",
    "run_command_line": "test_run_command_line_*",
    "schema_from_conf": "test_schema_from_conf",
    "strict_json": "test_strict_json",
    "target_parameters": "test_target_parameters",
}


def test_public_names_are_tested():
    assert set(TESTED) == set(cli.__all__)


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity, as strict parsers (JSON.parse, jq) do."""

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_strict_json():
    payload = {
        "nan": math.nan,
        "inf": -math.inf,
        "ok": 0.5,
        "np": np.float32(2.5),
        "np_nan": np.float64("nan"),
        "jax": jnp.asarray(3),
        "array": np.array([1.0, np.inf]),
        "nested": {"t": (1, math.nan), 3: None, "p": pathlib.Path("/a/b")},
        "flag": np.bool_(True),
    }
    text = cli.strict_json(payload)
    assert strict_loads(text) == {
        "nan": None,
        "inf": None,
        "ok": 0.5,
        "np": 2.5,
        "np_nan": None,
        "jax": 3,
        "array": [1.0, None],
        "nested": {"t": [1, None], "3": None, "p": "/a/b"},
        "flag": True,
    }
    assert "NaN" not in text and "Infinity" not in text
    with pytest.raises(TypeError, match=r"nested\.obj: cannot write object"):
        cli.strict_json({"nested": {"obj": object()}})
    with pytest.raises(ValueError, match="not strict JSON"):  # the parser the tests use
        strict_loads(json.dumps({"x": math.nan}))


def _takes_any(a, *, b=1, **kwargs):
    del a, b, kwargs  # unused: only the signature matters


def test_target_parameters():
    names, takes_any, required = cli.target_parameters("optax.sgd")
    assert names[:3] == ["learning_rate", "momentum", "nesterov"] and not takes_any
    assert required == ["learning_rate"]
    assert cli.target_parameters(optax.sgd) == (names, takes_any, required)
    assert cli.target_parameters(_takes_any) == (["a", "b"], True, ["a"])
    assert "seed" in cli.target_parameters("bpjax.data.digits")[0]
    with pytest.raises(LookupError, match=r"bpjax has no 'mlpp' \(did you mean bpjax.mlp\?\)"):
        cli.target_parameters("bpjax.mlpp")
    with pytest.raises(LookupError, match=r"optax has no 'sgdd'.*optax\.sgd"):
        cli.target_parameters("optax.sgdd")
    with pytest.raises(LookupError, match="no module 'nosuchpackage'"):
        cli.target_parameters("nosuchpackage.f")


def test_schema_from_conf():
    schema = cli.schema_from_conf(CONF)
    trainer = OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / "default.yaml"))
    logger = OmegaConf.to_container(OmegaConf.load(CONF / "logger" / "tensorboard.yaml"))
    assert schema["trainer"] == list(trainer) and schema["logger"] == list(logger)
    # groups whose default names a _target_ are checked against its signature instead
    for group in ("dataset", "model", "loss", "optimizer", "schedule"):
        assert schema[group] is None
    assert set(schema) == {
        "seed",
        "objective",
        *("dataset", "model", "loss", "optimizer", "schedule", "trainer", "logger"),
    }


def test_schema_from_conf_lists_a_section_of_the_primary_file():
    # compare_rules.yaml's compare and benchmark.yaml's sections: their keys, not None; an
    # empty mapping (benchmark.yaml's rules.options is nested; gradcheck.yaml's fd_eps: {})
    # and a list (gradcheck.yaml's image_architectures) take any keys.
    assert cli.schema_from_conf(CONF, "compare_rules")["compare"] == ["rules", "seeds"]
    bench = cli.schema_from_conf(CONF, "benchmark")
    assert bench["rules"] == ["points", "modes", "options", "epochs", "donate"]
    assert bench["profile"] is None and bench["grid"] is None
    gradcheck = cli.schema_from_conf(CONF, "gradcheck")
    assert gradcheck["fd_eps"] is None and gradcheck["image_architectures"] is None


SCHEMA = cli.schema_from_conf(CONF)
SUPPLIED = {"dataset": ["seed"]}

# config fragment -> the words its single problem must contain ([] for no problem). Each is
# merged over a valid base below.
KEY_CASES = {
    "valid": ({}, []),
    "optimizer typo": (
        {"optimizer": {"learning_rte": 0.5}},
        ["optimizer.learning_rte is not a parameter of optax.sgd", "optimizer.learning_rate?"],
    ),
    "optimizer parameter of another target": (
        {"optimizer": {"b1": 0.9}},  # adam's, not sgd's
        ["optimizer.b1 is not a parameter of optax.sgd"],
    ),
    "logger": (
        {"logger": {"flush_sec": 3}},
        ["logger.flush_sec is not a setting, and nothing reads it", "logger.flush_secs?"],
    ),
    "trainer": ({"trainer": {"epoch": 3}}, ["trainer.epoch", "trainer.epochs?"]),
    "top level": ({"sed": 1}, ["sed is not a setting", "did you mean seed?"]),
    # nothing near: no dangling colon before the list ("bogus is not a setting: (top-level")
    "no near key": (
        {"trainer": {"zzzzzz": 1}},
        ["trainer.zzzzzz is not a setting, and nothing reads it (trainer settings: epochs"],
    ),
    "no near top-level key": ({"zzzzzz": 1}, ["zzzzzz is not a setting (top-level keys: seed"]),
    "no near parameter": (
        {"optimizer": {"qqqq": 1}},
        ["optimizer.qqqq is not a parameter of optax.sgd (optax.sgd takes learning_rate"],
    ),
    "supplied": ({"dataset": {"seed": 3}}, ["dataset.seed is set by the script itself"]),
    "unknown target": (
        {"model": {"_target_": "bpjax.mlpp"}},
        ["model._target_=bpjax.mlpp", "did you mean bpjax.mlp?"],
    ),
    "required": ({"loss": {"_target_": "bpjax.losses.huber", "dlta": 1.0}}, ["loss.dlta"]),
    "nested target": (
        {"model": {"w_init": {"_target_": "jax.nn.initializers.normal", "stdev": 1.0}}},
        ["model.w_init.stdev is not a parameter of jax.nn.initializers.normal", "stddev?"],
    ),
    "layer list": (
        {
            "model": [
                {"_target_": "bpjax.dense", "n_out": 4},
                {"_target_": "bpjax.dense", "nout": 2},
            ]
        },
        ["model[1].nout is not a parameter of bpjax.dense", "model[1].n_out?"],
    ),
    "missing required": (
        {"model": {"_target_": "bpjax.dense", "_partial_": False}},
        ["model needs model.n_out", "bpjax.dense has no default for it"],
    ),
    "partial may leave it out": ({"optimizer": {"_target_": "optax.sgd", "_partial_": True}}, []),
    "kwargs": ({"model": {"_target_": "test_cli._takes_any", "a": 1, "anything": 2}}, []),
}


def _base() -> dict:
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra.compose("config", overrides=["dataset=digits", "optimizer=sgd"])
    return OmegaConf.to_container(cfg, resolve=False)


@pytest.mark.parametrize("case", list(KEY_CASES))
def test_check_keys(case):
    fragment, words = KEY_CASES[case]
    config = _base()
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            if "_target_" in value:  # another target: replace the group
                config[key] = value
            else:
                config[key] = {**config[key], **value}
        else:
            config[key] = value
    problems = cli.check_keys(config, SCHEMA, supplied=SUPPLIED)
    if not words:
        assert problems == []
        return
    assert len(problems) == 1, problems
    for word in words:
        assert word in problems[0]


def test_every_problem_is_reported():
    config = _base()
    config["trainer"]["epoch"] = 1
    config["optimizer"]["lr"] = 1
    config["bogus"] = 1
    problems = cli.check_keys(config, SCHEMA, supplied=SUPPLIED)
    assert [p.split(" ", 1)[0] for p in problems] == ["optimizer.lr", "trainer.epoch", "bogus"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.epoch=3"], "trainer.epoch is not a setting: did you mean trainer.epochs?"),
        (["dataset.pth=x"], "dataset.pth is not a setting: did you mean dataset.path?"),
        (["sed=1"], "sed is not a setting: did you mean seed?"),
        # a parameter the target takes but no file sets: Hydra wants the +
        (["optimizer=sgd", "optimizer.nesterov=true"], "add it: +optimizer.nesterov=..."),
        (
            ["dataset=digitz"],
            "dataset=digitz: no such option (no conf/dataset/digitz.yaml): did you mean "
            "dataset=digits?",
        ),
        (["trainer.epochs=["], "trainer.epochs=[: "),
        # the chosen option's keys (a _global_ image model file), not the default mlp's
        (["model=cnn", "model.chanels=[4]"], "did you mean model.channels?"),
        (["model=lenet5", "model.n_clases=3"], "did you mean model.n_classes?"),
        (["model=cnn", "model.feature=[3]"], "model.feature is not a setting (nothing reads"),
    ],
)
def test_composition_error(overrides, message):
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises((ConfigCompositionException, OverrideParseException)) as info:
            hydra.compose("config", overrides=overrides)
    line = cli.composition_error(info.value, CONF, overrides)
    assert message in line
    assert "\n" not in line


@pytest.mark.parametrize(
    ("config_name", "override", "message"),
    [
        # gradcheck.yaml's keys, not config.yaml's (a trial: Hydra's raw error for batchsize=4)
        ("gradcheck", "batchsize=4", "batchsize is not a setting: did you mean batch?"),
        # a node of the primary file itself: compare_rules.yaml's compare
        (
            "compare_rules",
            "compare.rulez=[manual]",
            "compare.rulez is not a setting: did you mean compare.rules?",
        ),
    ],
)
def test_composition_error_of_another_primary_config(config_name, override, message):
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as info:
            hydra.compose(config_name, overrides=[override])
    line = cli.composition_error(info.value, CONF, [override], config_name=config_name)
    assert line == f"{message} (nothing reads it)"


def test_composition_error_of_a_key_of_an_empty_mapping_says_add_it():
    # benchmark.yaml's rules.options is {}: "rules.options.kp_decay is not a setting (nothing
    # reads it)" said that a key the benchmark reads does not exist (a trial).
    override = "rules.options.kp_decay=0.001"
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as info:
            hydra.compose("benchmark", overrides=[override])
    line = cli.composition_error(info.value, CONF, [override], config_name="benchmark")
    assert line == (
        "rules.options.kp_decay is not in this config; to give it, add it: "
        "+rules.options.kp_decay=... (rules.options is empty by default: every key given to it "
        "needs the +)"
    )


def _compose_main(overrides):
    def main():
        with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            hydra.compose("config", overrides=overrides)
        assert os.environ["HYDRA_FULL_ERROR"] == "1"  # Hydra raises while it runs
        raise RuntimeError("any other error keeps its traceback")

    return main


def test_run_command_line_says_a_refused_command_line_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "trainer.epoch=3"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.run_command_line(_compose_main(["trainer.epoch=3"]), CONF)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "error: trainer.epoch is not a setting: did you mean trainer.epochs? (nothing reads it)\n"
    )
    assert "HYDRA_FULL_ERROR" not in os.environ  # put back as it was


def test_run_command_line_lets_other_errors_through(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(RuntimeError, match="any other error keeps its traceback"):
        cli.run_command_line(_compose_main([]), CONF)
    assert os.environ["HYDRA_FULL_ERROR"] == "0"


@pytest.mark.parametrize(
    "value",
    [
        "/tmp/run",
        "outputs/2026-01-02/10-11-12",
        "/tmp/my run",
        "/tmp/a,b",
        "/tmp/it's",
        "/tmp/x=y",
        "/tmp/[x]",
        "/tmp/{a: 1}",
        "C:\\runs\\x",
        "/tmp/ends\\",
        "/tmp/q\\'s",
        "/tmp/user@host:8",
        "/tmp/50%",
    ],
)
def test_hydra_quote_round_trips(value):
    quoted = cli.hydra_quote(value)
    override = OverridesParser.create().parse_override(f"trainer.run_dir={quoted}")
    assert override.value() == value
    assert shlex.split(shlex.join([f"trainer.run_dir={quoted}"])) == [f"trainer.run_dir={quoted}"]


def test_rerun_command_uses_the_project_venv_relative_to_cwd(tmp_path, monkeypatch):
    project = tmp_path / "project"
    python = project / ".venv" / "bin" / "python"
    script = project / "experiments" / "train.py"
    monkeypatch.setattr(sys, "executable", str(python))
    args = ["model.features=[16,10]", "trainer.run_dir='/tmp/my run'"]
    command = cli.rerun_command(script, args, cwd=project, project_root=project)
    assert command == (
        ".venv/bin/python experiments/train.py 'model.features=[16,10]' "
        "'trainer.run_dir='\"'\"'/tmp/my run'\"'\"''"
    )
    assert shlex.split(command)[2:] == args  # the shell hands Hydra the overrides unchanged
    below = cli.rerun_command(script, [], cwd=project / "experiments", project_root=project)
    assert shlex.split(below) == ["../.venv/bin/python", "train.py"]


def test_rerun_command_is_absolute_outside_the_project(tmp_path, monkeypatch):
    project = tmp_path / "project"
    elsewhere = tmp_path / "elsewhere"
    script = project / "experiments" / "train.py"
    # another venv (not the project's): absolute, as is a cwd outside the project
    monkeypatch.setattr(sys, "executable", str(tmp_path / "env" / "bin" / "python"))
    command = cli.rerun_command(script, ["seed=1"], cwd=project, project_root=project)
    assert shlex.split(command) == [
        str(tmp_path / "env/bin/python"),
        "experiments/train.py",
        "seed=1",
    ]
    monkeypatch.setattr(sys, "executable", str(project / ".venv" / "bin" / "python"))
    command = cli.rerun_command(script, [], cwd=elsewhere, project_root=project)
    assert shlex.split(command) == [str(project / ".venv/bin/python"), str(script)]


def test_rerun_command_runs_the_current_interpreter(tmp_path):
    command = cli.rerun_command(tmp_path / "x.py", [], cwd=tmp_path, project_root=tmp_path)
    assert shlex.split(command)[0] == os.path.abspath(sys.executable)


def test_resolvers(tmp_path):
    cfg = OmegaConf.create(
        {
            "trainer": {"run_dir": None},
            "run": "${bpjax.run_dir:${trainer.run_dir},'outputs/new'}",
            "out": str(tmp_path),
            "subdir": "${bpjax.hydra_subdir:${out}}",
        }
    )
    assert cfg.run == "outputs/new"
    cfg.trainer.run_dir = "/runs/a"
    assert cfg.run == "/runs/a"
    assert cfg.subdir == ".hydra"  # a new run directory
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    later = cfg.subdir
    assert later.startswith(".hydra/") and len(later) == len(".hydra/2026-01-02_10-11-12")


def test_check_bools():
    assert cli.bool_parameters("bpjax.cnn") >= {"batch_norm"}
    assert "channels" not in cli.bool_parameters("bpjax.cnn")
    defaults = {"trainer": {"progress": True, "epochs": 3}}
    good = {
        "trainer": {"progress": False, "epochs": "x"},  # epochs: not a bool setting
        "model": {"_target_": "bpjax.cnn", "batch_norm": True},
    }
    assert cli.check_bools(good, defaults) == []
    bad = {
        "trainer": {"progress": "maybe"},
        "model": {
            "_target_": "bpjax.serial",
            "_args_": [
                {"_target_": "bpjax.conv2d", "n_out": 4, "kernel_size": 3, "use_bias": "no"}
            ],
        },
        "other": {"_target_": "bpjax.cnn", "batch_norm": "flase"},
    }
    assert cli.check_bools(bad, defaults) == [
        "trainer.progress must be true or false, got 'maybe'",
        "model._args_[0].use_bias must be true or false, got 'no'",
        "other.batch_norm must be true or false, got 'flase'",
    ]

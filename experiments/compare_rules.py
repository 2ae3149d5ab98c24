"""Train one network under several learning rules, with the same seeds: one table, one plot.

    python experiments/compare_rules.py experiment=fa_mnist
    python experiments/compare_rules.py experiment=dfa_mnist \
        'compare.rules=[manual,direct_feedback_alignment]' 'compare.seeds=[0,1,2]'
    python experiments/compare_rules.py dataset=digits model.features=[64,10] trainer.epochs=5
    python experiments/compare_rules.py -m experiment=fa_mnist,dfa_mnist   # one comparison a job

Every key of ``conf/config.yaml`` (dataset, model, optimizer, trainer, experiment, ...) applies
to every rule; ``compare.rules`` (default: backprop, ``manual``, and the four rules of
``bpjax.credit``) and ``compare.seeds`` say what runs. Each (rule, seed) is one run of
``experiments/train.py``'s ``train(cfg)`` with ``trainer.grad_mode=<rule> seed=<seed>`` in
``<run dir>/<rule>/seed<seed>/`` (its ``metrics.json``, TensorBoard events and checkpoints:
``tensorboard --logdir <run dir>`` shows the rules side by side, and ``hydra.run.dir=<run dir>
trainer.resume=true`` continues an interrupted comparison, whose plot still shows every epoch
(each run keeps its curves in ``curves.json``) and whose table marks the resumed runs' timings;
Ctrl-C or SIGTERM stops it checkpointed, with that command, exit 130 or 143).
The run directory gets:

* ``comparison.csv``: one row per rule and seed: status (``completed``, ``diverged`` or
  ``skipped``) and why, the test metric (of the parameters of the best epoch, by
  ``trainer.monitor``) and that epoch, every final angle of ``metrics.json``
  (``alignment/...``: the last measured, in degrees), the training examples/s (chunks that
  compiled their program left out: ``fit``'s ``examples_per_second``), the wall time of ``fit``
  (compilation included) and the run's compilations.
* ``comparison.md``: one row per rule: test metric of the best epoch and the seeds' best
  epochs, final total angle and per-layer angles (of each layer's update to the true
  gradient), examples/s without compilation, wall time with it (a seed's run may compile what
  the next reuses: its wall time is not theirs); the mean over seeds, ``± sd`` with more than
  one. A rule that can't apply to the network is listed as skipped, with the reason.
* ``comparison.png``: the test metric (accuracy, or RMSE for regression) after every epoch and the
  total alignment angle per epoch (fractional epochs: measured every
  ``trainer.grad_check_every`` steps), one line per rule (the mean over seeds).

The runs are ``train(cfg)`` calls in this process, not subprocesses: each rule's config is the
composed config with two keys changed (so every override, sweep value and preset reaches it
unchanged, with nothing to forward), the epoch records that the plot needs come back through
``train``'s ``callbacks``, and whether a rule applies is asked of ``bpjax.train.check_rule``
before anything trains. A run that diverges is recorded as such and the comparison goes on.
"""

import importlib.util
import pathlib
import signal
import sys
from collections.abc import Sequence
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

import bpjax.cli  # (also registers the resolvers conf/config.yaml uses)
from bpjax import sweep
from bpjax._atomic import atomic_write_text
from bpjax.grad import MODES
from bpjax.train import check_rule

if str(pathlib.Path(__file__).resolve().parent) not in sys.path:  # as a script, it is there
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from comparing.report import (
    Curves,
    format_table,
    plot,
    write_csv,
)

__all__ = ["Curves", "format_table", "plot", "write_csv"]  # re-exported: the script's parts

ROOT = pathlib.Path(__file__).resolve().parents[1]
_TRAIN_SCRIPT: list[Any] = []


def train_script() -> Any:
    """``experiments/train.py`` as a module (``experiments`` is not a package). Loaded when first
    needed, not at import: sweep launchers rebuild ``main`` in their workers by value."""
    if not _TRAIN_SCRIPT:
        spec = importlib.util.spec_from_file_location(
            "bpjax_experiments_train", ROOT / "experiments" / "train.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TRAIN_SCRIPT.append(module)
    return _TRAIN_SCRIPT[0]


class CompareConfigError(ValueError):
    """A ``compare.*`` setting that cannot run; reported as one line."""


def check_compare(cfg: DictConfig) -> tuple[list[str], list[int]]:
    """``compare.rules`` and ``compare.seeds``, checked: lists, known, distinct, non-empty;
    and no other ``compare`` key (``+compare.rulez=...`` was ignored)."""
    problems = bpjax.cli.check_keys(
        {"compare": OmegaConf.to_container(cfg.compare, resolve=False)},
        bpjax.cli.schema_from_conf(ROOT / "conf", "compare_rules"),
    )
    if problems:
        raise CompareConfigError(problems[0])
    for key in ("rules", "seeds"):  # a bare string would be read letter by letter
        if not isinstance(cfg.compare[key], ListConfig):
            example = "[manual,feedback_alignment]" if key == "rules" else "[0,1,2]"
            raise CompareConfigError(
                f"compare.{key} must be a list, e.g. compare.{key}={example}; "
                f"got {cfg.compare[key]!r}"
            )
    rules, seeds = list(cfg.compare.rules), list(cfg.compare.seeds)
    if not rules:
        raise CompareConfigError(f"compare.rules is empty: name at least one of {', '.join(MODES)}")
    unknown = [r for r in rules if r not in MODES]
    if unknown or len(set(rules)) != len(rules):
        raise CompareConfigError(
            f"compare.rules must be distinct modes of {', '.join(MODES)}, got {rules}"
        )
    if (
        not seeds
        or len(set(seeds)) != len(seeds)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise CompareConfigError(
            f"compare.seeds must be distinct non-negative integers, got {seeds}"
        )
    return rules, seeds


# What compare_rules sets for each run itself, and where to say it instead.
PER_RUN = {"seed": "compare.seeds", "trainer.grad_mode": "compare.rules"}


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuses a command line that sets what each run's config gets from ``compare``
    (``seed=5`` ran seed 0, ``trainer.grad_mode=kolen_pollack`` the listed rules: silently).

    Raises:
      CompareConfigError: ``seed`` or ``trainer.grad_mode`` among ``overrides`` (Hydra's, as
        given: ``seed=5``, ``+seed=5``, ``~seed``).
    """
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in PER_RUN:
            raise CompareConfigError(
                f"{override}: compare_rules sets {key} for each run; give {PER_RUN[key]}="
                f"[...] instead"
            )


def skipped_rules(rules: Sequence[str], net: Any, in_shape: tuple[int, ...]) -> dict[str, str]:
    """The rules that can't apply to ``net``, with the reason (``bpjax.train.check_rule``)."""
    reasons = {}
    for rule in rules:
        try:
            check_rule(rule, net, in_shape)
        except ValueError as e:
            reasons[rule] = str(e)
    return reasons


def rule_config(cfg: DictConfig, rule: str, seed: int, run_dir: pathlib.Path) -> DictConfig:
    """The composed config of one run: ``cfg`` without ``compare``, with the rule, the seed
    and the run's own directory."""
    one = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(one):
        del one["compare"]
        one.trainer.grad_mode = rule
        one.trainer.run_dir = str(run_dir)
        one.seed = seed
    return one


def compare(cfg: DictConfig, run_dir: pathlib.Path) -> list[dict[str, Any]]:
    """Runs every (rule, seed) of ``cfg.compare`` and writes the table, CSV and plot into
    ``run_dir``; returns the CSV's rows.

    Raises:
      CompareConfigError: bad ``compare.rules`` or ``compare.seeds``.
      ValueError (``experiments/train.py``'s ConfigError, ResumeError), FileNotFoundError: a
        config that can't run, before anything trains.
    """
    rules, seeds = check_compare(cfg)
    script = train_script()
    script.validate(rule_config(cfg, "manual", seeds[0], run_dir))  # one error, before any run
    try:  # each run loads it again: not kept
        data = instantiate(cfg.dataset, seed=cfg.seed)
    except InstantiationException as e:  # Hydra's wrapper; report the loader's own error
        if isinstance(e.__cause__, FileNotFoundError):
            raise e.__cause__ from None
        if isinstance(e.__cause__, ValueError):
            raise script.ConfigError(str(e.__cause__)) from None
        raise
    net = instantiate(cfg.model, _convert_="all")
    batch_size = min(cfg.trainer.batch_size, data.n_train)  # train() refuses a larger one
    skipped = skipped_rules(rules, net, (batch_size, *data.input_shape))
    if len(skipped) == len(rules):  # nothing would train: a comparison of nothing
        reasons = "; ".join(skipped.values())  # each names its rule
        raise CompareConfigError(f"no rule of compare.rules applies to this network: {reasons}")
    task_metric = "accuracy" if data.task == "classification" else "rmse"
    steps_per_epoch = data.n_train // batch_size
    title = f"{data.name}: {net.name}, seeds {', '.join(map(str, seeds))}"
    del data
    run_dir.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for rule in rules:
        for seed in seeds:
            row = {"rule": rule, "seed": seed, "status": "skipped", "reason": skipped.get(rule)}
            if rule in skipped:
                rows.append(row)
                continue
            directory = run_dir / rule / f"seed{seed}"
            curves_file = directory / "curves.json"
            if not cfg.trainer.resume:  # a fresh run's curve starts empty
                curves_file.unlink(missing_ok=True)
            curve = Curves(task_metric, steps_per_epoch, curves_file)
            print(f"compare_rules: {rule}, seed {seed} -> {directory}", flush=True)
            metrics = script.train(rule_config(cfg, rule, seed, directory), callbacks=[curve])
            row.update(
                {k: v for k, v in metrics.items() if isinstance(v, int | float | str)},
                status=metrics["status"],
                reason=metrics.get("message", ""),
                run_dir=str(directory.relative_to(run_dir)),
            )
            rows.append(row)
            curves.setdefault(rule, []).append(curve)
    table = format_table(rows, rules, task_metric)
    every, total = cfg.trainer.grad_check_every, steps_per_epoch * cfg.trainer.epochs
    if not every:
        table += "\n\nAngles: not measured (trainer.grad_check_every=0)."
    elif every >= total:
        # one measurement, at step 0: every feedback rule then shows its initial angle
        table += (
            f"\n\nAngles: measured once, at step 0 (trainer.grad_check_every={every}, "
            f"{total} steps in all): the angles at initialization, not after training; "
            f"set trainer.grad_check_every below {total} to follow them."
        )
        print(f"compare_rules: warning: {table.rsplit(chr(10), 1)[-1]}", file=sys.stderr)
    atomic_write_text(run_dir / "comparison.md", f"# {title}\n\n{table}\n")
    write_csv(run_dir / "comparison.csv", rows, task_metric)
    plot(run_dir / "comparison.png", curves, task_metric, title)
    print(f"\ncompare_rules ({run_dir / 'comparison.md'}):\n{table}", flush=True)
    return rows


@hydra.main(config_path="../conf", config_name="compare_rules", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = pathlib.Path(HydraConfig.get().runtime.output_dir)
    script = train_script()
    # SIGTERM interrupts as Ctrl-C does (it killed the comparison at once, saying nothing); the
    # fit loop holds either until its state is checkpointed.
    signal.signal(signal.SIGTERM, script._raise_interrupt)
    try:
        check_overrides(HydraConfig.get().overrides.task)
        compare(cfg, run_dir)
    except (CompareConfigError, script.ConfigError, script.ResumeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the runs so far are checkpointed
        print(f"\n{interrupted_message(run_dir)}", file=sys.stderr, flush=True)
        sys.exit(script.interrupt_status(e))  # 128 + the signal: Ctrl-C 130, SIGTERM 143


def interrupted_message(run_dir: pathlib.Path) -> str:
    """What an interrupted comparison says: where its runs are and the command that continues
    it (this call's overrides, its run directory and ``trainer.resume=true``, run by the
    interpreter running now)."""
    task = HydraConfig.get().overrides.task
    keep = [o for o in task if o.split("=", 1)[0] not in ("hydra.run.dir", "trainer.resume")]
    resume = [f"hydra.run.dir={bpjax.cli.hydra_quote(str(run_dir))}", "trainer.resume=true"]
    command = bpjax.cli.rerun_command(
        __file__, [*keep, *resume], cwd=hydra.utils.get_original_cwd(), project_root=ROOT
    )
    return f"interrupted: the runs done so far are in {run_dir}; continue with: {command}"


if __name__ == "__main__":
    sweep.pickle_by_value("comparing")  # for submitit's jobs
    # Hydra's refusals of the command line (compare.rulez=..., trainer.epoch=1) as one line
    bpjax.cli.run_command_line(main, ROOT / "conf", config_name="compare_rules")

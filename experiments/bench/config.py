"""The benchmark's settings, checked before anything is compiled: one error names what is wrong."""

from typing import Any

from omegaconf import DictConfig, OmegaConf

from bpjax import credit, layers
from bpjax.grad import MODES as GRAD_MODES
from bpjax.train import check_rule

from .paths import PATHS
from .points import check_grid, instantiate_model, is_mlp
from .targets import ESTIMATORS


def names_of(value: Any) -> list[str]:
    """A config list of names (a single string is a list of one; None is empty)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _known(what: str, names: list[str], grid: list[str], quick: bool = False) -> None:
    unknown = [name for name in names if name not in grid]
    if unknown:
        shrunk = " (quick=true keeps quick_settings.points only)" if quick else ""
        raise ValueError(f"{what}: unknown grid points {unknown}; the grid has {grid}{shrunk}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{what}: each grid point at most once, got {repeated} more than once")


def rule_options(cfg: DictConfig) -> dict[str, Any] | None:
    """The learning rules' options of the benchmark (``rules.options``), None if empty."""
    return OmegaConf.to_container(cfg.rules.options, resolve=True) or None


def _check_rule(rule: str, spec: dict[str, Any], options: dict[str, Any], where: str) -> None:
    """The rule exists, takes these options and applies to the point's network."""
    if rule not in credit.RULES:
        valid = ", ".join(credit.RULES)
        raise ValueError(f"{where}: unknown learning rule {rule!r}; valid: {valid}")
    if is_mlp(spec):
        net = layers.mlp(list(spec["features"][1:]), activation=spec["activation"])
        in_shape = (spec["batch"], spec["features"][0])
    else:
        net, in_shape = instantiate_model(spec), (spec["batch"], *spec["input_shape"])
    try:
        check_rule(rule, net, in_shape, options)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def rule_modes(cfg: DictConfig) -> list[str]:
    """The learning rules whose steps are timed: ``rules.modes``, or every rule (None)."""
    modes = cfg.rules.modes
    return list(credit.RULES) if modes is None else names_of(modes)


def rule_points(cfg: DictConfig, grid: list[dict[str, Any]]) -> list[str]:
    """The points whose rule steps are timed: ``rules.points``, or every MLP point (None)."""
    names = cfg.rules.points
    return [s["name"] for s in grid if is_mlp(s)] if names is None else names_of(names)


def check_config(cfg: DictConfig, grid: list[dict[str, Any]]) -> None:
    """Checks every setting that can fail, before any compilation.

    Raises:
      ValueError: a bad grid (``points.check_grid``); an unknown ``targets.ratio``; ``paths``
        empty, repeated, unknown or without ``make_step`` (the points' headline figures);
        unknown points in ``profile``, ``rules.points``, ``grad_check.point`` or
        ``chunked.points``; ``profile_calls`` or ``profile_top`` below 1 where ``profile``
        names a point; a rule point that is not an MLP; an unknown rule or mode; rule
        options ``bpjax.train.check_rule`` refuses, or a rule that can't apply to its point;
        ``grad_check.every`` below 1; ``chunked.chunk_steps`` below 0.
    """
    check_grid(grid)
    names = [spec["name"] for spec in grid]
    quick = bool(cfg.get("quick"))
    specs = {spec["name"]: spec for spec in grid}
    if cfg.targets.ratio not in ESTIMATORS:
        raise ValueError(
            f"unknown targets.ratio {cfg.targets.ratio!r}; valid: {', '.join(ESTIMATORS)}"
        )
    paths = names_of(cfg.paths)
    unknown = [path for path in paths if path not in PATHS]
    if unknown or len(set(paths)) != len(paths) or "make_step" not in paths:
        raise ValueError(
            f"paths must name each of {', '.join(PATHS)} at most once, make_step included "
            f"(the points' headline figures are its), got {paths}"
        )
    profiled = names_of(cfg.get("profile"))
    _known("profile", profiled, names, quick)
    for key in ("profile_calls", "profile_top") if profiled else ():  # 0 calls: none traced
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer to profile, got {value!r}")
    options = rule_options(cfg) or {}
    rule_names = rule_points(cfg, grid)
    _known("rules.points", rule_names, names, quick)
    not_mlp = [name for name in rule_names if not is_mlp(specs[name])]
    if not_mlp:
        raise ValueError(f"rules.points: the rules are timed on MLP points; {not_mlp} are not")
    for rule in rule_modes(cfg):
        for name in rule_names:
            _check_rule(rule, specs[name], options, f"rules.modes ({name})")
    if cfg.grad_check.point is not None:
        _known("grad_check.point", [cfg.grad_check.point], names, quick)
        if int(cfg.grad_check.every) < 1:
            raise ValueError(f"grad_check.every must be >= 1, got {cfg.grad_check.every}")
        spec = specs[cfg.grad_check.point]
        _check_rule(cfg.grad_check.rule, spec, options, "grad_check.rule")
    _known("chunked.points", names_of(cfg.chunked.points), names, quick)
    if cfg.chunked.mode not in GRAD_MODES:
        raise ValueError(
            f"chunked.mode: unknown mode {cfg.chunked.mode!r}; valid: {', '.join(GRAD_MODES)}"
        )
    chunk_steps = cfg.chunked.chunk_steps
    if chunk_steps is not None and (not isinstance(chunk_steps, int) or chunk_steps < 0):
        raise ValueError(f"chunked.chunk_steps must be an integer >= 0 or null, got {chunk_steps}")
    for name in names_of(cfg.chunked.points):
        if cfg.chunked.mode in credit.RULES:
            _check_rule(cfg.chunked.mode, specs[name], options, f"chunked.mode ({name})")

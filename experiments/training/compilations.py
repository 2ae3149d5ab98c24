"""Compilations counted, for the record's ``compilations`` and the final line: one counter
and one listener per process, however train.py is loaded (as ``__main__``, through runpy, as a
module of a test, or rebuilt by a sweep launcher's worker)."""

from typing import Any

import jax

# Compilations are counted through jax's monitoring events: one per XLA backend compile, and
# one per program loaded from jax's persistent compilation cache instead (where one is set:
# JAX_COMPILATION_CACHE_DIR), so the count is the same with and without the cache.
_COMPILATIONS = [0]
_COMPILATION_EVENTS = (
    "/jax/core/compile/backend_compile_duration",
    "/jax/compilation_cache/cache_retrieval_time_sec",  # recorded on cache hits only
)


def _count_compilation(event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs  # unused: only the count matters
    if event in _COMPILATION_EVENTS:
        _COMPILATIONS[0] += 1


_LISTENING: list[bool] = []


def _listen_for_compilations() -> None:
    # At the first train(), not at import: submitit's workers rebuild this module's functions
    # by value, without running its top level.
    if not _LISTENING:
        jax.monitoring.register_event_duration_secs_listener(_count_compilation)
        _LISTENING.append(True)


def compilations_so_far() -> int:
    """The compilations this process has counted (read through this module: a sweep launcher
    rebuilds train.py's ``train`` in its workers by value, with a copy of any list it holds)."""
    return _COMPILATIONS[0]

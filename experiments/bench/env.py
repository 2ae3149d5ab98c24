"""The environment record (device, versions, CPU, load) and the instruction set XLA may use.

XLA's CPU backend generates code for the host's widest instruction set unless
``XLA_FLAGS=--xla_cpu_max_isa=<ISA>`` caps it; the cap is read once, when the backend starts,
and an ISA name XLA does not know only logs a warning and is ignored. So the benchmark checks
the name itself (``ISAS``), sets the flag before the backend starts (``request_max_isa``), and
records in every run which ISA the host has (``cpu_isa``), which cap was set
(``xla_cpu_max_isa``) and so which ISA XLA's generated code used (``isa``).

XLA documents the flag for its LLVM code generation (the fused elementwise, reduction and loop
kernels it emits). Library kernels it calls (YNNPACK's matmul fusions, Eigen, oneDNN) dispatch
on the CPU themselves; whether they follow the cap is not established here, so a capped run
reproduces an AVX2 host's XLA-generated code, not necessarily its matmuls.
"""

import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jaxlib
import optax

# The values of --xla_cpu_max_isa, oldest first per architecture (XLA's
# xla/backends/cpu/codegen/cpu_features.cc, CpuFeatureFromString), and the /proc/cpuinfo flag
# that shows each on a host.
X86_ISAS = ("SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX", "AMX_FP16")
ARM_ISAS = ("NEON", "SVE", "SVE2")
ISAS = X86_ISAS + ARM_ISAS
_CPU_FLAG = {
    "SSE4_2": "sse4_2",
    "AVX": "avx",
    "AVX2": "avx2",
    "AVX512": "avx512f",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX": "amx_bf16",
    "AMX_FP16": "amx_fp16",
    "NEON": "asimd",
    "SVE": "sve",
    "SVE2": "sve2",
}
_FLAG = "--xla_cpu_max_isa"


def check_isa(isa: str, where: str) -> str:
    """``isa`` in XLA's spelling (upper case).

    Raises:
      ValueError: a name that is not a value of ``--xla_cpu_max_isa`` (XLA would ignore it).
    """
    name = str(isa).upper()
    if name not in ISAS:
        raise ValueError(
            f"{where}: unknown ISA {isa!r} (XLA would only log a warning and ignore it); "
            f"valid: {', '.join(ISAS)}"
        )
    return name


def parse_max_isa(xla_flags: str | None) -> str | None:
    """The ``--xla_cpu_max_isa`` value in an ``XLA_FLAGS`` string (the last one wins), or None.

    Raises:
      ValueError: a value XLA does not know.
    """
    value = None
    for token in (xla_flags or "").split():
        if token.startswith(_FLAG + "="):
            value = token.split("=", 1)[1]
    return None if value is None else check_isa(value, f"XLA_FLAGS {_FLAG}")


def cpu_isa(flags: Iterable[str]) -> str | None:
    """The newest ``--xla_cpu_max_isa`` value whose instructions the CPU flags show, or None.

    Args:
      flags: the host's CPU flags (``/proc/cpuinfo``'s ``flags`` or ``Features``).
    """
    present = set(flags)
    for family in (X86_ISAS, ARM_ISAS):
        found = [isa for isa in family if _CPU_FLAG[isa] in present]
        if found:
            return found[-1]
    return None


def effective_isa(host: str | None, cap: str | None) -> str | None:
    """The ISA XLA generates code for: the host's, or the cap where it is older."""
    if cap is None or host is None:
        return host if cap is None else cap
    for family in (X86_ISAS, ARM_ISAS):
        if host in family and cap in family:
            return family[min(family.index(host), family.index(cap))]
    return cap


def _backend_started() -> bool:
    started = getattr(jax._src.xla_bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def request_max_isa(isa: str | None) -> None:
    """Caps XLA's CPU code generation at ``isa`` for this process, through ``XLA_FLAGS``.

    XLA reads the flag when its backend starts: this must run before the first computation
    (the benchmark's entry point calls it first). ``None`` only checks a cap already in
    ``XLA_FLAGS``.

    Raises:
      ValueError: an unknown ISA (here or in ``XLA_FLAGS``); ``XLA_FLAGS`` already capping at
        another ISA; the backend already started in this process without this cap.
    """
    current = parse_max_isa(os.environ.get("XLA_FLAGS"))
    if isa is None:
        return
    isa = check_isa(isa, "max_isa")
    if current == isa:
        return
    if current is not None:
        raise ValueError(
            f"max_isa={isa}, but XLA_FLAGS already sets {_FLAG}={current}: give one of them"
        )
    if _backend_started():
        raise ValueError(
            f"max_isa={isa}: XLA's backend has already started in this process, and it reads "
            f"{_FLAG} only when it starts; run the script in a fresh process "
            f"(python experiments/benchmark.py max_isa={isa}), or set "
            f"XLA_FLAGS={_FLAG}={isa} before anything uses jax"
        )
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}={isa}".strip()


def _cpuinfo() -> dict[str, str]:
    """The first processor's ``/proc/cpuinfo`` fields (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def environment() -> dict[str, Any]:
    """Device kind and count, library versions, CPU model, count, ISA and cap, load average.

    ``cpu_isa`` is the host's newest ``--xla_cpu_max_isa`` value, ``xla_cpu_max_isa`` the cap
    in ``XLA_FLAGS`` (None: none), ``isa`` the one XLA's generated code used; ``cpu_isa_flags``
    the host's flags for those ISAs.
    """
    devices = jax.devices()
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    host = cpu_isa(flags)
    cap = parse_max_isa(os.environ.get("XLA_FLAGS"))
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "gpu_available": any(d.platform in ("gpu", "cuda", "rocm") for d in devices),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "cpu_model": info.get("model name") or platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_isa": host,
        "cpu_isa_flags": sorted(flags & set(_CPU_FLAG.values())),
        "xla_cpu_max_isa": cap,
        "isa": effective_isa(host, cap),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "load_average": load_average(),
    }

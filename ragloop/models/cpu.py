"""What this CPU can do, and the choices that follow from it: matmul kernels, ``precision="auto"``, threads.

Three decisions are made here and nowhere else:

- **kernels** (``matmul_kernel``): oneDNN's prepacked bf16 matmul (``torch.ops.mkldnn._reorder_linear_weight``)
  exists only on CPUs with avx512bw/vl/dq or avx_ne_convert; elsewhere (AVX2, ARM, plain x86-64) bf16 weights
  run on a fallback that is correct everywhere (``"bf16_fallback"`` in ``ragloop.models.fast``). fp32
  prepacking, the int8 kernel (``torch._weight_int8pack_mm``) and the int4 kernel
  (``torch._weight_int4pack_mm_for_cpu``) are ATen/oneDNN code with a path for every CPU torch supports;
- **``precision="auto"``** (``resolve_precision``): the fastest decode precision that passed the quality gate
  (next-token agreement with fp32 and the PAL task score, ``benchmarks/bench_decode.py``) on this CPU class,
  from the table ``AUTO_PRECISION`` (measured figures in ``benchmarks/RESULTS.md``);
- **threads** (``configure_threads``): ``--threads N`` / ``RAGLOOP_THREADS`` / a default of the physical cores
  this process may use (affinity mask, cgroup CPU quota) that are not busy with other work right now —
  on a shared machine an OpenMP team that includes a core another process holds waits at every barrier
  for that core's time slice, which made 2 threads 4× slower than 1 (issue 9).

The CPU class is one of ``CAPABILITIES``. ``RAGLOOP_CPU_CAPABILITY`` (or ``detect_cpu(override=...)``) forces
the class — the *dispatch decision* only, not the instructions torch uses — so tests can drive every
fallback on any machine. To also restrict the instructions (an AVX2 emulation on an AVX-512 machine, as the
benchmarks in RESULTS.md do), start Python with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``; torch then
reports ``AVX2`` and the class follows without an override.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ragloop.core.errors import UsageError

log = logging.getLogger(__name__)

CAPABILITIES = ("avx512_bf16", "avx512", "avx2", "neon", "default")
DECODE_PRECISIONS = ("fp32", "bf16", "int8", "int4")
PRECISION_CHOICES = ("auto", *DECODE_PRECISIONS)
CAPABILITY_ENV = "RAGLOOP_CPU_CAPABILITY"
THREADS_ENV = "RAGLOOP_THREADS"

# precision="auto" per CPU class, for a model whose matmul weights lie on a 4-bit Q4_1 grid (the embedded
# SmolLM2) and for any other model (where int4 would round the weights: fine-tuned checkpoints, HF dirs).
# Filled from benchmarks/bench_decode.py runs (benchmarks/RESULTS.md, "Decoding on every CPU"): the
# fastest single-stream precision whose next-token agreement and PAL score passed the gate there.
# Classes not measured yet stay on fp32 (exact), never on a guess.
AUTO_PRECISION: dict[str, dict[str, str]] = {
    "avx512_bf16": {"q4_grid": "int4", "other": "bf16"},
    "avx512": {"q4_grid": "fp32", "other": "fp32"},
    "avx2": {"q4_grid": "bf16", "other": "bf16"},
    "neon": {"q4_grid": "fp32", "other": "fp32"},
    "default": {"q4_grid": "fp32", "other": "fp32"},
}


@dataclass(frozen=True)
class CpuInfo:
    """The processor as ragloop sees it: ``capability`` (one of ``CAPABILITIES``) drives every decision."""

    capability: str
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(), e.g. "AVX2", "AVX512", "DEFAULT"
    arch: str  # platform.machine(): "x86_64", "aarch64", ...
    flags: frozenset[str] = field(default_factory=frozenset)  # /proc/cpuinfo flags (x86) or Features (ARM)
    forced: bool = False  # capability set by override / RAGLOOP_CPU_CAPABILITY

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX-512 BF16, AMX, ARM BF16): where bf16 autocast
        and bf16 weights are a speed-up rather than an emulation."""
        if self.capability == "avx512_bf16":
            return True
        # ARM: the BF16 extension (Graviton3, Apple M2+); never when the class was forced down
        return self.capability == "neon" and not self.forced and "bf16" in self.flags

    def describe(self) -> str:
        """One line for ``ragloop models`` and ``--verbose``: class, torch's capability, the flags that matter."""
        shown = sorted(self.flags & _FLAGS_SHOWN)
        forced = f" (forced by {CAPABILITY_ENV} / override)" if self.forced else ""
        return (f"{self.capability}{forced}; torch kernels {self.torch_capability}; {self.arch}"
                + (f"; flags {' '.join(shown)}" if shown else ""))


_FLAGS_SHOWN = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni",
                          "amx_bf16", "amx_tile", "avx_ne_convert", "avx_vnni", "asimd", "bf16", "sve", "i8mm"})


def read_cpu_flags(text: str) -> frozenset[str]:
    """The feature flags in ``/proc/cpuinfo`` text: the ``flags`` line (x86) or ``Features`` line (ARM).

    >>> sorted(read_cpu_flags("processor : 0\\nflags : fpu avx2 avx512f\\n"))
    ['avx2', 'avx512f', 'fpu']
    """
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def classify(arch: str, torch_capability: str, flags: frozenset[str]) -> str:
    """The CPU class from the architecture, torch's kernel level and the flags.

    torch's level comes first: with ``ATEN_CPU_CAPABILITY=avx2`` torch runs AVX2 kernels on an AVX-512
    machine, and the class follows it. oneDNN's bf16 prepack needs avx512bw+vl+dq (or avx_ne_convert).

    >>> classify("x86_64", "AVX512", frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}))
    'avx512_bf16'
    >>> classify("x86_64", "AVX2", frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}))
    'avx2'
    >>> classify("aarch64", "DEFAULT", frozenset({"asimd"}))
    'neon'
    """
    a = arch.lower()
    level = torch_capability.upper()
    if a in ("aarch64", "arm64"):
        return "neon" if ("asimd" in flags or not flags) else "default"  # NEON is mandatory on ARMv8-A
    if level.startswith("AVX512") and {"avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512_bf16" if flags & {"avx512_bf16", "amx_bf16"} else "avx512"
    if level.startswith("AVX512") and not flags:  # flags unreadable: trust torch
        return "avx512"
    if level in ("AVX2", "AVX512") or level.startswith("AVX512"):
        return "avx2"
    return "default"


@lru_cache(maxsize=1)
def _detected() -> tuple[str, str, frozenset[str]]:
    # the hardware and torch's kernel level do not change while the process runs: read them once
    import torch

    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    return platform.machine(), str(torch.backends.cpu.get_cpu_capability()), read_cpu_flags(text)


def detect_cpu(override: str | None = None) -> CpuInfo:
    """This CPU's class and flags; ``override`` (else ``RAGLOOP_CPU_CAPABILITY``) forces the class."""
    arch, level, flags = _detected()
    forced = override or os.environ.get(CAPABILITY_ENV) or None
    if forced is not None:
        forced = forced.strip().lower()
        if forced not in CAPABILITIES:
            raise UsageError(f"unknown CPU capability {forced!r} (from override or {CAPABILITY_ENV})",
                             hint=f"use one of {', '.join(CAPABILITIES)}, or unset {CAPABILITY_ENV}")
        return CpuInfo(forced, level, arch, flags, forced=True)
    return CpuInfo(classify(arch, level, flags), level, arch, flags)


# -- kernels ------------------------------------------------------------------------------------------------


def matmul_kernel(precision: str, info: CpuInfo | None = None) -> dict[str, str]:
    """The kernels the fast decode path uses for ``precision`` on ``info``'s CPU: ``{"small": ..., "large":
    ...}`` for decode steps of few rows and for prefill / large batches.

    Kernel names: ``onednn_fp32`` / ``onednn_bf16`` (prepacked oneDNN matmul), ``bf16_fallback`` (bf16 weights
    without oneDNN's bf16 path: torch's bf16 GEMV for 1-2 rows, fp32 compute of the bf16 weights above),
    ``int8pack`` (``torch._weight_int8pack_mm``), ``int4pack`` (``torch._weight_int4pack_mm_for_cpu``).

    >>> matmul_kernel("bf16", CpuInfo("avx2", "AVX2", "x86_64"))
    {'small': 'bf16_fallback', 'large': 'bf16_fallback'}
    >>> matmul_kernel("int4", CpuInfo("avx512_bf16", "AVX512", "x86_64"))
    {'small': 'int4pack', 'large': 'onednn_bf16'}
    """
    info = info or detect_cpu()
    if precision not in DECODE_PRECISIONS:
        raise UsageError(f"unknown decode precision {precision!r}; choose one of {', '.join(DECODE_PRECISIONS)}")
    bf16 = "onednn_bf16" if info.capability in ("avx512_bf16", "avx512") else "bf16_fallback"
    if info.capability in ("avx2", "neon", "default") and not info.forced and "avx_ne_convert" in info.flags:
        bf16 = "onednn_bf16"  # AVX2 CPUs with AVX-NE-CONVERT (e.g. Intel Core 12th gen+) have oneDNN's bf16 path
    if precision == "fp32":
        return {"small": "onednn_fp32", "large": "onednn_fp32"}
    if precision == "bf16":
        return {"small": bf16, "large": bf16}
    if precision == "int8":
        return {"small": "int8pack", "large": "int8pack"}
    return {"small": "int4pack", "large": bf16}


# -- precision="auto" ----------------------------------------------------------------------------------------


def resolve_precision(precision: str, info: CpuInfo | None = None, *, q4_grid: bool = True) -> str:
    """The decode precision to use: ``precision`` itself, or for ``"auto"`` the entry of ``AUTO_PRECISION`` for
    this CPU class. ``q4_grid``: whether the model's matmul weights lie on a 4-bit grid (int4 is then exact);
    otherwise ``auto`` never picks int4, which would round them (a fine-tuned checkpoint's updates included).

    >>> resolve_precision("auto", CpuInfo("avx512_bf16", "AVX512", "x86_64"))
    'int4'
    >>> resolve_precision("auto", CpuInfo("avx512_bf16", "AVX512", "x86_64"), q4_grid=False)
    'bf16'
    >>> resolve_precision("int8", CpuInfo("avx2", "AVX2", "x86_64"))
    'int8'
    """
    if precision not in PRECISION_CHOICES:
        raise UsageError(f"unknown decode precision {precision!r}; choose one of {', '.join(PRECISION_CHOICES)}")
    if precision != "auto":
        return precision
    info = info or detect_cpu()
    return AUTO_PRECISION[info.capability]["q4_grid" if q4_grid else "other"]


def autocast_bf16(info: CpuInfo | None = None) -> bool:
    """Whether training should use bf16 autocast on this CPU: only where bf16 runs natively (elsewhere it is
    emulated and slower than fp32 — measured in RESULTS.md)."""
    return (info or detect_cpu()).native_bf16


# -- threads ------------------------------------------------------------------------------------------------


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None) -> int:
    """Physical cores among ``cpus`` (default: this process's affinity mask), SMT siblings counted once,
    capped by the cgroup CPU quota."""
    cpus = _allowed_cpus() if cpus is None else cpus
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(), topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(c)))  # topology not visible: count logical CPUs
    n = max(1, len(cores))
    limit = _cgroup_cpu_limit()
    return max(1, min(n, math.floor(limit))) if limit else n


def _busy_cpus(cpus: list[int], window_s: float) -> float:
    """CPUs' worth of time other processes used on ``cpus`` during ``window_s`` (from /proc/stat)."""

    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *vals = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                v = [int(x) for x in vals]
                out[int(name[3:])] = (sum(v), v[3] + (v[4] if len(v) > 4 else 0))  # (total, idle + iowait)
        return out

    a = sample()
    time.sleep(window_s)
    b = sample()
    busy = 0.0
    for c, (tot, idle) in b.items():
        dt = tot - a.get(c, (tot, idle))[0]
        if dt > 0:
            busy += 1.0 - (idle - a[c][1]) / dt
    return busy


def default_threads(*, window_s: float = 0.05) -> int:
    """Physical cores available to this process minus the cores other work keeps busy right now (a short
    /proc/stat sample), at least 1."""
    cores = physical_cores()
    if cores == 1:
        return 1
    cpus = _allowed_cpus()
    try:
        busy = _busy_cpus(cpus, window_s)
    except (OSError, ValueError, IndexError):
        return cores
    free = cores - round(busy * cores / max(1, len(cpus)))  # busy logical CPUs → physical cores
    return max(1, min(cores, free))


def configure_threads(n: int | None = None) -> int:
    """Set the thread count for torch (intra- and inter-op), OpenMP/MKL/OpenBLAS in libraries loaded later
    (FAISS, the embedder's backends), and the tokenizers' pool; returns it.

    ``n``: an explicit count; else ``RAGLOOP_THREADS``; else ``OMP_NUM_THREADS`` if set; else
    ``default_threads()``. Call it once, before heavy work (torch fixes its inter-op pool on first use).
    Torch is not imported for this (the CLI calls it for every command): if it is not loaded yet, it reads
    ``OMP_NUM_THREADS`` when it is; if it is, its pools are set directly.
    """
    source = "argument"
    if n is None:
        for var in (THREADS_ENV, "OMP_NUM_THREADS"):
            raw = os.environ.get(var, "").strip()
            if raw:
                try:
                    n = int(raw)
                except ValueError:
                    raise UsageError(f"{var}={raw!r} is not a whole number of threads",
                                     hint=f"set {var} to a positive integer, e.g. {var}=2") from None
                source = var
                break
    if n is None:
        n, source = default_threads(), "default"
    if n < 1:
        raise UsageError(f"the thread count must be at least 1, got {n}", hint="use --threads 1 or more")
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # already set, or parallel work already ran: the intra-op count is what matters
            pass
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(n)  # child processes and libraries initialised later read these
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if n > 1 else "false"
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        faiss.omp_set_num_threads(n)
    log.info("threads: %d (%s)", n, source)
    return n

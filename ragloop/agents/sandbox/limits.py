"""Resource limits of one sandbox run (SECURITY.md §1), validated up front.

The host enforces ``wall_seconds`` and caps what it reads; every other field travels to the child as
JSON and is applied there before the program is read (see ``_worker.apply_limits``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ragloop.core.errors import ConfigError


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. Defaults suit PAL programs (a few arithmetic lines) with a wide margin."""

    wall_seconds: float = 5.0  # host kills the process group after this long (startup included)
    cpu_seconds: int = 5  # RLIMIT_CPU soft limit (the hard limit is one second later)
    memory_mb: int = 512  # RLIMIT_AS: address space of the child, interpreter included
    max_output_bytes: int = 65536  # cap on captured print output and on the returned value as JSON
    max_source_bytes: int = 20000  # programs longer than this are rejected before anything parses them
    max_source_lines: int = 1000
    max_int_digits: int = 4300  # size guards on **, <<, * and sys.set_int_max_str_digits (min 640)
    max_sequence_len: int = 10_000_000  # cap on seq * n (strings, lists, tuples)
    max_range: int = 10_000_000  # cap on len(range(...))
    recursion_limit: int = 200  # sys.setrecursionlimit while the program runs
    max_open_files: int = 16  # RLIMIT_NOFILE

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("wall_seconds", 0 < self.wall_seconds <= 3600, "a number of seconds in (0, 3600]"),
            ("cpu_seconds", isinstance(self.cpu_seconds, int) and 1 <= self.cpu_seconds <= 3600,
             "a whole number of seconds in [1, 3600]"),
            ("memory_mb", isinstance(self.memory_mb, int) and 64 <= self.memory_mb <= 65536,
             "MiB in [64, 65536] (the interpreter alone needs ~30 MiB of address space)"),
            ("max_output_bytes", 256 <= self.max_output_bytes <= 64 * 1024 * 1024, "bytes in [256, 64 MiB]"),
            ("max_source_bytes", 16 <= self.max_source_bytes <= 1024 * 1024, "bytes in [16, 1 MiB]"),
            ("max_source_lines", 1 <= self.max_source_lines <= 100_000, "a count in [1, 100000]"),
            ("max_int_digits", 100 <= self.max_int_digits <= 1_000_000, "digits in [100, 1000000]"),
            ("max_sequence_len", 1 <= self.max_sequence_len <= 10**9, "a count in [1, 1e9]"),
            ("max_range", 1 <= self.max_range <= 10**9, "a count in [1, 1e9]"),
            ("recursion_limit", 50 <= self.recursion_limit <= 10_000, "a depth in [50, 10000]"),
            ("max_open_files", 8 <= self.max_open_files <= 1024, "a count in [8, 1024]"),
        ]  # fmt: skip
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(
                    f"SandboxLimits.{name}={getattr(self, name)!r} is invalid: expected {expected}"
                )

    def to_worker(self, entry: str | None) -> dict:
        """The settings the child applies (everything but the host-side wall clock)."""
        cfg = asdict(self)
        cfg.pop("wall_seconds")
        cfg["entry"] = entry
        return cfg

"""Paths and configuration.

ragloop keeps its own files under one home directory: ``$RAGLOOP_HOME`` or ``~/.ragloop``. The converted
model cache lives in ``$RAGLOOP_CACHE`` or ``<home>/cache``. Optional settings come from
``<home>/config.toml`` (e.g. ``[generate] temperature = 0.7``); command-line options override them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package (a dependency there)
    import tomli as tomllib  # type: ignore[no-redef]

from ragloop.core.errors import ConfigError


def ragloop_home() -> Path:
    return Path(os.environ.get("RAGLOOP_HOME") or Path.home() / ".ragloop").expanduser()


def cache_dir() -> Path:
    return Path(os.environ.get("RAGLOOP_CACHE") or ragloop_home() / "cache").expanduser()


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """Load a TOML config file (default ``<home>/config.toml``); a missing default file is an empty config."""
    explicit = path is not None
    p = Path(path) if explicit else ragloop_home() / "config.toml"
    if not p.exists():
        if explicit:
            raise ConfigError(f"config file not found: {p}")
        return {}
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None


def set_offline_defaults() -> None:
    """ragloop never reaches a model hub at run time: make that the default for HF libraries."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

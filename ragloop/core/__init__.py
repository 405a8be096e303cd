"""Leaf layer: records (Trace/Step/Message), errors, configuration, seeding. Imports nothing above it."""

from ragloop.core.config import cache_dir, load_config, ragloop_home, set_offline_defaults
from ragloop.core.errors import (
    ConfigError,
    ContextWindowError,
    DataError,
    IndexStoreError,
    ModelLoadError,
    ModelNotFoundError,
    RagloopError,
    SandboxError,
    TrainingError,
    UsageError,
)
from ragloop.core.seeding import make_generator, seed_everything
from ragloop.core.trace import (
    TRACE_SCHEMA_VERSION,
    Feedback,
    Message,
    Step,
    ToolCall,
    Trace,
    iter_traces,
    read_traces,
    write_traces,
)

__all__ = [
    "TRACE_SCHEMA_VERSION", "ConfigError", "ContextWindowError", "DataError", "Feedback", "IndexStoreError",
    "Message", "ModelLoadError", "ModelNotFoundError", "RagloopError", "SandboxError", "Step", "ToolCall",
    "Trace", "TrainingError", "UsageError", "cache_dir", "iter_traces", "load_config", "make_generator",
    "ragloop_home", "read_traces", "seed_everything", "set_offline_defaults", "write_traces",
]

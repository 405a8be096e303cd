"""The error hierarchy of ragloop.

Three kinds of failure (STYLE.md):
- model-caused (bad format, failed tool): recorded in the Trace, the agent loop goes on — not exceptions here;
- developer / configuration errors: a specific subclass below, raised early, whose message names the fix;
- user-facing errors: the CLI prints ``str(err)`` as one line (plus ``err.hint``) and exits with ``err.exit_code``.

Every error carries an optional ``hint`` — the command or change that fixes it.
"""

from __future__ import annotations


class RagloopError(Exception):
    """Base class of every error ragloop raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(RagloopError):
    """The user asked for something invalid (bad option value, empty prompt, …)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration value or file is invalid."""


class ModelNotFoundError(RagloopError):
    """A model (policy, embedder, reward model) could not be found locally."""

    exit_code = 3


class ModelLoadError(RagloopError):
    """A model was found but could not be loaded (corrupt file, unsupported architecture, …)."""

    exit_code = 3


class ContextWindowError(UsageError):
    """A prompt (plus the tokens asked for) does not fit the model's context window.

    ragloop never truncates silently; this error says by how much the input is too long.
    """


class DataError(RagloopError):
    """Input data (traces, rows, documents) is malformed; the message names the file and the row."""

    exit_code = 4


class IndexStoreError(RagloopError):
    """An index on disk is missing, damaged, locked or incompatible."""

    exit_code = 5


class SandboxError(RagloopError):
    """The code sandbox could not run a program (the program's own failures are results, not this)."""


class TrainingError(RagloopError):
    """A training run failed or diverged (non-finite values, bad checkpoint, …)."""

    exit_code = 6

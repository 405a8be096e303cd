"""The PAL / python-tool code sandbox: model-written programs run in a separate, resource-limited process
behind an AST allow-list (SECURITY.md §1; docs/SANDBOX.md says what it promises and what it does not).

    >>> from ragloop.agents.sandbox import Sandbox, SandboxLimits
    >>> Sandbox(SandboxLimits(wall_seconds=5)).run("def solution():\\n    return 3 * 4").to_json()
    '{"ok": true, "value": 12}'

PAL: Gao et al. 2023, "PAL: Program-aided Language Models" (the model writes ``def solution():``).
"""

from ragloop.agents.sandbox.host import ERROR_TYPES, Sandbox, SandboxResult, check_source
from ragloop.agents.sandbox.limits import SandboxLimits

__all__ = ["ERROR_TYPES", "Sandbox", "SandboxLimits", "SandboxResult", "check_source"]

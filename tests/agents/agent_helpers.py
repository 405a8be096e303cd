"""Shared bits of the agent tests: a tiny corpus, and a trace normaliser for golden files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ragloop.core.trace import Trace

GOLDEN = Path(__file__).parent / "golden"

CORPUS = {
    "nucleus": {
        "title": "Nucleus sampling",
        "text": "Nucleus sampling keeps the smallest set of tokens whose probability reaches p. "
        "It was introduced by Holtzman et al. in 2020. The set changes size at every step.",
    },
    "topk": {
        "title": "Top-k sampling",
        "text": "Top-k sampling keeps the k most likely tokens. Fan et al. used it for story generation.",
    },
    "react": {
        "title": "ReAct",
        "text": "ReAct interleaves reasoning traces and actions. It was proposed by Yao et al. in 2023.",
    },
}

VOLATILE = {"id", "started_at", "seconds"}


def normalise(trace: Trace) -> dict[str, Any]:
    """The trace as a dict without run-specific values (ids, wall-clock times) and per-call token records."""

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    data = json.loads(trace.to_json())
    data.pop("calls", None)  # token ids and log-probs of each model call: tested in test_runtime.py
    return strip(data)


def check_golden(name: str, trace: Trace, *, update: bool = False) -> None:
    """Compare with ``golden/<name>.json``; RAGLOOP_UPDATE_GOLDEN=1 (or a missing file) writes it."""
    import os

    path = GOLDEN / f"{name}.json"
    data = normalise(trace)
    if update or os.environ.get("RAGLOOP_UPDATE_GOLDEN") == "1" or not path.exists():
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    expected = json.loads(path.read_text(encoding="utf-8"))
    assert data == expected, f"trace differs from {path} (RAGLOOP_UPDATE_GOLDEN=1 to accept a deliberate change)"

"""``ragloop eval`` on the runtime: questions run together on the decode engine give the one-at-a-time report."""

from __future__ import annotations

import json

import pytest

from ragloop.agents.sandbox import Sandbox, SandboxLimits
from ragloop.core.trace import read_traces
from ragloop.eval.runners import RunConfig, run_benchmark


@pytest.fixture(scope="module")
def tiny():
    from ragloop.models.loading import load_tokenizer
    from ragloop.models.local import LocalPolicy
    from ragloop.models.tiny import build_tiny_llama

    tok = load_tokenizer()
    return LocalPolicy.from_model(build_tiny_llama(tok, seed=1), tok, name="tiny", backend="fast")


@pytest.mark.parametrize("agent", ["pal", "cot", "react"])
def test_batched_eval_equals_one_at_a_time(tmp_path, tiny, agent):
    data = tmp_path / "gsm.jsonl"
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many now?", "answer": f"#### {a + b}"}
            for a, b in [(2, 3), (5, 1), (7, 7), (1, 9), (4, 4)]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sandbox = Sandbox(SandboxLimits(wall_seconds=10))
    reports, files = [], []
    for bs in (1, 4):
        out = tmp_path / f"{agent}-{bs}.jsonl"
        cfg = RunConfig(task="gsm8k", agent=agent, data=str(data), out=str(out), shots=1, max_new_tokens=16,
                        max_steps=2, fallback="none", batch_size=bs)
        reports.append(run_benchmark(cfg, tiny, sandbox=sandbox))
        files.append(read_traces(out))
    one, many = reports
    assert (one.n, one.correct, one.format_valid) == (many.n, many.correct, many.format_valid)
    assert many.settings["batch_size"] == 4
    # the traces file is in input order whatever order the episodes finished in
    assert [t.question for t in files[1]] == [r["question"] for r in rows]
    assert [t.answer for t in files[0]] == [t.answer for t in files[1]]
    assert [[s.raw_output for s in t.steps] for t in files[0]] == [[s.raw_output for s in t.steps] for t in files[1]]

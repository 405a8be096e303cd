"""Grammar-constrained agents on the real embedded model (few, short): the output parses strictly."""

from __future__ import annotations

import pytest

from ragloop.agents.cot import CoTAgent, CoTConfig
from ragloop.agents.pal import PALAgent, PALConfig
from ragloop.agents.react import ReActAgent, ReActConfig, react_tools_for

pytestmark = pytest.mark.e2e
QUESTION = "Tom has 3 apples. He buys 4 more apples. How many apples does Tom have now?"


@pytest.fixture(scope="module")
def policy():
    from ragloop.models import load_policy

    return load_policy("default")


def test_constrained_pal_cot_react_are_strictly_valid(policy):
    pal = PALAgent(policy, PALConfig(shots=2, max_new_tokens=96, constrained=True)).run(QUESTION)
    assert pal.steps[0].code is not None and not pal.steps[0].repairs and pal.steps[0].error_type != "validation"
    assert pal.decoding["grammar"]["name"] == "pal"

    cot = CoTAgent(policy, CoTConfig(shots=2, max_new_tokens=96, constrained=True)).run(QUESTION)
    assert cot.finished and not cot.steps[0].repairs and cot.answer is not None

    react = ReActAgent(policy, react_tools_for("calculator"),
                       config=ReActConfig(shots=0, max_steps=2, max_new_tokens=64, fallback="none",
                                          constrained=True)).run("What is 17 * 23?")
    assert react.steps and all(s.error_type is None or s.error_type == "tool-error" for s in react.steps)
    assert all(not s.repairs and s.action is not None for s in react.steps)

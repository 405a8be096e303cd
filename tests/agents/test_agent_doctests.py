"""The worked examples in the agents' docstrings are true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["calculator", "safety", "parsing", "base", "docsearch", "pal", "cot", "tools"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(f"ragloop.agents.{name}")
    result = doctest.testmod(mod)
    assert result.failed == 0


def test_scripted_policy_docstring():
    assert doctest.testmod(importlib.import_module("ragloop.models.scripted")).failed == 0

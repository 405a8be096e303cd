"""``precision=`` on the policy: the fast path's reduced-precision decode weights, chosen explicitly, never
a silent fallback. (Speed and quality of each precision are measured by benchmarks/bench_decode.py.)"""

from __future__ import annotations

import pytest

from ragloop.cli import main
from ragloop.core.errors import UsageError
from ragloop.models.fast import FastStepper
from ragloop.models.local import LocalPolicy
from ragloop.models.types import GenerationConfig


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_reduced_precision_builds_that_fast_stepper_and_decodes(tiny_model, smol_tokenizer, precision):
    pol = LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny", precision=precision)
    st = pol.stepper()
    assert isinstance(st, FastStepper) and st.precision == precision
    gens = pol.generate_batch(["Hello there", "2+2="], GenerationConfig(max_new_tokens=6, temperature=0.0))
    assert [len(g[0].token_ids) for g in gens] == [6, 6] or all(g[0].finish_reason == "stop" for g in gens)
    assert "precision='" + precision + "'" in repr(pol)


def test_fp32_default_is_greedy_identical_to_reference(tiny_model, smol_tokenizer, tiny_policy):
    fast = LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny")
    assert fast.precision == "fp32"
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.0)
    assert fast.generate("Once upon", cfg)[0].token_ids == tiny_policy.generate("Once upon", cfg)[0].token_ids


def test_bad_precision_and_hf_backend_are_refused(tiny_model, smol_tokenizer):
    with pytest.raises(UsageError, match="unknown decode precision 'int9'"):
        LocalPolicy.from_model(tiny_model, smol_tokenizer, precision="int9")
    with pytest.raises(UsageError, match="needs the fast decode path") as e:
        LocalPolicy.from_model(tiny_model, smol_tokenizer, backend="hf", precision="int4")
    assert "--precision fp32" in (e.value.hint or "")


def test_cli_bad_precision_is_one_clear_message(capsys):
    rc = main(["generate", "hi", "--precision", "int9", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown decode precision 'int9'" in err and "Traceback" not in err
    rc = main(["generate", "hi", "--precision", "bf16", "--backend", "hf"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs the fast decode path" in err

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


def test_auto_is_accepted_everywhere_precision_is(tiny_model, smol_tokenizer):
    from ragloop.models.cpu import AUTO_PRECISION, detect_cpu

    pol = LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny", precision="auto")
    assert pol.requested_precision == "auto"
    assert pol.precision == AUTO_PRECISION[detect_cpu().capability]["other"]  # random weights: off the 4-bit grid
    assert LocalPolicy.from_model(tiny_model, smol_tokenizer, backend="hf", precision="auto").precision == "fp32"


@pytest.mark.e2e
@pytest.mark.parametrize("precision", ["auto", "bf16", "int4"])
def test_real_model_generates_with_each_precision_from_the_cli(capsys, precision):
    """The acceptance check of issue 9 (`ragloop generate "Hi" --precision ...` on any CPU), on the real model."""
    import json

    from ragloop.models.cpu import resolve_precision

    rc = main(["generate", "Hi", "--precision", precision, "--greedy", "--max-tokens", "4", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    got = json.loads(out.out)
    assert got["precision"] == resolve_precision(precision, q4_grid=True)  # the embedded GGUF is Q4_1
    assert got["candidates"][0]["num_tokens"] >= 1

"""``lcs`` and ``rouge_l`` on literal inputs, against rouge-score's own test vectors (../shared/data/metrics)
and against the library itself on the vendored test files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragloop.eval.metrics import PRF, lcs, rouge, rouge_l

METRICS_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "metrics"
ROUGE = json.loads((METRICS_DIR / "rouge_test_vectors.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("ABCBDAB", "BDCABA", "BCBA"),  # CLRS §15.4
        ("abc", "abc", "abc"),
        ("abc", "xyz", ""),
        ("", "abc", ""),
        ("axbxc", "abc", "abc"),  # not contiguous
    ],
)
def test_lcs_literals(a, b, expected):
    assert "".join(lcs(a, b)) == expected


def test_lcs_docstring_example_and_symmetry_of_length():
    a, b = "the cat sat on the mat".split(), "the cat was found under the bed".split()
    assert lcs(a, b) == ["the", "cat", "the"]
    assert len(lcs(b, a)) == 3


@pytest.mark.parametrize("case", [c for c in ROUGE["lcs_helper_cases"] if "expected_lcs_length" in c],
                         ids=lambda c: c["id"])
def test_lcs_against_rouge_score_table_vectors(case):
    got = lcs(case["a"], case["b"])
    assert len(got) == case["expected_lcs_length"]
    if "expected_lcs_values" in case:
        assert got == case["expected_lcs_values"]


def test_rouge_l_docstring_example():
    assert rouge_l("The cat sat on the mat.", "the cat was found under the bed") == PRF(
        0.5, 0.42857142857142855, 0.4615384615384615
    )


# the multi-reference case is left out: rouge_l takes one reference
@pytest.mark.parametrize(
    "case", [c for c in ROUGE["pairwise_cases"] if c["rouge_type"] == "rougeL" and not c["id"].startswith("multi_")],
    ids=lambda c: c["id"],
)
def test_rouge_l_matches_rouge_score_vectors(case):
    got = rouge_l(case["prediction"], case["target"], use_stemmer=case["use_stemmer"])
    exp = case["expected"]
    assert got.precision == pytest.approx(exp["precision"], abs=1e-5)
    assert got.recall == pytest.approx(exp["recall"], abs=1e-5)
    assert got.fmeasure == pytest.approx(exp["fmeasure"], abs=1e-3)


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_l_equals_the_library_line_by_line(use_stemmer):
    read = lambda name: (METRICS_DIR / "rouge_testdata" / name).read_text(encoding="utf-8").splitlines()  # noqa: E731
    targets, preds = read("target.txt"), read("prediction.txt")
    assert len(preds) == len(targets) > 1
    lib = rouge(preds, targets, types=["rougeL"], use_stemmer=use_stemmer).per_example
    for pred, tgt, want in zip(preds, targets, lib, strict=True):
        got = rouge_l(pred, tgt, use_stemmer=use_stemmer)
        w = want["rougeL"]
        assert (got.precision, got.recall, got.fmeasure) == pytest.approx((w.precision, w.recall, w.fmeasure)), pred


def test_rouge_l_empty_and_disjoint():
    assert rouge_l("", "the cat") == PRF(0.0, 0.0, 0.0)
    assert rouge_l("!!!", "the cat") == PRF(0.0, 0.0, 0.0)  # no word tokens
    assert rouge_l("a dog", "the cat") == PRF(0.0, 0.0, 0.0)

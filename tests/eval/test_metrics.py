"""Metrics: literal cases for EM/F1/numbers/retrieval, and every ROUGE and BLEU test vector shipped in
../shared/data/metrics (transcribed from rouge-score's and sacrebleu's own test suites)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ragloop.eval.metrics import (
    bleu,
    bleu_from_counts,
    evaluate_retrieval,
    exact_match,
    extract_number,
    f1_score,
    mrr_at_k,
    ndcg_at_k,
    normalize_answer,
    numeric_match,
    recall_at_k,
    rouge,
    sentence_bleu,
)
from ragloop.eval.stats import bootstrap_ci, wilson_ci

METRICS_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "metrics"
ROUGE = json.loads((METRICS_DIR / "rouge_test_vectors.json").read_text(encoding="utf-8"))
BLEU_CASES = json.loads((METRICS_DIR / "bleu_test_vectors.json").read_text(encoding="utf-8"))["cases"]


# ---------------------------------------------------------------------------------------------- EM / F1
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  an   apple, a pear;  the END. ", "apple pear end"),
        ("Theatre", "theatre"),  # 'the' only as a whole word
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_and_f1_literals():
    assert exact_match("The Beatles!", "beatles") == 1.0
    assert exact_match("Beatles band", "beatles") == 0.0
    assert exact_match("Paris", ["London", "paris"]) == 1.0
    assert f1_score("Barack Obama", "Obama") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)  # multiset overlap
    assert f1_score("", "") == 1.0 and f1_score("x", "") == 0.0
    # HotpotQA rule used by ReAct: yes/no only match exactly
    assert f1_score("yes it is", "yes") == 0.0
    assert f1_score("no", "no") == 1.0
    assert f1_score("red", ["blue", "red car"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no gold"):
        exact_match("x", [])


# ---------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 24 clips.\n#### 72", 72.0),
        ("#### 1,234", 1234.0),
        ("The answer is 18.", 18.0),
        ("The answer is: $1,234.50 and later 7", 1234.5),
        ("She has 5 apples and buys 3 more, so 8", 8.0),
        ("It costs -$5 now", -5.0),
        ("between 5-10 people", 10.0),
        ("about 50% of them", 50.0),
        ("18.0", 18.0),
        (".5 cups", 0.5),
        ("no number", None),
        (42, 42.0),
        (2.5, 2.5),
        (None, None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_numeric_match():
    assert numeric_match("18.0", "18") == 1.0
    assert numeric_match("The answer is $18", "#### 18") == 1.0
    assert numeric_match(18, "18") == 1.0
    assert numeric_match("1,000,000", 1e6) == 1.0
    assert numeric_match("0.1 + 0.2 = 0.30000000000000004", 0.3) == 1.0
    assert numeric_match("17", "18") == 0.0
    assert numeric_match("no idea", "18") == 0.0
    assert numeric_match(None, "18") == 0.0
    assert numeric_match("18.5", "18", tol=1.0) == 1.0
    with pytest.raises(ValueError, match="contains no number"):
        numeric_match("1", "none")


# ---------------------------------------------------------------------------------------------- ROUGE
@pytest.mark.parametrize("case", ROUGE["pairwise_cases"], ids=lambda c: c["id"])
def test_rouge_vectors(case):
    # rouge(preds, refs) calls the library as score(target, prediction), the vectors' order.
    report = rouge(
        [case["prediction"]], [case["target"]], types=[case["rouge_type"]], use_stemmer=case["use_stemmer"]
    )
    got = report.per_example[0][case["rouge_type"]]
    places = 7 if "places=7" in case["tolerance"] else (5 if "places=5" in case["tolerance"] else 3)
    exp = case["expected"]
    assert round(abs(got.precision - exp["precision"]), min(places, 7)) == 0
    assert round(abs(got.recall - exp["recall"]), min(places, 7)) == 0
    f_places = 3 if "3 for F" in case["tolerance"] else places
    assert round(abs(got.fmeasure - exp["fmeasure"]), f_places) == 0


def test_rouge_argument_order_matters():
    # precision is relative to the prediction, recall to the target: swapping them swaps P and R
    r = rouge(["testing"], ["testing one two"], types=["rouge1"]).per_example[0]["rouge1"]
    assert (r.precision, r.recall) == (1.0, pytest.approx(1 / 3))


def test_rouge_testdata_files_line_by_line_match_vectors():
    """The r155 vectors point at rouge_testdata/{target,prediction}.txt lines: score those files."""
    targets = (
        (METRICS_DIR / "rouge_testdata" / "target.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    )
    preds = (
        (METRICS_DIR / "rouge_testdata" / "prediction.txt")
        .read_text(encoding="utf-8")
        .splitlines(keepends=True)
    )
    report = rouge(preds, targets, types=["rouge1", "rouge2", "rougeL"])
    for case in ROUGE["pairwise_cases"]:
        if "target_file" not in case or case["use_stemmer"]:
            continue
        line = int(case["target_file"].rsplit(" ", 1)[1]) - 1
        got = report.per_example[line][case["rouge_type"]]
        assert got.fmeasure == pytest.approx(case["expected"]["fmeasure"], abs=1e-5), case["id"]
    # the aggregate is the mean of the per-example figures
    assert report.aggregate["rouge1"].fmeasure == pytest.approx(
        sum(e["rouge1"].fmeasure for e in report.per_example) / len(preds)
    )


def test_rougelsum_multi_sentence_files_against_rouge155():
    # google-research rouge_scorer_test.py::testRougeLSumAgainstRouge155WithStemming (pyrouge files)
    target = (METRICS_DIR / "rouge_testdata" / "pyrouge_files" / "target_multi.0.txt").read_text(
        encoding="utf-8"
    )
    pred = (METRICS_DIR / "rouge_testdata" / "pyrouge_files" / "prediction_multi.0.txt").read_text(
        encoding="utf-8"
    )
    got = rouge([pred], [target], types=["rougeLsum"], use_stemmer=True).per_example[0]["rougeLsum"]
    assert (round(got.recall, 5), round(got.precision, 5), round(got.fmeasure, 5)) == (
        0.36538,
        0.66667,
        0.47205,
    )


@pytest.mark.parametrize("case", ROUGE["lcs_helper_cases"], ids=lambda c: c["id"])
def test_rouge_lcs_vectors_through_rougelsum(case):
    """The LCS helper vectors, checked through the public API: integer tokens become words, candidate
    sentences become lines (rougeLsum is the summary-level union LCS)."""

    def words(tokens):
        return " ".join(f"w{t}" for t in tokens)

    if case["id"] in ("lcs_length", "lcs_none"):
        r = rouge([words(case["b"])], [words(case["a"])], types=["rougeL"]).per_example[0]["rougeL"]
        assert r.recall * len(case["a"]) == pytest.approx(case["expected_lcs_length"])
    elif case["id"] == "union_lcs":
        pred = "\n".join(words(c) for c in case["candidates"])
        r = rouge([pred], [words(case["ref"])], types=["rougeLsum"]).per_example[0]["rougeLsum"]
        assert r.recall * len(case["ref"]) == pytest.approx(len(case["expected_union_lcs_values"]))
    else:
        pred = "\n".join(words(c) for c in case["candidates"])
        ref = "\n".join(words(r) for r in case["refs"])
        r = rouge([pred], [ref], types=["rougeLsum"]).per_example[0]["rougeLsum"]
        assert (r.recall, r.precision) == (case["expected"]["recall"], case["expected"]["precision"])
        assert round(abs(r.fmeasure - case["expected"]["fmeasure"]), 3) == 0  # assertAlmostEqual(places=3)


@pytest.mark.parametrize("case", ROUGE["aggregation_cases"], ids=lambda c: c["id"])
def test_bootstrap_aggregation_vectors(case):
    low, mid, high = bootstrap_ci(
        case["per_example_scores"], case["confidence_interval"], n_samples=1000, seed=123
    )
    exp = case["expected_low_mid_high"]
    for j, measure in enumerate(("precision", "recall", "fmeasure")):
        assert [low[j], mid[j], high[j]] == pytest.approx(exp[measure], abs=1e-8)


def test_rouge_multi_reference_and_errors():
    r = rouge(["the cat sat"], [["a dog ran", "the cat sat"]], types=["rouge1"]).per_example[0]["rouge1"]
    assert r.fmeasure == 1.0  # best reference wins
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown rouge types"):
        rouge(["a"], ["a"], types=["rougeX"])


# ---------------------------------------------------------------------------------------------- BLEU
def _bleu_case_value(case):
    s = dict(case["settings"])
    if case["level"] == "stats":
        kw = {k: v for k, v in s.items() if k in ("smooth_method", "smooth_value", "effective_order")}
        return bleu_from_counts(case["correct"], case["total"], case["sys_len"], case["ref_len"], **kw)
    if case["level"] == "sentence":
        return sentence_bleu(case["hypothesis"], case["references"], **s)
    return bleu(case["hypotheses"], case["references_per_hypothesis"], **s)


@pytest.mark.parametrize("case", BLEU_CASES, ids=lambda c: c["id"])
def test_bleu_vectors(case):
    result = _bleu_case_value(case)
    score = result.score / 100 if case["scale"] == "0-1" else result.score
    if "expected_str" in case and case["id"].startswith("max_ngram"):
        assert f"{result.score:.2f}" == case["expected_str"]
    tol = case["tolerance"]
    assert score == pytest.approx(case["expected"], abs=max(tol, 1e-12) if tol else 1e-12)
    if case["id"] == "readme_corpus_bleu_2refs":
        assert [round(p, 1) for p in result.precisions] == case["expected_precisions"]
        assert round(result.bp, 3) == case["expected_bp"]
        assert round(result.ratio, 3) == case["expected_ratio"]
        assert (result.sys_len, result.ref_len) == (case["expected_hyp_len"], case["expected_ref_len"])
        assert result.signature.startswith("nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp")


def test_bleu_reference_streams_and_per_hypothesis_layout_agree():
    case = next(c for c in BLEU_CASES if c["id"] == "corpus_bleu_0")
    from sacrebleu.metrics import BLEU

    direct = BLEU().corpus_score(case["hypotheses"], case["references_streams"]).score
    assert bleu(case["hypotheses"], case["references_per_hypothesis"]).score == pytest.approx(direct)


def test_bleu_variable_reference_counts_and_errors():
    hyps = ["the cat sat on the mat today", "a dog ran in the park at noon"]
    varied = bleu(
        hyps, [["the cat sat on a mat today", "a cat sat on the mat"], "a dog ran in a park at noon"]
    )
    # a second reference identical to the first changes nothing
    padded = bleu(
        hyps, [["the cat sat on a mat today", "a cat sat on the mat"], ["a dog ran in a park at noon"] * 2]
    )
    assert varied.signature.startswith("nrefs:var")
    assert 0 < varied.score < 100 and varied.score == pytest.approx(padded.score)
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        bleu(["x"], ["x", "y"])


# ---------------------------------------------------------------------------------------------- retrieval
def test_retrieval_metrics_literals():
    ranked = ["d3", "d1", "d9", "d2"]
    assert recall_at_k(ranked, {"d1", "d2"}, 1) == 0.0
    assert recall_at_k(ranked, {"d1", "d2"}, 2) == 0.5
    assert recall_at_k(ranked, {"d1", "d2"}, 10) == 1.0
    assert mrr_at_k(ranked, {"d9"}, 3) == pytest.approx(1 / 3)
    assert mrr_at_k(ranked, {"d9"}, 2) == 0.0
    # nDCG: one relevant doc at rank 2 -> 1/log2(3)
    assert ndcg_at_k(ranked, {"d1"}, 10) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k(["d1", "d3"], {"d1"}, 10) == 1.0
    # graded relevance, linear gain: DCG = 1/1 + 2/log2(3); IDCG = 2/1 + 1/log2(3)
    graded = {"a": 2, "b": 1}
    assert ndcg_at_k(["b", "a"], graded, 2) == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    # duplicates count once
    assert recall_at_k(["d1", "d1", "d1"], {"d1", "d2"}, 3) == 0.5
    with pytest.raises(ValueError, match="no relevant documents"):
        recall_at_k(ranked, set(), 5)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        mrr_at_k(ranked, {"d1"}, 0)


def test_evaluate_retrieval_means_over_judged_queries():
    results = {"q1": ["a", "b"], "q2": ["c"], "q3": ["z"]}
    qrels = {"q1": {"b": 1}, "q2": {"x": 1}, "q4": {"y": 1}, "q5": {"n": 0}}
    m = evaluate_retrieval(results, qrels, ks=(1, 2))
    assert m["queries"] == 3  # q5 has no positive judgement; q4 has no results and scores 0
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert m["mrr@2"] == pytest.approx(0.5 / 3)


# ---------------------------------------------------------------------------------------------- stats
def test_wilson_ci_literals():
    lo, hi = wilson_ci(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson_ci(0, 10)[0] == 0.0 and wilson_ci(10, 10)[1] == pytest.approx(1.0)
    lo, hi = wilson_ci(50, 100)
    assert lo < 0.5 < hi and hi - 0.5 == pytest.approx(0.5 - lo)
    assert wilson_ci(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_ci(11, 10)


def test_bootstrap_ci_is_seeded_and_local():
    import numpy as np

    state = np.random.get_state()[1].copy()
    a = bootstrap_ci([0, 1, 1, 0, 1], seed=7, n_samples=300)
    b = bootstrap_ci([0, 1, 1, 0, 1], seed=7, n_samples=300)
    assert a == b
    assert (np.random.get_state()[1] == state).all()  # the global NumPy RNG is untouched

"""Evaluation metrics: answer matching (EM/F1, GSM8K numbers), ROUGE, BLEU and retrieval metrics.

- EM / token F1 with SQuAD answer normalisation (Rajpurkar et al. 2016), as used by HotpotQA and the
  ReAct paper (Yao et al. 2023), including HotpotQA's rule that yes/no/noanswer only match exactly.
- GSM8K numeric match (Cobbe et al. 2021): the gold is the number after ``####``; predictions are read
  as numbers ("$1,234.50", "18.0", "50%") and compared with a tolerance.
- ROUGE-1/2/L/Lsum (Lin 2004) through Google's ``rouge-score`` and BLEU (Papineni et al. 2002) through
  ``sacrebleu`` (Post 2018), so figures are comparable with published ones. Both are checked against
  the libraries' own test vectors in ../shared/data/metrics.
- ``lcs`` (longest common subsequence) and ``rouge_l`` written out, the computation hidden inside
  rouge-score's ROUGE-L, with worked examples; their figures equal the library's.
- Retrieval Recall@k, MRR@k, nDCG@k (Järvelin & Kekäläinen 2002) with BEIR/pytrec_eval conventions:
  linear gains, log2 discounts, a document counted once.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# --------------------------------------------------------------------------------------------------
# answer normalisation, EM, F1

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse whitespace (SQuAD's normaliser).

    >>> normalize_answer("  The  Eiffel-Tower! ")
    'eiffeltower'
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _golds(gold: str | Sequence[str]) -> list[str]:
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds:
        raise ValueError("no gold answers given")
    return golds


def exact_match(pred: str, gold: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer (max over several golds).

    >>> exact_match("The Beatles", "beatles")
    1.0
    """
    p = normalize_answer(pred)
    return max(float(p == normalize_answer(g)) for g in _golds(gold))


def _f1_one(pred: str, gold: str) -> float:
    p_norm, g_norm = normalize_answer(pred), normalize_answer(gold)
    # HotpotQA (and ReAct's evaluation): yes / no / noanswer score only on an exact match.
    special = {"yes", "no", "noanswer"}
    if (p_norm in special or g_norm in special) and p_norm != g_norm:
        return 0.0
    p_tok, g_tok = p_norm.split(), g_norm.split()
    if not p_tok or not g_tok:  # SQuAD v2: both empty -> 1, one empty -> 0
        return float(p_tok == g_tok)
    common = Counter(p_tok) & Counter(g_tok)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p_tok), same / len(g_tok)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, gold: str | Sequence[str]) -> float:
    """Token-level F1 of normalised answers (max over several golds).

    >>> round(f1_score("the cat sat", "a cat sat down"), 4)
    0.8
    """
    return max(_f1_one(pred, g) for g in _golds(gold))


# --------------------------------------------------------------------------------------------------
# numbers (GSM8K)

# A number: optional sign and $, digits with optional thousands commas and decimals, optional %.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>-)?\s?\$?\s?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?P<pct>\s?%)?"
)
_ANSWER_IS = re.compile(r"answer is[:\s]*", re.IGNORECASE)


def _parse_number(match: re.Match[str]) -> float:
    value = float(match.group("num").replace(",", ""))
    return -value if match.group("sign") else value


def extract_number(text: str | float | int | None) -> float | None:
    """The answer number in ``text``: after the last ``####`` (GSM8K gold), else after the last
    "answer is", else the last number in the text. Commas, ``$`` and ``%`` are ignored ("50%" -> 50).

    >>> extract_number("Natalia sold 48/2 = 24 clips in May.\\n#### 72")
    72.0
    >>> extract_number("The answer is $1,234.50.")
    1234.5
    >>> extract_number("no digits here") is None
    True
    """
    if text is None:
        return None
    if isinstance(text, bool):
        raise TypeError("extract_number() expects text or a number, not a bool")
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    else:
        hits = list(_ANSWER_IS.finditer(text))
        if hits:
            tail = text[hits[-1].end() :]
            first = _NUMBER.search(tail)
            if first:
                return _parse_number(first)
    matches = list(_NUMBER.finditer(text))
    return _parse_number(matches[-1]) if matches else None


def numeric_match(pred: str | float | int | None, gold: str | float | int, tol: float = 1e-6) -> float:
    """1.0 if the numbers read from ``pred`` and ``gold`` agree within ``tol`` (relative and absolute).

    >>> numeric_match("18.0", "18"), numeric_match("$1,000", 1000), numeric_match("17", "18")
    (1.0, 1.0, 0.0)
    """
    g = extract_number(gold)
    if g is None:
        raise ValueError(f"the gold answer {gold!r} contains no number")
    p = extract_number(pred)
    if p is None:
        return 0.0
    return float(math.isclose(p, g, rel_tol=tol, abs_tol=tol))


# --------------------------------------------------------------------------------------------------
# ROUGE (rouge-score)


@dataclass(frozen=True)
class PRF:
    """Precision, recall, F-measure (0–1)."""

    precision: float
    recall: float
    fmeasure: float


@dataclass
class RougeReport:
    """Per-example ROUGE scores and their means (``aggregate``), keyed by rouge type."""

    per_example: list[dict[str, PRF]]
    aggregate: dict[str, PRF]
    types: tuple[str, ...] = ROUGE_TYPES


def _refs_per_example(refs: Sequence[str] | Sequence[Sequence[str]], n: int) -> list[list[str]]:
    if len(refs) != n:
        raise ValueError(f"{n} predictions but {len(refs)} references; give one reference (or list) each")
    out = []
    for i, r in enumerate(refs):
        group = [r] if isinstance(r, str) else list(r)
        if not group or not all(isinstance(x, str) for x in group):
            raise ValueError(f"reference {i} must be a string or a non-empty list of strings")
        out.append(group)
    return out


def rouge(
    preds: Sequence[str],
    refs: Sequence[str] | Sequence[Sequence[str]],
    types: Sequence[str] = ROUGE_TYPES,
    *,
    use_stemmer: bool = False,
) -> RougeReport:
    """ROUGE of each prediction against its reference(s) with ``rouge_score.RougeScorer``.

    Note the library's argument order, ``score(target, prediction)``; with several references the one
    with the best F-measure is used per type (``score_multi``). rougeLsum splits sentences on newlines,
    so for one-line texts it equals rougeL. The aggregate is the mean of per-example P, R and F.
    """
    from rouge_score import rouge_scorer  # imported here: pulls in nltk/absl

    types = tuple(types)
    bad = [t for t in types if not re.fullmatch(r"rouge[1-9]|rougeL|rougeLsum", t)]
    if bad or not types:
        raise ValueError(f"unknown rouge types {bad or types}; use any of {', '.join(ROUGE_TYPES)}")
    groups = _refs_per_example(refs, len(preds))
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    per_example: list[dict[str, PRF]] = []
    for pred, group in zip(preds, groups, strict=True):
        scores = scorer.score(group[0], pred) if len(group) == 1 else scorer.score_multi(group, pred)
        per_example.append({t: PRF(s.precision, s.recall, s.fmeasure) for t, s in scores.items()})
    aggregate = {
        t: PRF(*(_mean([getattr(e[t], f) for e in per_example]) for f in ("precision", "recall", "fmeasure")))
        for t in types
    }
    return RougeReport(per_example=per_example, aggregate=aggregate, types=types)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def lcs(a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
    """The longest common subsequence of ``a`` and ``b``: items of both, in order, not necessarily adjacent.

    Dynamic programming (Wagner & Fischer 1974; the LCS behind ROUGE-L, Lin 2004): ``table[i][j]`` is the
    LCS length of ``a[:i]`` and ``b[:j]``, one more than ``table[i-1][j-1]`` when ``a[i-1] == b[j-1]``,
    else the larger of ``table[i-1][j]`` and ``table[i][j-1]``; walking back from ``table[len(a)][len(b)]``
    recovers one such subsequence. O(len(a)·len(b)) time and memory. Written out (rouge-score has the
    same table in a private function) so the algorithm has a name and a home; ``rouge_l`` is checked
    against rouge-score's figures in the tests. Worked example::

        >>> lcs("the cat sat on the mat".split(), "the cat was found under the bed".split())
        ['the', 'cat', 'the']
        >>> "".join(lcs("ABCBDAB", "BDCABA"))      # length 4, the textbook pair (CLRS §15.4)
        'BCBA'
    """
    n, m = len(a), len(b)
    table = [[0] * (m + 1) for _ in range(n + 1)]  # (n+1, m+1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    out: list[Any] = []
    i, j = n, m
    while i and j:
        if a[i - 1] == b[j - 1]:
            out.append(a[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] >= table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l(pred: str, ref: str, *, use_stemmer: bool = False) -> PRF:
    """ROUGE-L of one prediction against one reference (Lin 2004, §3.1): with ``L = len(lcs(pred, ref))``
    over rouge-score's tokens (lower-cased alphanumeric words, optionally Porter-stemmed), precision is
    ``L / len(pred)``, recall ``L / len(ref)`` and the F-measure their harmonic mean (rouge-score's β = 1).
    Worked example::

        pred = "The cat sat on the mat."           tokens: the cat sat on the mat          (6)
        ref  = "the cat was found under the bed"   tokens: the cat was found under the bed (7)
        lcs  = the cat the                         L = 3
        >>> rouge_l("The cat sat on the mat.", "the cat was found under the bed")
        PRF(precision=0.5, recall=0.42857142857142855, fmeasure=0.4615384615384615)

    ``rouge(preds, refs, types=["rougeL"])`` gives the same figures through the library.
    """
    from rouge_score import tokenizers  # rouge-score's own tokenizer, so the tokens (and figures) agree

    tok = tokenizers.DefaultTokenizer(use_stemmer=use_stemmer)
    p, r = tok.tokenize(pred), tok.tokenize(ref)
    if not p or not r:
        return PRF(0.0, 0.0, 0.0)
    length = len(lcs(p, r))
    precision, recall = length / len(p), length / len(r)
    f = 2 * precision * recall / (precision + recall) if length else 0.0
    return PRF(precision, recall, f)


# --------------------------------------------------------------------------------------------------
# BLEU (sacrebleu)


@dataclass(frozen=True)
class BleuResult:
    """A BLEU score on sacrebleu's 0–100 scale, with its parts and reproducibility signature."""

    score: float
    precisions: list[float]
    bp: float
    sys_len: int
    ref_len: int
    signature: str = ""
    counts: list[int] = field(default_factory=list)
    totals: list[int] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.sys_len / self.ref_len if self.ref_len else 0.0


def _from_sacrebleu(s: Any, signature: str = "") -> BleuResult:
    return BleuResult(
        score=float(s.score),
        precisions=[float(p) for p in s.precisions],
        bp=float(s.bp),
        sys_len=int(s.sys_len),
        ref_len=int(s.ref_len),
        signature=signature,
        counts=[int(c) for c in s.counts],
        totals=[int(t) for t in s.totals],
    )


def _streams(refs: Sequence[str] | Sequence[Sequence[str]], n: int) -> list[list[str | None]]:
    """Per-hypothesis references -> sacrebleu's reference streams (padding with None when the number of
    references varies, which sacrebleu skips)."""
    groups = _refs_per_example(refs, n)
    width = max((len(g) for g in groups), default=1)
    return [[g[j] if j < len(g) else None for g in groups] for j in range(width)]


def bleu(
    preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], **sacrebleu_kwargs: Any
) -> BleuResult:
    """Corpus BLEU with ``sacrebleu.metrics.BLEU(**sacrebleu_kwargs)`` (defaults: 13a tokenizer, exp
    smoothing, 4-grams). ``refs[i]`` is the reference (or list of references) for ``preds[i]``.

    >>> round(bleu(["the cat sat on the mat"], ["the cat sat on the mat"]).score, 2)
    100.0
    """
    from sacrebleu.metrics import BLEU

    metric = BLEU(**sacrebleu_kwargs)
    score = metric.corpus_score(list(preds), _streams(refs, len(preds)))
    return _from_sacrebleu(score, str(metric.get_signature()))


def sentence_bleu(pred: str, refs: str | Sequence[str], **sacrebleu_kwargs: Any) -> BleuResult:
    """Sentence BLEU (sacrebleu; ``effective_order=True`` unless given, as sacrebleu recommends)."""
    from sacrebleu.metrics import BLEU

    sacrebleu_kwargs.setdefault("effective_order", True)
    metric = BLEU(**sacrebleu_kwargs)
    group = [refs] if isinstance(refs, str) else list(refs)
    if not group:
        raise ValueError("sentence_bleu needs at least one reference")
    return _from_sacrebleu(metric.sentence_score(pred, group), str(metric.get_signature()))


def bleu_from_counts(
    correct: Sequence[int], total: Sequence[int], sys_len: int, ref_len: int, **kwargs: Any
) -> BleuResult:
    """BLEU from n-gram match counts (sacrebleu's ``BLEU.compute_bleu``), e.g. to combine shards."""
    from sacrebleu.metrics import BLEU

    score = BLEU.compute_bleu(list(correct), list(total), sys_len, ref_len, **kwargs)
    return _from_sacrebleu(score)


# --------------------------------------------------------------------------------------------------
# retrieval


def _unique(ids: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    return [i for i in ids if not (i in seen or seen.add(i))]


def _relevance(relevant: Collection[str] | Mapping[str, float]) -> dict[str, float]:
    rel = (
        {k: float(v) for k, v in relevant.items()}
        if isinstance(relevant, Mapping)
        else dict.fromkeys(relevant, 1.0)
    )
    rel = {k: v for k, v in rel.items() if v > 0}
    if not rel:
        raise ValueError("no relevant documents given (skip queries without relevance judgements)")
    return rel


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def recall_at_k(retrieved: Sequence[str], relevant: Collection[str] | Mapping[str, float], k: int) -> float:
    """Share of the relevant documents found in the top ``k``.

    >>> recall_at_k(["d3", "d1", "d9"], {"d1", "d2"}, k=2)
    0.5
    """
    _check_k(k)
    rel = _relevance(relevant)
    return sum(1 for d in _unique(retrieved)[:k] if d in rel) / len(rel)


def mrr_at_k(retrieved: Sequence[str], relevant: Collection[str] | Mapping[str, float], k: int) -> float:
    """Reciprocal rank of the first relevant document in the top ``k`` (0 if none).

    >>> mrr_at_k(["d3", "d1", "d9"], {"d1"}, k=10)
    0.5
    """
    _check_k(k)
    rel = _relevance(relevant)
    for rank, d in enumerate(_unique(retrieved)[:k], start=1):
        if d in rel:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(retrieved: Sequence[str], relevant: Collection[str] | Mapping[str, float], k: int) -> float:
    """nDCG@k with linear gains (a set means gain 1): DCG = sum(rel_i / log2(i + 1)), i from 1.

    >>> round(ndcg_at_k(["d3", "d1"], {"d1"}, k=2), 4)
    0.6309
    """
    _check_k(k)
    rel = _relevance(relevant)
    dcg = sum(rel.get(d, 0.0) / math.log2(i + 1) for i, d in enumerate(_unique(retrieved)[:k], start=1))
    ideal = sorted(rel.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 1) for i, g in enumerate(ideal, start=1))
    return dcg / idcg


def evaluate_retrieval(
    results: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, float]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Mean Recall@k, MRR@k and nDCG@k over the queries that have judgements (BEIR convention).

    Returns ``{"recall@10": .., "mrr@10": .., "ndcg@10": .., ..., "queries": n}``; a query with judgements
    but no results scores 0.
    """
    judged = [q for q in qrels if any(v > 0 for v in qrels[q].values())]
    if not judged:
        raise ValueError("no query has relevance judgements")
    out: dict[str, float] = {}
    for k in ks:
        for name, fn in (("recall", recall_at_k), ("mrr", mrr_at_k), ("ndcg", ndcg_at_k)):
            out[f"{name}@{k}"] = _mean([fn(results.get(q, []), qrels[q], k) for q in judged])
    out["queries"] = float(len(judged))
    return out


# --------------------------------------------------------------------------------------------------
# scoring aligned lists of texts (what `ragloop score` prints)

SCORE_METRICS = ("em", "f1", "numeric", "rouge", "bleu")


@dataclass
class ScoreReport:
    """Per-example scores and the aggregate for one metric over aligned predictions/references."""

    metric: str
    per_example: list[dict[str, Any]]
    aggregate: dict[str, Any]


def score_texts(
    metric: str,
    preds: Sequence[str],
    refs: Sequence[Sequence[str]],
    *,
    use_stemmer: bool = False,
    seed: int = 0,
) -> ScoreReport:
    """Score ``preds[i]`` against the references ``refs[i]`` (one or more each) with one metric.

    em / numeric: per-example 0/1, aggregate mean with a Wilson 95% interval; f1: per-example token F1,
    aggregate mean with a bootstrap 95% interval (``seed``); rouge: per-example P/R/F of each ROUGE type,
    aggregate means; bleu: per-example sentence BLEU, aggregate **corpus** BLEU (not a mean of sentences).

    >>> score_texts("em", ["Paris", "Rome"], [["paris"], ["Milan"]]).aggregate["em"]
    0.5
    """
    from ragloop.eval.stats import bootstrap_ci, wilson_ci

    if metric not in SCORE_METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(SCORE_METRICS)}")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError("nothing to score: no examples")
    n = len(preds)
    if metric in ("em", "f1", "numeric"):
        fn = {"em": exact_match, "f1": f1_score, "numeric": lambda p, g: max(numeric_match(p, x) for x in g)}[
            metric
        ]
        values = [float(fn(p, list(g))) for p, g in zip(preds, refs, strict=True)]
        mean = _mean(values)
        if metric == "f1":
            lo, _, hi = bootstrap_ci(values, seed=seed)
            ci = [float(lo), float(hi)]
        else:
            ci = list(wilson_ci(int(round(sum(values))), n))
        return ScoreReport(metric, [{metric: v} for v in values], {metric: mean, "ci95": ci, "n": n})
    if metric == "rouge":
        report = rouge(preds, [list(g) for g in refs], use_stemmer=use_stemmer)
        per = [{t: vars(e[t]) for t in report.types} for e in report.per_example]
        agg: dict[str, Any] = {t: vars(report.aggregate[t]) for t in report.types}
        agg["n"] = n
        return ScoreReport(metric, per, agg)
    corpus = bleu(preds, [list(g) for g in refs])
    per = [{"bleu": sentence_bleu(p, list(g)).score} for p, g in zip(preds, refs, strict=True)]
    agg = {
        "bleu": corpus.score,
        "precisions": corpus.precisions,
        "bp": corpus.bp,
        "sys_len": corpus.sys_len,
        "ref_len": corpus.ref_len,
        "signature": corpus.signature,
        "n": n,
    }
    return ScoreReport(metric, per, agg)

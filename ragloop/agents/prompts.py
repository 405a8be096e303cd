"""In-context learning: the exemplar sets of the papers, chosen by count or similarity, fitted to the window.

Exemplars are read at run time from the shared data folder (never copied into the package):

- CoT: the 8 GSM8K exemplars of Wei et al. 2022 ("Chain-of-Thought Prompting Elicits Reasoning"), as used
  by lm-evaluation-harness's ``gsm8k_cot`` task (``gsm8k/gsm8k_cot_8shot_exemplars.json``).
- PAL: the 8 ``def solution():`` exemplars of Gao et al. 2023 ("PAL: Program-aided Language Models",
  ``pal/pal_gsm8k_math_prompt.txt``).
- ReAct: the 6 HotpotQA trajectories of Yao et al. 2023 (``react/prompts_naive.json``,
  ``webthink_simple6``) and the 3 FEVER ones (``react/prompts_fever.json``, ``webthink_simple3``), with
  observations wrapped in our data delimiters. For arithmetic, ``react_math_exemplars`` turns the CoT
  exemplars into Thought / Calculator / Finish trajectories (observations computed by our calculator).

``select_exemplars`` picks the first k or the k most similar to the question (an injected embedder,
Liu et al. 2022, "What Makes Good In-Context Examples for GPT-3?"); ``fit_exemplars`` drops whole
exemplars, least relevant first, until the prompt fits the policy's context window — never cutting one
in the middle — and raises ``ContextWindowError`` when even zero exemplars do not fit.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragloop.agents.calculator import CalculatorError, evaluate, format_number
from ragloop.agents.safety import wrap_observation
from ragloop.core.errors import ContextWindowError, DataError, UsageError
from ragloop.models.types import Policy, Prompt

log = logging.getLogger(__name__)


def shared_data_dir() -> Path:
    """``$RAGLOOP_DATA`` or ``<repo>/../shared/data`` (the shared evaluation data, read in place)."""
    env = os.environ.get("RAGLOOP_DATA")
    if env:
        return Path(env).expanduser()
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def data_path(*parts: str) -> Path:
    """A file under the shared data folder; a clear DataError when it is missing."""
    p = shared_data_dir().joinpath(*parts)
    if not p.exists():
        raise DataError(
            f"shared data file not found: {p}",
            hint="set RAGLOOP_DATA to the folder holding gsm8k/, pal/, react/ (the project's shared/data)",
        )
    return p


@dataclass(frozen=True)
class Exemplar:
    """One worked example: the question and the text that answers it in the target format."""

    question: str
    answer: str
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


# ---------------------------------------------------------------------------------------- loaders
def load_cot_exemplars(path: str | Path | None = None) -> list[Exemplar]:
    """The 8 GSM8K chain-of-thought exemplars (answer text ends with ``The answer is N.``)."""
    p = Path(path) if path else data_path("gsm8k", "gsm8k_cot_8shot_exemplars.json")
    try:
        rows = json.loads(p.read_text(encoding="utf-8"))["samples"]
        return [Exemplar(r["question"].strip(), r["target"].strip(), id=f"cot-{i}") for i, r in enumerate(rows)]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: not a CoT exemplar file ({e})") from None


def load_pal_exemplars(path: str | Path | None = None) -> list[Exemplar]:
    """The 8 PAL exemplars: question and its ``def solution():`` program."""
    p = Path(path) if path else data_path("pal", "pal_gsm8k_math_prompt.txt")
    text = p.read_text(encoding="utf-8")
    blocks = re.split(r"^Q: ", text, flags=re.M)
    out = []
    for block in blocks:
        if "{question}" in block or "def solution" not in block:
            continue
        q, _, rest = block.partition("\n")
        code = rest.split("# solution in Python:", 1)[-1].strip("\n")
        out.append(Exemplar(q.strip(), code.rstrip() + "\n", id=f"pal-{len(out)}"))
    if not out:
        raise DataError(f"{p}: no 'Q: … def solution():' exemplars found")
    return out


def wrap_trajectory_observations(trajectory: str) -> str:
    """``Observation i: text`` lines of a paper trajectory rewritten with our data delimiters."""
    return re.sub(
        r"^(Observation \d+:)\s*(.*)$",
        lambda m: f"{m.group(1)} {wrap_observation(m.group(2))}",
        trajectory,
        flags=re.M,
    )


def _split_react_prompt(text: str, head: str) -> list[tuple[str, str]]:
    parts = re.split(rf"^{head}:\s*", text.strip(), flags=re.M)
    out = []
    for part in parts:
        if "Thought 1:" not in part:
            continue
        q, _, traj = part.partition("\n")
        out.append((q.strip(), traj.strip()))
    return out


def load_react_exemplars(key: str = "webthink_simple6", path: str | Path | None = None) -> list[Exemplar]:
    """The ReAct paper's HotpotQA trajectories (``Question:`` … ``Finish[...]``)."""
    p = Path(path) if path else data_path("react", "prompts_naive.json")
    prompts = json.loads(p.read_text(encoding="utf-8"))
    if key not in prompts:
        raise DataError(f"{p}: no prompt {key!r}; available: {sorted(prompts)}")
    pairs = _split_react_prompt(prompts[key], "Question")
    return [Exemplar(q, wrap_trajectory_observations(t), id=f"react-{i}") for i, (q, t) in enumerate(pairs)]


def load_fever_exemplars(key: str = "webthink_simple3", path: str | Path | None = None) -> list[Exemplar]:
    """The ReAct paper's FEVER claim-verification trajectories (``Claim:`` … ``Finish[SUPPORTS]``)."""
    p = Path(path) if path else data_path("react", "prompts_fever.json")
    prompts = json.loads(p.read_text(encoding="utf-8"))
    if key not in prompts:
        raise DataError(f"{p}: no prompt {key!r}; available: {sorted(prompts)}")
    pairs = _split_react_prompt(prompts[key], "Claim")
    return [Exemplar(q, wrap_trajectory_observations(t), id=f"fever-{i}") for i, (q, t) in enumerate(pairs)]


def _split_cot_prompt(text: str, head: str) -> list[tuple[str, str]]:
    out = []
    for part in re.split(rf"^{head}:\s*", text.strip(), flags=re.M):
        q, _, rest = part.partition("\n")
        if not rest.strip().startswith("Thought:"):
            continue
        out.append((q.strip(), rest.strip()[len("Thought:"):].strip()))
    return out


def load_hotpot_cot_exemplars(key: str = "cotqa_simple6", path: str | Path | None = None) -> list[Exemplar]:
    """The ReAct paper's CoT exemplars for HotpotQA (``Question:`` / ``Thought: …`` / ``Answer: …``)."""
    p = Path(path) if path else data_path("react", "prompts_naive.json")
    prompts = json.loads(p.read_text(encoding="utf-8"))
    if key not in prompts:
        raise DataError(f"{p}: no prompt {key!r}; available: {sorted(prompts)}")
    return [Exemplar(q, a, id=f"hotpot-cot-{i}") for i, (q, a) in enumerate(_split_cot_prompt(prompts[key], "Question"))]


def load_fever_cot_exemplars(key: str = "cotqa_simple3", path: str | Path | None = None) -> list[Exemplar]:
    """The ReAct paper's CoT exemplars for FEVER (``Claim:`` / ``Thought: …`` / ``Answer: SUPPORTS``)."""
    p = Path(path) if path else data_path("react", "prompts_fever.json")
    prompts = json.loads(p.read_text(encoding="utf-8"))
    if key not in prompts:
        raise DataError(f"{p}: no prompt {key!r}; available: {sorted(prompts)}")
    return [Exemplar(q, a, id=f"fever-cot-{i}") for i, (q, a) in enumerate(_split_cot_prompt(prompts[key], "Claim"))]


def load_gsm8k_pool(path: str | Path, limit: int | None = None) -> list[Exemplar]:
    """GSM8K rows as CoT exemplars (calculator annotations removed, ``#### N`` → ``The answer is N.``),
    a pool for similarity-chosen exemplars (e.g. ``gsm8k/train.jsonl``)."""
    p = Path(path)
    out = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                body, _, gold = row["answer"].rpartition("####")
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise DataError(f"{p}:{lineno}: not a GSM8K row with 'question' and 'answer'") from None
            body = re.sub(r"<<[^>]*>>", "", body).strip().replace("\n", " ")
            out.append(Exemplar(row["question"].strip(), f"{body} The answer is {gold.strip()}.", id=f"{p.stem}-{lineno}"))
    return out


_EQ_RE = re.compile(r"(\d[\d.,]*(?:\s*[-+*/x×]\s*\d[\d.,]*)+)\s*(?:=|is)\s*\$?(\d[\d.,]*)")
_ANSWER_IS_RE = re.compile(r"The answer is\s*\$?(-?[\d.,]+)", re.I)


def cot_to_react_math(ex: Exemplar) -> Exemplar:
    """A CoT exemplar as a ReAct trajectory with Calculator actions and a Finish.

    Each equation ``a op b = n`` of the rationale becomes ``Action i: Calculator[a op b]`` whose
    observation is computed by the calculator (so the exemplars can never disagree with the tool).
    """
    m = _ANSWER_IS_RE.search(ex.answer)
    if m is None:
        raise DataError(f"CoT exemplar {ex.id} has no 'The answer is N'")
    final = m.group(1).rstrip(".").replace(",", "")
    rationale = ex.answer[: m.start()].strip()
    lines: list[str] = []
    pending: list[str] = []
    step = 1
    for sent in re.split(r"(?<=\.)\s+", rationale):
        eq = _EQ_RE.search(sent)
        if eq is None:
            pending.append(sent)
            continue
        expr = re.sub(r"\s*[x×]\s*", " * ", eq.group(1)).strip()
        try:
            value = format_number(evaluate(expr))
        except CalculatorError:
            pending.append(sent)
            continue
        thought = " ".join([*pending, f"I need to compute {expr}."]).strip()
        lines += [f"Thought {step}: {thought}", f"Action {step}: Calculator[{expr}]",
                  f"Observation {step}: {wrap_observation(value)}"]
        pending = []
        step += 1
    lines += [f"Thought {step}: {' '.join([*pending, f'The answer is {final}.']).strip()}",
              f"Action {step}: Finish[{final}]"]
    return Exemplar(ex.question, "\n".join(lines), id=ex.id.replace("cot", "react-math"))


def react_math_exemplars(path: str | Path | None = None) -> list[Exemplar]:
    return [cot_to_react_math(e) for e in load_cot_exemplars(path)]


# -------------------------------------------------------------------------------------- selection
EmbedFn = Callable[[list[str]], Any]  # texts -> (N, D) array-like


def as_embed_fn(embedder: Any) -> EmbedFn:
    """A texts → vectors function from a callable, a LangChain ``Embeddings`` or a sentence-transformer."""
    if embedder is None:
        raise UsageError("similarity selection needs an embedder")
    for name in ("embed_documents", "encode", "embed"):
        fn = getattr(embedder, name, None)
        if callable(fn):
            return fn
    if callable(embedder):
        return embedder
    raise UsageError(f"cannot embed with {type(embedder).__name__}: give a callable or an object with "
                     "embed_documents/encode")


def rank_by_similarity(query: str, pool: Sequence[Exemplar], embed: EmbedFn) -> list[int]:
    """Indices of ``pool`` by decreasing cosine similarity of their questions to ``query`` (stable)."""
    vecs = np.asarray(embed([query, *[e.question for e in pool]]), dtype=np.float64)  # (1+N, D)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12
    sims = vecs[1:] @ vecs[0]  # (N,)
    return sorted(range(len(pool)), key=lambda i: (-round(float(sims[i]), 9), i))


def select_exemplars(
    pool: Sequence[Exemplar],
    k: int,
    *,
    query: str | None = None,
    embedder: Any = None,
    exclude_question: bool = True,
) -> list[Exemplar]:
    """The first ``k`` exemplars, or with an embedder the ``k`` most similar to ``query`` (most similar
    first). With ``exclude_question`` an exemplar whose question equals the query is skipped (no leak)."""
    if k < 0:
        raise UsageError(f"the number of exemplars must be >= 0, got {k}")
    cands = [e for e in pool if not (exclude_question and query is not None and e.question.strip() == query.strip())]
    if k > len(cands):
        raise UsageError(f"asked for {k} exemplars but the pool has {len(cands)}")
    if embedder is None or query is None or k == 0:
        return list(cands[:k])
    order = rank_by_similarity(query, cands, as_embed_fn(embedder))
    return [cands[i] for i in order[:k]]


def fit_exemplars(
    exemplars: Sequence[Exemplar],
    build: Callable[[list[Exemplar]], Prompt],
    policy: Policy,
    *,
    reserve_tokens: int,
) -> tuple[list[Exemplar], Prompt]:
    """Drop whole exemplars from the end until ``build(chosen)`` plus ``reserve_tokens`` fits the window.

    Returns the exemplars kept and the prompt. Raises ``ContextWindowError`` (with the sizes) when the
    prompt does not fit even without exemplars.
    """
    chosen = list(exemplars)
    while True:
        prompt = build(chosen)
        n = policy.count_tokens(prompt)
        if n + reserve_tokens <= policy.context_window:
            if len(chosen) < len(exemplars):
                log.info("dropped %d of %d exemplars to fit the context window of %d tokens",
                         len(exemplars) - len(chosen), len(exemplars), policy.context_window)
            return chosen, prompt
        if not chosen:
            raise ContextWindowError(
                f"the prompt needs {n} tokens plus {reserve_tokens} for generation, over the context window "
                f"of {policy.context_window} even with no exemplars",
                hint="shorten the question or lower max_new_tokens / the step budget",
            )
        chosen.pop()

"""Which grammar-constrained decoding library: per-token cost of four maintained PyPI libraries on this CPU.

The question issue 10 §2 asks before ``ragloop.models.grammar`` picks one: with the embedded SmolLM2
tokenizer (vocabulary 49152), what does one decode step of masking cost per batch of R rows (R = 1, 16, 64)?
One step = every row computes its allowed-token mask for its current state, the masks are applied to an
``(R, V)`` float32 logits tensor (set to -inf where disallowed), and every row advances by one token.
Rows are teacher-forced along a known valid text (the tokenised answer), so all libraries do the same
work on the same states. Two grammars, both written the way the agents use them:

- ``react``: the ReAct paper step as a regular expression (free thought line, then
  ``Action 1: (Search|Lookup|Finish)[argument]``);
- ``json``: a JSON tool call for a two-argument tool, as a JSON schema.

Candidates (each skipped when it is not importable; ``ragloop`` depends only on the one it picked):
llguidance (Rust, Microsoft guidance's core), xgrammar (C++, MLC), outlines-core (Rust, dottxt),
lm-format-enforcer (pure Python). Install the others next to the venv to rerun the comparison, e.g.
``pip install --target /tmp/gcand --no-deps xgrammar apache-tvm-ffi outlines-core lm-format-enforcer
interegular`` and ``PYTHONPATH=/tmp/gcand``.

Baseline in the same run: the embedded model's own decode step at the same batch size (fp32, the fast
path), so each library's cost is also given as a fraction of a model step. Prints one JSON line.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_grammar_libs.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

REACT_REGEX = r" [^\n]+\nAction 1: (Search|Lookup|Finish)\[[^\]\n]+\]"
REACT_TEXT = " I need to search Colorado orogeny and find the area it extends into.\nAction 1: Search[Colorado orogeny]"
JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "tool": {"const": "convert_currency"},
        "arguments": {
            "type": "object",
            "properties": {"amount": {"type": "number"}, "currency": {"type": "string"}},
            "required": ["amount", "currency"],
            "additionalProperties": False,
        },
    },
    "required": ["tool", "arguments"],
    "additionalProperties": False,
}
JSON_TEXT = '{"tool": "convert_currency", "arguments": {"amount": 125.5, "currency": "EUR"}}'


# -- one adapter per library: compile(grammar) -> make_matcher() ; step(matchers, logits, tokens) ------------


def llguidance_adapter(tok: Any) -> dict[str, Callable[..., Any]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    lltok = llguidance.hf.from_tokenizer(tok)
    executor = llguidance.LLExecutor()

    def compile_(kind: str, src: str) -> Any:
        g = (llguidance.LLMatcher.grammar_from_regex(src) if kind == "regex"
             else llguidance.LLMatcher.grammar_from_json_schema(src))
        return g

    protos: dict[str, Any] = {}

    def matcher(g: Any) -> Any:
        # one compiled prototype per grammar, deep-copied per row (copies share the lexer caches)
        if g not in protos:
            protos[g] = llguidance.LLMatcher(lltok, g)
        return protos[g].deep_copy()

    def step(ms: list[Any], logits: torch.Tensor, toks: list[int], state: dict[str, Any]) -> None:
        from ragloop.models.grammar import apply_bitmask

        mask = state.setdefault("mask", lt.allocate_token_bitmask(len(ms), lltok.vocab_size))
        if len(ms) == 1:
            lt.fill_next_token_bitmask(ms[0], mask, 0)
        else:
            lt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(ms)], mask)
        # plain-torch unpacking (llguidance.torch's apply is torch.compile'd: a C++ build at first call on CPU)
        apply_bitmask(logits, mask)
        for m, t in zip(ms, toks, strict=True):
            m.consume_token(t)

    return {"compile": compile_, "matcher": matcher, "step": step}


def xgrammar_adapter(tok: Any) -> dict[str, Callable[..., Any]]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info)

    def compile_(kind: str, src: str) -> Any:
        return compiler.compile_regex(src) if kind == "regex" else compiler.compile_json_schema(src)

    def matcher(g: Any) -> Any:
        return xgr.GrammarMatcher(g)

    def step(ms: list[Any], logits: torch.Tensor, toks: list[int], state: dict[str, Any]) -> None:
        mask = state.setdefault("mask", xgr.allocate_token_bitmask(len(ms), info.vocab_size))
        if len(ms) > 1 and hasattr(xgr, "BatchGrammarMatcher"):
            bm = state.setdefault("batch", xgr.BatchGrammarMatcher())
            bm.batch_fill_next_token_bitmask(ms, mask)
        else:
            for i, m in enumerate(ms):
                m.fill_next_token_bitmask(mask, i)
        xgr.apply_token_bitmask_inplace(logits, mask)
        for m, t in zip(ms, toks, strict=True):
            m.accept_token(t)

    return {"compile": compile_, "matcher": matcher, "step": step}


def _byte_level_vocab(tok: Any) -> tuple[dict[str, list[int]], int]:
    """token text -> ids for outlines-core (GPT-2 byte-level pieces decoded; non-UTF-8 pieces skipped)."""
    # GPT-2's byte <-> printable-character table (Radford et al. 2019; transformers 5 no longer exports it)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    inv = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    special = set(tok.all_special_ids)
    out: dict[str, list[int]] = {}
    for piece, i in tok.get_vocab().items():
        if i in special:
            continue
        try:
            text = bytes(inv[c] for c in piece).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        out.setdefault(text, []).append(i)
    return out, int(tok.eos_token_id)


def outlines_adapter(tok: Any) -> dict[str, Callable[..., Any]]:
    import outlines_core as oc
    import outlines_core.kernels.torch as ok
    from outlines_core.json_schema import build_regex_from_schema

    vmap, eos = _byte_level_vocab(tok)
    vocab = oc.Vocabulary(eos, vmap)

    def compile_(kind: str, src: str) -> Any:
        return oc.Index(src if kind == "regex" else build_regex_from_schema(src), vocab)

    def matcher(g: Any) -> Any:
        return oc.Guide(g)

    def step(ms: list[Any], logits: torch.Tensor, toks: list[int], state: dict[str, Any]) -> None:
        mask = state.setdefault("mask", ok.allocate_token_bitmask(len(tok)))
        # outlines-core's kernels take one row at a time
        for i, m in enumerate(ms):
            ok.fill_next_token_bitmask(m, mask)
            ok.apply_token_bitmask_inplace(logits[i : i + 1], mask)
        for m, t in zip(ms, toks, strict=True):
            m.advance(t)

    return {"compile": compile_, "matcher": matcher, "step": step}


def lmfe_adapter(tok: Any) -> dict[str, Callable[..., Any]]:
    import transformers.tokenization_utils_base as tub

    # lm-format-enforcer 0.11 imports transformers.tokenization_utils, gone in transformers 5: alias it
    sys.modules.setdefault("transformers.tokenization_utils", tub)
    from lmformatenforcer import JsonSchemaParser, RegexParser, TokenEnforcer
    from lmformatenforcer.integrations.transformers import build_token_enforcer_tokenizer_data

    data = build_token_enforcer_tokenizer_data(tok)

    def compile_(kind: str, src: str) -> Any:
        return (kind, src)

    def matcher(g: Any) -> Any:
        kind, src = g
        parser = RegexParser(src) if kind == "regex" else JsonSchemaParser(json.loads(src))
        return {"enf": TokenEnforcer(data, parser), "ids": []}

    def step(ms: list[Any], logits: torch.Tensor, toks: list[int], state: dict[str, Any]) -> None:
        for i, m in enumerate(ms):
            allowed = m["enf"].get_allowed_tokens(m["ids"])
            allowed = getattr(allowed, "allowed_tokens", allowed)
            keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
            keep[torch.tensor(allowed, dtype=torch.long)] = True
            logits[i].masked_fill_(~keep, float("-inf"))
        for m, t in zip(ms, toks, strict=True):
            m["ids"].append(t)

    return {"compile": compile_, "matcher": matcher, "step": step}


ADAPTERS = {"llguidance": llguidance_adapter, "xgrammar": xgrammar_adapter, "outlines-core": outlines_adapter,
            "lm-format-enforcer": lmfe_adapter}


def time_library(adapter: dict[str, Callable[..., Any]], tok: Any, kind: str, src: str, text: str, rows: int,
                 reps: int) -> dict[str, float]:
    """Compile time and mean microseconds per decode step (mask + apply + advance) at ``rows`` rows."""
    t = time.perf_counter()
    g = adapter["compile"](kind, src)
    adapter["matcher"](g)  # the first matcher: lazy compilers compile here
    compile_s = time.perf_counter() - t
    ids = tok(text, add_special_tokens=False).input_ids
    vocab = len(tok)
    best = float("inf")
    for _ in range(reps):
        ms = [adapter["matcher"](g) for _ in range(rows)]
        state: dict[str, Any] = {}
        base = torch.randn(rows, vocab)  # (R, V)
        spent = 0.0
        for tid in ids:
            logits = base.clone()  # fresh logits each step, as from the model (not timed)
            t = time.perf_counter()
            adapter["step"](ms, logits, [tid] * rows, state)
            spent += time.perf_counter() - t
            if not torch.isfinite(logits[:, tid]).all():
                raise AssertionError(f"the valid text's token {tid} was masked")
        best = min(best, spent / len(ids))
    return {"compile_ms": round(compile_s * 1e3, 2), "us_per_step": round(best * 1e6, 1),
            "us_per_row_token": round(best * 1e6 / rows, 2)}


@torch.inference_mode()
def model_step_us(policy: Any, rows: int, steps: int = 16) -> float:
    """Microseconds of one decode step of the embedded model at ``rows`` rows (the fast path, fp32)."""
    from ragloop.models.decoding import left_pad

    ids, mask = left_pad([policy.tokenize("Question: What is the capital of France?\nThought 1:")] * rows, 0)
    st = policy.stepper(rows=rows, max_len=ids.shape[1] + steps + 2)
    logits = st.prefill(ids, mask)
    nxt = logits.argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        nxt = st.step(nxt).argmax(-1)
    return (time.perf_counter() - t) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,16,64", help="batch sizes (comma-separated)")
    ap.add_argument("--reps", type=int, default=3, help="best of this many passes over the text")
    ap.add_argument("--libs", default=",".join(ADAPTERS), help="libraries to time (comma-separated)")
    ap.add_argument("--no-model", action="store_true", help="skip the model-step baseline")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("RAGLOOP_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))))
    from ragloop.models.loading import load_tokenizer

    tok = load_tokenizer()
    rows_list = [int(r) for r in args.rows.split(",")]
    grammars = {"react": ("regex", REACT_REGEX, REACT_TEXT), "json": ("json", json.dumps(JSON_SCHEMA), JSON_TEXT)}
    out: dict[str, Any] = {"bench": "grammar_libs", "vocab": len(tok),
                           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
                           "libs": {}}
    cpu0 = time.process_time()
    for name in args.libs.split(","):
        try:
            t = time.perf_counter()
            adapter = ADAPTERS[name](tok)
            setup_s = time.perf_counter() - t
        except ImportError as e:
            out["libs"][name] = {"skipped": f"not importable: {e}"}
            continue
        res: dict[str, Any] = {"tokenizer_setup_s": round(setup_s, 2)}
        for gname, (kind, src, text) in grammars.items():
            for rows in rows_list:
                try:
                    res[f"{gname}_r{rows}"] = time_library(adapter, tok, kind, src, text, rows, args.reps)
                except Exception as e:  # noqa: BLE001 - a library failing a grammar is a result to report
                    res[f"{gname}_r{rows}"] = {"error": f"{type(e).__name__}: {e}"[:200]}
        out["libs"][name] = res
        print(name, json.dumps(res), file=sys.stderr, flush=True)
    if not args.no_model:
        from ragloop.models.loading import load_policy

        policy = load_policy()
        out["model_step_us"] = {str(r): round(model_step_us(policy, r), 1) for r in rows_list}
        for res in out["libs"].values():
            for key, v in res.items():
                if isinstance(v, dict) and "us_per_step" in v:
                    v["vs_model_step"] = round(v["us_per_step"] / out["model_step_us"][key.rsplit("_r", 1)[1]], 4)
    out["cpu_s"] = round(time.process_time() - cpu0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

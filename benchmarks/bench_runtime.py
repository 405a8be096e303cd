"""The agent runtime's figures (issue 10): constrained-decoding overhead per token (this part), and — to be
added by the runtime's author — batched eval throughput against the one-at-a-time runner.

Constrained-decoding overhead: the embedded model (fp32 unless ``--precision``) decodes the same ReAct
step prompt greedily for ``--tokens`` tokens at batch 1 and 16, once free and once under the ReAct paper
grammar (``ragloop.models.grammar.react_paper_grammar``, a long thought so rows do not finish early);
the figure is seconds per generated token, constrained / free (goal <= 1.15). Both sides in one run,
each the best of ``--reps``. Structure: one function per measurement, one JSON line at the end.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_runtime.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

PROMPT = ("Solve a task with interleaving Thought, Action, Observation steps.\n"
          "Question: Which magazine was started first, Arthur's Magazine or First for Women?\nThought 1:")


def decode_seconds_per_token(policy: Any, rows: int, tokens: int, grammar: Any, reps: int) -> tuple[float, int]:
    """Best wall seconds per generated token over ``reps`` runs, and tokens generated (all rows)."""
    from ragloop.models.types import GenerationConfig

    best, ntok = float("inf"), 0
    for _ in range(reps):
        cfg = GenerationConfig(max_new_tokens=tokens, greedy=True, n=1, grammar=grammar)
        t = time.perf_counter()
        gens = policy.generate_batch([PROMPT] * rows, cfg)
        dt = time.perf_counter() - t
        ntok = sum(g[0].num_tokens for g in gens)
        best = min(best, dt / max(1, ntok))
    return best, ntok


def constrained_overhead(policy: Any, batch_sizes: list[int], tokens: int, reps: int) -> dict[str, Any]:
    from ragloop.agents.tools import finish_tool
    from ragloop.models.grammar import react_paper_grammar

    tools = [finish_tool(), "Search", "Lookup"]
    spec = react_paper_grammar(tools, step=1, max_thought_tokens=tokens, max_arg_tokens=16)
    decode_seconds_per_token(policy, 1, 4, spec, 1)  # warm: tokenizer trie, grammar, lexer states
    out: dict[str, Any] = {}
    for b in batch_sizes:
        free, n_free = decode_seconds_per_token(policy, b, tokens, None, reps)
        con, n_con = decode_seconds_per_token(policy, b, tokens, spec, reps)
        out[f"batch_{b}"] = {"free_ms_per_token": round(free * 1e3, 3), "constrained_ms_per_token": round(con * 1e3, 3),
                             "ratio": round(con / free, 3), "tokens_free": n_free, "tokens_constrained": n_con}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48, help="tokens decoded per row")
    ap.add_argument("--batch-sizes", default="1,16", help="comma-separated")
    ap.add_argument("--reps", type=int, default=2, help="best of this many runs per setting")
    ap.add_argument("--precision", default="fp32", help="decode weights of the embedded model")
    args = ap.parse_args()
    from ragloop.models.loading import load_policy

    cpu0 = time.process_time()
    policy = load_policy(precision=args.precision)
    res = {"bench": "runtime", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
           "precision": args.precision,
           "constrained_overhead": constrained_overhead(policy, [int(b) for b in args.batch_sizes.split(",")],
                                                        args.tokens, args.reps)}
    res["cpu_s"] = round(time.process_time() - cpu0, 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()

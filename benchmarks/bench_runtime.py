"""The agent runtime's figures (issue 10): constrained-decoding overhead per token, and (``--throughput
AGENT``) batched evaluation throughput against the one-at-a-time runner (``runtime_throughput.py``, whose
options it takes: ``--n``, ``--baseline-n``, ``--batch-size``, ``--task``).

Constrained-decoding overhead: the embedded model (fp32 unless ``--precision``) decodes the same prompt
greedily for up to ``--tokens`` tokens at batch 1 and 16, once free and once under an agent grammar (the
ReAct paper step, and the PAL program: ``ragloop.models.grammar``); the figure is wall time per decode step
(the whole run over its longest row: constrained rows may finish early, and a step costs the same whoever is
still decoding), constrained / free (goal <= 1.15). Both sides in one run, each the best of ``--reps``. On a
busy machine two decodes differ by more than the grammar costs, so the grammar's own work per step (masks of
all rows + advancing them, teacher-forced along the constrained output) is also timed directly and given as a
fraction of the free step (``mask_vs_free_step``). Structure: one function per measurement, one JSON line at the end.
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


def mask_ms_per_step(policy: Any, spec: Any, text: str, rows: int) -> float:
    """The grammar's own cost, measured directly (less noisy than two decodes on a busy machine): ``rows``
    matchers teacher-forced along ``text``; per step the masks of all rows applied to ``(rows, V)`` logits
    (``grammar.apply_masks``) and every row advanced. Milliseconds per step."""
    from ragloop.models import grammar

    ids = policy.tokenize(text)
    ms = [grammar.matcher_for(spec, policy.tokenizer) for _ in range(rows)]
    base = torch.zeros(rows, len(policy.tokenizer))  # (R, V)
    spent = 0.0
    for t in ids:
        logits = base.clone()
        t0 = time.perf_counter()
        grammar.apply_masks(logits, ms)
        for m in ms:
            m.accept(t)
        spent += time.perf_counter() - t0
    return spent / max(1, len(ids)) * 1e3


def decode_seconds_per_step(policy: Any, prompt: str, rows: int, tokens: int, grammar: Any,
                            reps: int) -> tuple[float, int]:
    """Best wall seconds per decode step (run time / longest row) over ``reps`` runs, and tokens generated."""
    from ragloop.models.types import GenerationConfig

    best, ntok = float("inf"), 0
    for _ in range(reps):
        cfg = GenerationConfig(max_new_tokens=tokens, greedy=True, n=1, grammar=grammar)
        t = time.perf_counter()
        gens = policy.generate_batch([prompt] * rows, cfg)
        dt = time.perf_counter() - t
        ntok = sum(g[0].num_tokens for g in gens)
        best = min(best, dt / max(1, max(g[0].num_tokens for g in gens)))
    return best, ntok


PAL_PROMPT = ('Q: Tom has 3 apples and buys 4 more. How many apples does he have?\n\n# solution in Python:\n\n\n'
              'def solution():\n    """Tom has 3 apples and buys 4 more. How many apples does he have?"""')


def constrained_overhead(policy: Any, batch_sizes: list[int], tokens: int, reps: int) -> dict[str, Any]:
    from ragloop.agents.tools import finish_tool
    from ragloop.models.grammar import pal_grammar, react_paper_grammar

    grammars = {
        "react": (PROMPT, react_paper_grammar([finish_tool(), "Search", "Lookup"], step=1,
                                              max_thought_tokens=tokens, max_arg_tokens=16)),
        "pal": (PAL_PROMPT, pal_grammar()),
    }
    out: dict[str, Any] = {}
    for name, (prompt, spec) in grammars.items():
        decode_seconds_per_step(policy, prompt, 1, 4, spec, 1)  # warm: tokenizer trie, grammar, lexer states
        from ragloop.models.types import GenerationConfig

        sample = policy.generate(prompt, GenerationConfig(max_new_tokens=tokens, greedy=True, grammar=spec))[0].text
        for b in batch_sizes:
            free, n_free = decode_seconds_per_step(policy, prompt, b, tokens, None, reps)
            con, n_con = decode_seconds_per_step(policy, prompt, b, tokens, spec, reps)
            mask = min(mask_ms_per_step(policy, spec, sample, b) for _ in range(reps))
            out[f"{name}_batch_{b}"] = {"free_ms_per_step": round(free * 1e3, 2),
                                        "constrained_ms_per_step": round(con * 1e3, 2), "ratio": round(con / free, 3),
                                        "mask_ms_per_step": round(mask, 2),
                                        "mask_vs_free_step": round(mask / (free * 1e3), 4),
                                        "tokens_free": n_free, "tokens_constrained": n_con}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48, help="tokens decoded per row")
    ap.add_argument("--batch-sizes", default="1,16", help="comma-separated")
    ap.add_argument("--reps", type=int, default=2, help="best of this many runs per setting")
    ap.add_argument("--precision", default="fp32", help="decode weights of the embedded model")
    ap.add_argument("--throughput", default="", help="also measure eval throughput for these agents "
                    "(comma-separated: pal,cot,react), batched vs one at a time")
    ap.add_argument("--skip-overhead", action="store_true", help="only the throughput part")
    import runtime_throughput  # benchmarks/ is on sys.path when this file runs as a script

    runtime_throughput.add_args(ap, shared=False)
    args = ap.parse_args()
    from ragloop.models.loading import load_policy

    cpu0 = time.process_time()
    policy = load_policy(precision=args.precision)
    res = {"bench": "runtime", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
           "precision": args.precision}
    if not args.skip_overhead:
        res["constrained_overhead"] = constrained_overhead(policy, [int(b) for b in args.batch_sizes.split(",")],
                                                           args.tokens, args.reps)
    for agent in [a for a in args.throughput.split(",") if a]:
        args.agent = agent
        res[f"throughput_{agent}"] = runtime_throughput.measure(args)
    res["cpu_s"] = round(time.process_time() - cpu0, 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()

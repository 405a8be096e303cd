"""Does SFT's gradient-norm penalty reduce forgetting? Two SFT runs at equal steps from the same start, one
with ``grad_norm_penalty = 0`` (the baseline, measured in the same run) and one with ``COEF``.

- Model: the embedded SmolLM2-135M-Instruct (``--policy``), full fine-tuning (``--method``), same seed, data
  order, learning rate, clipping and steps in both runs.
- Task (what SFT learns): GSM8K ``train.jsonl`` rows ``[0, --train-rows)`` as chat rows (question → worked
  solution, calculator annotations ``<<…>>`` removed): a narrow format, the kind of SFT that forgets.
  Learning is the per-token NLL on the next ``--task-eval`` train rows (never trained on), before and after.
- Forgetting probe: the per-token NLL of the first ``--general`` HH harmless-base *chosen* dialogues (the
  improve loop's probe, ``improve._general_rows``), before and after; forgetting = after − before.
- Penalty: ``L + λ‖∇θ L‖²`` by double backprop (``ragloop.alignment.sft``; Barrett & Dherin 2021).

Prints progress to stderr and one JSON line last: each run's forgetting, task NLL, wall and CPU seconds, and
the ratios penalty / baseline (forgetting, task-NLL gain, CPU time). The data read from ../shared/data is
never copied. Usage (the figures in RESULTS.md)::

    OMP_NUM_THREADS=1 python benchmarks/bench_grad_penalty.py --steps 8 --batch-size 2 --lr 2e-4 \
        --train-rows 16 --task-eval 4 --general 4 --max-length 256 --coef 0.005

λ = 0.005 was set from the gradient scale before the comparison ran: on this data the NLL gradient norm
is ~6-13 and the penalty's own gradient ``2λ·H∇L`` had norm ~84 at λ = 0.05 (so it swamped the NLL's);
0.005 makes the two comparable. Every step is clipped to norm 1 in both runs (the default
``max_grad_norm``), so both take equally long steps and differ only in direction. The penalised run of the
135M model peaks at ~6.5 GB resident (the double backward keeps the first backward's graph); one at batch 2
was OOM-killed on the shared 23 GB machine, hence ``--batch-size 1`` in the second recorded run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from ragloop.alignment.data import SFTRow, hh_transcript_to_messages
from ragloop.alignment.masking import tokenize_rows
from ragloop.alignment.sft import SFTConfig, mean_nll, run_sft
from ragloop.models.loading import load_policy

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def read_jsonl(path: Path, start: int, n: int) -> list[dict]:
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= start + n:
                break
            if i >= start:
                out.append(json.loads(line))
    return out


def gsm8k_rows(start: int, n: int) -> list[SFTRow]:
    rows = []
    for r in read_jsonl(DATA / "gsm8k" / "train.jsonl", start, n):
        answer = re.sub(r"<<[^>]*>>", "", r["answer"])
        rows.append(SFTRow(messages=[{"role": "user", "content": r["question"]},
                                     {"role": "assistant", "content": answer}], source="gsm8k"))
    return rows


def general_rows(n: int) -> list[SFTRow]:
    out = []
    for r in read_jsonl(DATA / "hh_rlhf" / "harmless_base_pairs_dev.jsonl", 0, n):
        msgs = hh_transcript_to_messages(r["chosen"])
        if msgs and msgs[-1].role == "assistant":
            msgs = [m.model_copy(update={"trainable": m.role == "assistant"}) for m in msgs]
            out.append(SFTRow(messages=msgs, source="general"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="default", help="policy spec (default: the embedded SmolLM2)")
    ap.add_argument("--method", default="full", choices=["full", "lora"], help="SFT method of both runs")
    ap.add_argument("--coef", type=float, default=0.05, help="the penalty λ of the second run")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of each run")
    ap.add_argument("--batch-size", type=int, default=2, help="rows per step")
    ap.add_argument("--lr", type=float, default=5e-5, help="learning rate of both runs")
    ap.add_argument("--max-length", type=int, default=256, help="longer rows are dropped")
    ap.add_argument("--train-rows", type=int, default=40, help="GSM8K train rows to fine-tune on")
    ap.add_argument("--task-eval", type=int, default=16, help="following GSM8K rows for the task NLL")
    ap.add_argument("--general", type=int, default=16, help="HH chosen dialogues for the forgetting probe")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    train, task_eval, general = gsm8k_rows(0, args.train_rows), gsm8k_rows(args.train_rows, args.task_eval), \
        general_rows(args.general)
    base = load_policy(args.policy)
    start_state = copy.deepcopy(base.model.state_dict())
    task_ex, _ = tokenize_rows(task_eval, base.render, base.tokenizer, max_length=args.max_length)
    task_before = mean_nll(base.model, task_ex, base.pad_id, batch_size=4)

    runs = {}
    for label, coef in (("baseline", 0.0), ("penalty", args.coef)):
        base.model.load_state_dict(start_state)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = SFTConfig(out_dir=tmp, method=args.method, lr=args.lr, batch_size=args.batch_size,
                            max_steps=args.steps, max_length=args.max_length, seed=args.seed, export=False,
                            save_every=10**6, grad_norm_penalty=coef, eval_batch_size=4)
            t0, c0 = time.perf_counter(), time.process_time()
            res = run_sft(cfg, base, train, general_rows=general,
                          progress=lambda r, lb=label: print(lb, json.dumps({k: round(v, 4) if isinstance(v, float)
                                                                            else v for k, v in r.items()}),
                                                           file=sys.stderr, flush=True))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        task_after = mean_nll(base.model, task_ex, base.pad_id, batch_size=4)
        runs[label] = {
            "coef": coef, "steps": res.steps,
            "general_nll_before": round(res.general_nll_before, 4), "general_nll_after": round(res.general_nll_after, 4),
            "forgetting": round(res.forgetting, 4), "task_nll_before": round(task_before, 4),
            "task_nll_after": round(task_after, 4), "task_gain": round(task_before - task_after, 4),
            "first_grad_norm": round(res.history[0]["grad_norm"], 3), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        }
        print(label, json.dumps(runs[label]), file=sys.stderr, flush=True)

    b, p = runs["baseline"], runs["penalty"]
    out = {
        "bench": "grad_norm_penalty_forgetting",
        "policy": base.name, "method": args.method, "lr": args.lr, "batch_size": args.batch_size,
        "train_rows": len(train), "task_eval_rows": len(task_eval), "general_rows": len(general),
        "baseline": b, "penalty": p,
        "forgetting_ratio": round(p["forgetting"] / b["forgetting"], 3) if b["forgetting"] else None,
        "task_gain_ratio": round(p["task_gain"] / b["task_gain"], 3) if b["task_gain"] else None,
        "cpu_time_ratio": round(p["cpu_s"] / b["cpu_s"], 2) if b["cpu_s"] else None,
        "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

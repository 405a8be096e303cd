"""Does the rollout/training mismatch matter for GRPO? Importance-ratio statistics of reduced-precision rollouts.

GRPO (``ragloop.alignment.grpo``) trains the fp32 weights on tokens that the decode engine sampled, possibly
with reduced-precision weights (``--rollout-precision bf16|int8|int4``). This script runs the same PAL
episodes (the embedded SmolLM2-135M, GSM8K training questions, K samples each, temperature 1, same seeds)
with fp32 rollouts (the baseline, measured in the same run) and with each reduced precision, then scores
every generated token under the fp32 training forward and reports, per precision, the statistics of the
per-token ratio w = π_train/π_rollout: mean |log w|, the share of tokens with w > C (what truncated
importance sampling caps, Yao et al. 2025) or w < 1/C, the mean truncated weight, and the sequence-level
ratio spread. Ratio to the fp32 baseline: how many times the fp32 noise floor a precision's mismatch is.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_grpo_is.py --questions 4 --samples 4 --precisions bf16,int4

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=4, help="GSM8K training questions (the first N)")
    ap.add_argument("--samples", type=int, default=4, help="episodes per question")
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens per PAL program")
    ap.add_argument("--precisions", default="bf16,int4", help="reduced rollout precisions to compare with fp32")
    ap.add_argument("--cap", type=float, default=2.0, help="C of the truncated importance weight")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    args = ap.parse_args()

    import torch

    from ragloop.agents.pal import PALAgent, PALConfig
    from ragloop.agents.sandbox import Sandbox
    from ragloop.alignment.collect import run_agent_batched
    from ragloop.alignment.grpo import call_rows
    from ragloop.alignment.ppo import build_episode_batch, forward_episodes
    from ragloop.models.loading import load_policy
    from ragloop.models.local import LocalPolicy
    from ragloop.models.types import GenerationConfig

    rows_in = [json.loads(x) for x in Path(args.data).read_text(encoding="utf-8").splitlines()[: args.questions]]
    questions = [r["question"] for r in rows_in]
    base = load_policy(precision="fp32")
    sandbox = Sandbox()

    def make(pol, sb):
        return PALAgent(pol, PALConfig(shots=0, max_new_tokens=args.max_tokens, prompt_style="raw", prefill=True),
                        sandbox=sb)

    results = {}
    for prec in ["fp32", *[p for p in args.precisions.split(",") if p]]:
        pol = LocalPolicy.from_model(base.model, base.tokenizer, name=base.name, precision=prec)
        t0, c0 = time.perf_counter(), time.process_time()
        groups = run_agent_batched(make, pol, questions, samples=args.samples, sandbox=sandbox,
                                   decoding=GenerationConfig(max_new_tokens=args.max_tokens, temperature=1.0,
                                                             seed=11, logprobs=True))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows = [r for e, t in enumerate(tr for g in groups for tr in g) for r in call_rows(t, e)]
        logw, seq = [], []
        with torch.no_grad():
            for s in range(0, len(rows), 8):
                mb = rows[s : s + 8]
                b = build_episode_batch([r.prompt_ids for r in mb], [r.token_ids for r in mb], base.pad_id)
                lp, _, _ = forward_episodes(base.model, None, b)  # (B, L) fp32 training forward
                for n, r in enumerate(mb):
                    lw = lp[n, : len(r.token_ids)] - torch.tensor(r.rollout_logprobs)  # log π_train − log π_rollout
                    logw.append(lw)
                    seq.append(float(lw.sum()))
        lw = torch.cat(logw)
        w = lw.exp()
        results[prec] = {
            "tokens": int(lw.numel()), "mean_abs_log_w": float(lw.abs().mean()), "max_abs_log_w": float(lw.abs().max()),
            "frac_w_gt_cap": float((w > args.cap).float().mean()), "frac_w_lt_1_over_cap": float((w < 1 / args.cap).float().mean()),
            "mean_w_truncated": float(w.clamp(max=args.cap).mean()),
            "seq_abs_log_w_mean": sum(abs(x) for x in seq) / len(seq),
            "rollout_wall_s": round(wall, 1), "rollout_cpu_s": round(cpu, 1),
        }
        print(json.dumps({"precision": prec, **results[prec]}), file=sys.stderr)
    floor = max(results["fp32"]["mean_abs_log_w"], 1e-12)
    for r in results.values():
        r["mean_abs_log_w_ratio_to_fp32"] = r["mean_abs_log_w"] / floor
    import os

    print(json.dumps({
        "bench": "grpo_is", "model": base.name, "questions": len(questions), "samples": args.samples,
        "max_tokens": args.max_tokens, "cap": args.cap, "baseline": "fp32 rollouts, same run",
        "results": results, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()

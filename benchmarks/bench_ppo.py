"""RL throughput: our PPO (rollout with the fast batched decode path + update) vs TRL's GRPO trainer.

Same model (the embedded SmolLM2-135M-Instruct, fp32, full fine-tuning in both), same prompts (GSM8K-PAL
raw prompts of the first training questions, prefilled with ``def solution():`` + docstring), same reward
(the completion must parse as the body of a Python function and contain a ``return`` — a cheap format
check), same episodes per step (``--prompts`` × ``--samples``), same completion limit, same KL coefficient
(TRL's ``beta``; our ``kl_coef``), one process, one run. Figure: generated tokens per second including the
update (the calibration's unit), after one warm-up step that is not timed.

Needs the optional ``[bench]`` extra (``pip install trl``); prints one JSON line last.

    .venv/bin/python benchmarks/bench_ppo.py --steps 3
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def format_reward(completion: str) -> float:
    """1 if ``def f():\\n`` + completion parses and returns something, else 0 (shared by both trainers)."""
    try:
        tree = ast.parse("def f():\n" + completion)
    except SyntaxError:
        return 0.0
    return 1.0 if any(isinstance(n, ast.Return) for n in ast.walk(tree)) else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per trainer (after one warm-up step)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step")
    ap.add_argument("--samples", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-ppo")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    try:
        import trl
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        print(json.dumps({"bench": "ppo_vs_grpo", "skipped": "trl is not installed (pip install '.[bench]')"}))
        return
    from ragloop.agents.pal import PALAgent, PALConfig
    from ragloop.agents.runtime import first_call
    from ragloop.alignment.ppo import PPOConfig, PPOItem, make_reward_fn, run_ppo
    from ragloop.models.loading import load_policy

    rows = [json.loads(x) for x in (ROOT / ".." / "shared" / "data" / "gsm8k" / "train.jsonl").open()][:64]
    policy = load_policy()
    agent = PALAgent(policy, PALConfig(shots=0, max_new_tokens=args.max_tokens))
    prompts = [first_call(agent, r["question"]).prompt for r in rows]  # the agent's exact prompts, not decoded
    stops = agent._decoding().stop
    episodes = args.prompts * args.samples

    # ---- ours ---------------------------------------------------------------------------------------
    times: list[float] = []
    gen_tokens: list[float] = []

    def on_row(row: dict) -> None:
        times.append(row["time/iteration_s"])
        gen_tokens.append(row["tokens/response_len_mean"] * episodes)

    items = [PPOItem(prompt=p) for p in prompts]
    t0 = time.perf_counter()
    run_ppo(PPOConfig(out_dir=f"{args.out}/ours", iterations=args.steps + 1, batch_prompts=args.prompts,
                      samples_per_prompt=args.samples, max_new_tokens=args.max_tokens, stop=stops, lora=False,
                      lr=args.lr, kl_coef=args.kl_coef, minibatch_size=episodes, ppo_epochs=1, export=False,
                      save_every=10_000), policy, items, make_reward_fn(check=lambda it, c: format_reward(c)),
            progress=on_row)
    ours_wall = time.perf_counter() - t0
    ours_tps = sum(gen_tokens[1:]) / sum(times[1:])

    # ---- TRL GRPO on a fresh copy of the same model ----------------------------------------------------
    fresh = load_policy()
    tok = fresh.tokenizer
    # TRL builds its KL reference model by re-reading config.json (architectures) from the model's path; the
    # config converted from GGUF does not name its architecture, so hand TRL a plain HF copy (local, no hub)
    trl_dir = Path(args.out) / "trl-model"
    fresh.model.save_pretrained(trl_dir)
    tok.save_pretrained(trl_dir)
    tok.padding_side = "left"
    cfg = GRPOConfig(output_dir=f"{args.out}/trl", use_cpu=True, bf16=False, max_steps=args.steps + 1,
                     per_device_train_batch_size=episodes, num_generations=args.samples,
                     max_completion_length=args.max_tokens, beta=args.kl_coef, learning_rate=args.lr,
                     logging_steps=1, report_to=[], save_strategy="no", temperature=1.0, seed=0)
    step_times: list[float] = []
    step_tokens: list[float] = []

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                step_tokens.append(logs["completions/mean_length"] * episodes)

    def trl_reward(prompts, completions, **kw):
        return [format_reward(c) for c in completions]

    ds = Dataset.from_dict({"prompt": prompts})
    trainer = GRPOTrainer(model=str(trl_dir), reward_funcs=trl_reward, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Timer()])
    t0 = time.perf_counter()
    trainer.train()
    trl_wall = time.perf_counter() - t0
    n = min(len(step_times), len(step_tokens))
    trl_tps = sum(step_tokens[1:n]) / sum(step_times[1:n]) if n > 1 else float("nan")

    print(json.dumps({
        "bench": "ppo_vs_grpo", "model": "SmolLM2-135M-Instruct (embedded, fp32, full fine-tuning)",
        "episodes_per_step": episodes, "max_new_tokens": args.max_tokens, "timed_steps": args.steps,
        "ours_generated_tok_per_s": round(ours_tps, 2), "ours_s_per_step": round(sum(times[1:]) / max(1, len(times) - 1), 2),
        "trl_grpo_generated_tok_per_s": round(trl_tps, 2),
        "trl_s_per_step": round(sum(step_times[1:n]) / max(1, n - 1), 2) if n > 1 else None,
        "speedup": round(ours_tps / trl_tps, 2) if trl_tps == trl_tps and trl_tps > 0 else None,
        "trl_version": trl.__version__, "threads": args.threads,
        "wall_s": {"ours": round(ours_wall, 1), "trl": round(trl_wall, 1)},
    }))


if __name__ == "__main__":
    main()

"""``ragloop serve`` throughput: aggregate generated tokens per second with 1, 4 and 16 concurrent clients
against the same requests sent one by one (the baseline, measured in the same run).

The embedded SmolLM2-135M-Instruct is served by a real uvicorn server on 127.0.0.1 (``ServerThread``); the
clients are threads using the official ``openai`` client, each taking the next request from one shared list
(``--requests`` chat prompts, greedy, ``--max-tokens`` tokens). Concurrent requests are decoded together by
the policy's decode engine (continuous batching, ``ragloop.models.engine``). Every configuration sends the
same requests, and the greedy answers are checked to be identical to the one-by-one answers
(``same_answers``). Tokens are the server's reported ``completion_tokens``. CPU seconds are this process's
(server and clients), so ``cpu_s`` shows what the speed cost; ``cpu_capability`` and the load average are
recorded with the figures. Goal (issue 12): >= 4x the one-by-one tokens/s at 16 clients.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve.py`` (last line: one JSON object).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch

PROMPTS = [
    "Name a fruit and describe its taste.",
    "Explain what a compiler does.",
    "Why is the sky blue?",
    "Give one tip for learning a language.",
    "What is photosynthesis?",
    "Describe a cat in two sentences.",
    "How does a bicycle stay upright?",
    "What is the capital of France known for?",
    "Write a haiku about rain.",
    "What does a database index do?",
    "Why do we sleep?",
    "Explain gravity to a child.",
    "What is a prime number?",
    "How do bees make honey?",
    "Suggest a name for a pet turtle.",
    "What is the water cycle?",
]


def run_clients(base_url: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """Send every prompt once with ``clients`` concurrent clients; answers in prompt order + timings."""
    import openai

    answers: list[str | None] = [None] * len(prompts)
    tokens = [0] * len(prompts)
    nxt = iter(range(len(prompts)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        c = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=600)
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            try:
                r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompts[i]}],
                                              temperature=0, max_tokens=max_tokens)
            except BaseException as e:  # reported after the run
                errors.append(e)
                return
            answers[i] = r.choices[0].message.content
            tokens[i] = r.usage.completion_tokens

    threads = [threading.Thread(target=client) for _ in range(clients)]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]!r}")
    total = sum(tokens)
    return {"answers": answers, "tokens": total, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "tok_per_s": round(total / wall, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32, help="requests per configuration (prompts cycle)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per answer at most")
    ap.add_argument("--clients", default="1,4,16", help="concurrent client counts to measure")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("RAGLOOP_THREADS", "1")),
                    help="torch threads for the model")
    ap.add_argument("--precision", default="fp32", help="decode precision of the served policy")
    ap.add_argument("--policy", default=None, help="policy spec (default: the embedded SmolLM2)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from ragloop.models.loading import load_policy
    from ragloop.serve import ServeConfig, ServerThread, create_app

    load_before = round(os.getloadavg()[0], 2)
    policy = load_policy(args.policy, precision=args.precision)
    prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (take {i // len(PROMPTS) + 1})")
               for i in range(args.requests)]
    counts = [int(c) for c in args.clients.split(",")]
    with ServerThread(create_app(policy, ServeConfig())) as srv:
        mode = srv.server.config.app.state.ragloop.decoder.mode
        run_clients(srv.base_url, policy.name, prompts[:2], 1, 4)  # warm-up (fast-path build, first prefill)
        base = run_clients(srv.base_url, policy.name, prompts, 1, args.max_tokens)
        print(f"one by one: {base['tok_per_s']} tok/s ({base['tokens']} tokens in {base['wall_s']} s)", file=sys.stderr)
        runs = {}
        for c in counts:
            r = run_clients(srv.base_url, policy.name, prompts, c, args.max_tokens)
            r["ratio"] = round(r["tok_per_s"] / base["tok_per_s"], 2)
            r["same_answers"] = r.pop("answers") == base["answers"]
            runs[str(c)] = r
            print(f"{c} clients: {r['tok_per_s']} tok/s, {r['ratio']}x, same answers: {r['same_answers']}",
                  file=sys.stderr)
    base.pop("answers")
    out = {
        "bench": "serve",
        "policy": policy.name,
        "precision": args.precision,
        "decode_mode": mode,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "baseline_one_by_one": base,
        "clients": runs,
        "ratio_16_clients": runs.get("16", {}).get("ratio"),
        "goal_16_clients": 4.0,
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg_1m": [load_before, round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

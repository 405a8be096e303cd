"""Checks the scale-out serving path on a GPU machine: ragloop's agents against a vLLM server through
``--policy openai:MODEL@URL`` (README "Scale-out"). Without a GPU or without vLLM it prints why and skips.

What it does, with ``--model DIR`` (a local Hugging Face model directory; nothing is downloaded):

1. starts ``vllm serve DIR --served-model-name NAME --port P --enable-auto-tool-choice --tool-call-parser
   hermes`` (or uses ``--base-url`` of a server already running) and waits for ``/health``;
2. through ``OpenAIPolicy``: greedy chat answers, a raw completion, a stream equal to the greedy text,
   ``n=4`` samples, logprobs, ``count_tokens``/``render`` (vLLM's ``/tokenize``/``/detokenize``), and a
   JSON-schema-constrained answer (vLLM's ``guided_json``);
3. the CoT agent on two GSM8K-style questions over the server (its Trace records the policy id);
4. LangChain's ``ChatOpenAI.bind_tools`` on the same server (vLLM's own tool parser);
5. speed: the same 16 chat requests one by one vs 16 concurrent (aggregate tokens/s, same run).

The last line printed is one JSON object: ``{"skipped": true, "reason": ...}`` or the checks and figures.
Run: ``python benchmarks/check_vllm.py --model /models/Qwen2.5-1.5B-Instruct``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def skip(reason: str) -> int:
    print(f"skipped: {reason}", file=sys.stderr)
    print(json.dumps({"check": "vllm", "skipped": True, "reason": reason}))
    return 0


def gpu_present() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"vllm did not become healthy within {timeout:.0f} s")


def run_checks(spec: str, base_url: str, name: str) -> dict[str, Any]:
    from ragloop.agents.cot import CoTAgent
    from ragloop.models.loading import load_policy
    from ragloop.models.types import GenerationConfig, GrammarSpec

    pol = load_policy(spec)
    msgs = [{"role": "user", "content": "What is 12 times 7? Answer with the number."}]
    greedy = GenerationConfig(greedy=True, max_new_tokens=48)
    checks: dict[str, Any] = {"context_window": pol.context_window}
    g = pol.generate(msgs, greedy)[0]
    checks["chat_text"] = g.text[:120]
    checks["stream_equals_greedy"] = "".join(pol.stream(msgs, greedy)) == g.text
    checks["completion"] = pol.generate("The capital of France is", GenerationConfig(greedy=True, max_new_tokens=8))[0].text
    samples = pol.generate(msgs, GenerationConfig(temperature=1.0, n=4, max_new_tokens=16, seed=0))
    checks["n_samples"] = len(samples)
    lp = pol.generate(msgs, GenerationConfig(greedy=True, max_new_tokens=8, logprobs=True))[0]
    checks["logprobs"] = bool(lp.logprobs) and all(v <= 0 for v in lp.logprobs)
    checks["token_ids_from_server"] = bool(lp.token_ids)
    checks["count_tokens"] = pol.count_tokens(msgs)
    checks["render_prefix"] = pol.render(msgs)[:60]
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    js = pol.generate(msgs, GenerationConfig(greedy=True, max_new_tokens=32,
                                             grammar=GrammarSpec("json_schema", json.dumps(schema))))[0].text
    try:
        checks["json_schema_valid"] = isinstance(json.loads(js).get("answer"), int)
    except ValueError:
        checks["json_schema_valid"] = False
    agent = CoTAgent(pol)
    traces = [agent.run(q) for q in ("Tom has 3 apples and buys 5 more. How many apples does he have?",
                                     "A book costs $4. How much do 6 books cost?")]
    checks["cot_answers"] = [t.answer for t in traces]
    checks["cot_policy_recorded"] = all(t.policy == pol.name for t in traces)
    from langchain_openai import ChatOpenAI

    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                               "required": ["city"]}}}
    llm = ChatOpenAI(model=name, base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"), temperature=0)
    call = llm.bind_tools([weather], tool_choice="required").invoke("What is the weather in Paris?")
    checks["langchain_tool_call"] = [c["name"] for c in call.tool_calls] == ["get_weather"]

    prompts = [[{"role": "user", "content": f"Write one sentence about the number {i}."}] for i in range(16)]
    cfg = GenerationConfig(greedy=True, max_new_tokens=64)
    t0 = time.perf_counter()
    seq = [pol.generate(p, cfg)[0] for p in prompts]
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as ex:
        par = list(ex.map(lambda p: pol.generate(p, cfg)[0], prompts))
    t_par = time.perf_counter() - t0
    tok_seq = sum(len(x.logprobs or []) or len(x.text.split()) for x in seq)
    tok_par = sum(len(x.logprobs or []) or len(x.text.split()) for x in par)
    speed = {"one_by_one_s": round(t_seq, 2), "concurrent_16_s": round(t_par, 2),
             "ratio": round(t_seq / t_par, 2), "units": "seconds for the same 16 requests",
             "same_answers": [x.text for x in seq] == [x.text for x in par], "approx_tokens": [tok_seq, tok_par]}
    return {"checks": checks, "speed": speed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="local Hugging Face model directory for vllm serve")
    ap.add_argument("--base-url", help="use a vLLM server already running (e.g. http://127.0.0.1:8000/v1)")
    ap.add_argument("--name", default="checked-model", help="served model name")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--startup-timeout", type=float, default=900)
    args = ap.parse_args(argv)

    if args.base_url is None:
        if not gpu_present():
            return skip("no NVIDIA GPU on this machine (nvidia-smi -L failed); run this on a GPU host")
        if shutil.which("vllm") is None:
            return skip("vLLM is not installed (pip install vllm on the GPU host)")
        if not args.model or not os.path.isdir(args.model):
            return skip("give --model DIR, a local Hugging Face model directory (nothing is downloaded)")
    proc = None
    base_url = args.base_url or f"http://127.0.0.1:{args.port}/v1"
    if args.base_url is None:
        cmd = ["vllm", "serve", args.model, "--served-model-name", args.name, "--port", str(args.port),
               "--host", "127.0.0.1", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
        print("starting: " + " ".join(cmd), file=sys.stderr)
        proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    try:
        wait_healthy(base_url.removesuffix("/v1"), proc, args.startup_timeout)
        result = run_checks(f"openai:{args.name}@{base_url}", base_url, args.name)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    ok = all(v for k, v in result["checks"].items() if isinstance(v, bool))
    print(json.dumps({"check": "vllm", "skipped": False, "ok": ok, "base_url": base_url, **result}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""``ragloop serve`` as a user runs it: a real process on a free loopback port, stopped by the test; the one
real-model test of the server (plain chat, a grammar-constrained required tool call and JSON schema, capture)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from typer.testing import CliRunner

from ragloop.cli import app
from tests.serve.conftest import WEATHER


def test_bad_options_are_one_line_errors():
    res = CliRunner().invoke(app, ["serve", "--port", "70000"])
    assert isinstance(res.exception, Exception) and "--port must be in 0..65535" in str(res.exception)
    res = CliRunner().invoke(app, ["serve", "--max-tokens", "0"])
    assert "--max-tokens must be a positive integer" in str(res.exception)


def test_help_has_an_example():
    res = CliRunner().invoke(app, ["serve", "--help"])
    assert res.exit_code == 0 and "Example" in res.output and "--capture" in res.output


@pytest.mark.e2e
def test_serve_process_answers_and_stops(tmp_path):
    from ragloop.core.config import cache_dir

    # a temporary home, but the shared converted-model cache (no second GGUF conversion)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAGLOOP_HOME": str(tmp_path), "RAGLOOP_CACHE": str(cache_dir())}
    ragloop = os.path.join(os.path.dirname(sys.executable), "ragloop")
    proc = subprocess.Popen([ragloop, "serve", "--port", "0", "--precision", "fp32",
                             "--capture", str(tmp_path / "cap")], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 300
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"ragloop serve exited with {proc.returncode}")
            if line.startswith("serving "):
                url = line.split(" on ")[1].split()[0]
        assert url and url.startswith("http://127.0.0.1:")
        assert httpx.get(url.removesuffix("/v1") + "/health").json()["status"] == "ok"
        r = httpx.post(f"{url}/chat/completions", timeout=120, json={
            "model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
        # grammar-constrained decoding makes the 135M model emit a valid required call and schema-valid JSON
        c = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=40, tools=[WEATHER],
                                      tool_choice="required",
                                      messages=[{"role": "user", "content": "What is the weather in Paris?"}])
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
        schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
        r = c.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=20,
                                      messages=[{"role": "user", "content": "What is 2+2?"}],
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "a", "schema": schema}})
        assert isinstance(json.loads(r.choices[0].message.content)["answer"], int)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully, the CLI exits 130
        proc.wait(timeout=60)
    assert proc.returncode in (0, 130)
    assert (tmp_path / "cap" / "traces.jsonl").read_text().count("\n") == 3

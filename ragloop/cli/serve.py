"""``ragloop serve``: an OpenAI-compatible HTTP server over a policy (thin: parse, load, call ``serve``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

from ragloop.core.errors import UsageError

POLICY_HELP = ("Model: 'default' (embedded SmolLM2), an HF directory, a .gguf file, a ragloop checkpoint, "
               "or openai:MODEL@URL (proxy another server).")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_cmd(
    policy: str | None = typer.Option(None, "--policy", envvar="RAGLOOP_POLICY", help=POLICY_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1 = this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0 = any free port)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="RAGLOOP_SERVE_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' on every /v1 call."),
    model_name: str | None = typer.Option(None, "--model-name",
                                          help="The model id clients send (default: the policy's name)."),
    capture: Path | None = typer.Option(None, "--capture",
                                        help="Write every call as a Trace to DIR/traces.jsonl (for ragloop train)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens to generate when a request gives no max_tokens."),
    precision: str = typer.Option("auto", "--precision", envvar="RAGLOOP_PRECISION",
                                  help="Fast decode path weights: auto (the fastest that passed the quality gate on "
                                       "this CPU), fp32 (exact), bf16, int8 or int4."),
    backend: str = typer.Option("auto", "--backend", help="Decode path: auto, hf or fast."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype: float32, bfloat16, float16."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level: debug, info, warning, error."),
) -> None:
    """Serve a policy over the OpenAI API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

    Example:

        ragloop serve --port 8000 --capture runs/served

        python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-');
        print(c.chat.completions.create(model='smollm2-135m-instruct',
        messages=[{'role': 'user', 'content': 'Hi'}]).choices[0].message.content)"
    """
    from ragloop.cli.models import _policy_spec
    from ragloop.models.loading import load_policy
    from ragloop.serve import ServeConfig, create_app, serve

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {port}")
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be a positive integer, got {max_tokens}")
    if not _is_loopback(host) and not api_key:
        typer.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use the model",
                   err=True)
    pol = load_policy(_policy_spec(policy), dtype=dtype, backend=backend, precision=precision)
    cfg = ServeConfig(model_name=model_name, api_key=api_key, default_max_tokens=max_tokens,
                      capture_dir=str(capture) if capture else None)
    app = create_app(pol, cfg)
    name = model_name or pol.name
    note = f"; capturing traces to {capture}/traces.jsonl" if capture else ""
    serve(app, host, port, log_level=log_level,
          announce=lambda url: typer.echo(f"serving {name} on {url} (Ctrl-C stops){note}", err=True))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)

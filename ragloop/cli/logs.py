"""``ragloop logs``: read the local log of ``ask`` / ``chat`` exchanges, or export it as training traces.

Thin command over ``ragloop.core.logs``. ``--traces FILE`` writes the logged Traces as JSONL, the input of
``ragloop train sft --traces FILE --all-traces`` (logged answers are unjudged, and ``train sft`` keeps only
correct traces unless told otherwise) and of ``cai revise`` / ``rlaif label``.
"""

from __future__ import annotations

import json

import typer

from ragloop.core.errors import UsageError


def _safe(text: str) -> str:
    from ragloop.agents.safety import neutralize_control

    return neutralize_control(text)


def logs_cmd(
    n: int = typer.Option(10, "-n", "--count", help="Show the last N exchanges (0 = all)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per exchange (no trace bodies)."),
    traces: str | None = typer.Option(None, "--traces", help="Write the last N exchanges' Traces to this JSONL "
                                      "file (input of `ragloop train sft --traces`)."),
    path: bool = typer.Option(False, "--path", help="Print the log file's path and exit."),
) -> None:
    """Show the logged ask/chat exchanges (question, answer, agent, sources count), newest last.

    Every `ragloop ask` and `ragloop chat` exchange is logged to $RAGLOOP_HOME/logs.db unless --no-log.

    Examples:
      ragloop logs -n 5
      ragloop logs --json
      ragloop logs -n 0 --traces logged.jsonl
      ragloop train sft --traces logged.jsonl --all-traces --lora --out ckpt/sft   # logged answers are unjudged
    """
    from ragloop.core.logs import log_path, recent_exchanges
    from ragloop.core.trace import write_traces

    if path:
        typer.echo(str(log_path()))
        return
    if n < 0:
        raise UsageError(f"-n must be >= 0, got {n}", hint="ragloop logs -n 5 (0 shows all)")
    entries = recent_exchanges(n or None)
    if traces:
        count = write_traces(traces, [e.trace() for e in entries])
        typer.echo(f"wrote {count} traces to {traces}")
        return
    if as_json:
        for e in entries:
            typer.echo(json.dumps(e.to_dict(), ensure_ascii=False))
        return
    if not entries:
        typer.echo("the log is empty")
        return
    for e in entries:
        d = e.to_dict()
        where = f" · index {e.index}" if e.index else ""
        fb = f" · fallback {e.fallback}" if e.fallback else ""
        secs = f" · {e.seconds:.1f}s" if e.seconds is not None else ""
        typer.echo(f"#{e.id} {d['created_at']} · {e.command} · {e.agent}{where}{fb}{secs}")
        typer.echo(f"  Q: {_safe(e.question.strip())}")
        typer.echo(f"  A: {_safe((e.answer or '(no answer)').strip())}")
        n_src = len(json.loads(e.trace_json).get("sources") or [])
        if n_src:
            typer.echo(f"  sources: {n_src} passages (ragloop logs --json, or --traces FILE for the full record)")


def register(app: typer.Typer) -> None:
    app.command("logs")(logs_cmd)

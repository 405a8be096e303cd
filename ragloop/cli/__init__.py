"""The ``ragloop`` command: a thin tree over library functions.

Each area registers its commands from its own module (``ragloop/cli/<area>.py`` exposes ``register(app)``),
so the command tree grows without one giant file. Heavy imports (torch, transformers, faiss) happen inside
the commands, so ``ragloop --help`` is instant.

User-facing errors (``RagloopError``) print one clear line to stderr and exit with the error's code;
``--debug`` (or ``RAGLOOP_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from ragloop.core.config import set_offline_defaults
from ragloop.core.errors import RagloopError

app = typer.Typer(
    name="ragloop",
    help="Local-first agentic RAG and tool use, with an alignment loop trained on the agents' own traces.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Areas whose modules register commands; a module that does not exist yet is skipped.
_AREAS = ("models", "retrieval", "tools", "agents", "alignment", "logs", "serve")


THREADS_HELP = ("Threads for torch, the embedder, FAISS and tokenizers (also $RAGLOOP_THREADS). Default: the "
                "physical cores this process may use (affinity, cgroup quota) that other work is not using now.")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Log what is chosen and why (threads, CPU kernels, what --precision auto became)."),
) -> None:
    """Local-first agentic RAG and tool use, with an alignment loop trained on the agents' own traces.

    Example: ragloop --threads 1 --verbose ask "What is 2+2?" --agent pal
    """
    if debug:
        os.environ["RAGLOOP_DEBUG"] = "1"
    if verbose:
        _log_to_stderr()
    from ragloop.models.cpu import configure_threads

    configure_threads(threads)  # once, before any model or index is loaded


def _log_to_stderr() -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ragloop: %(message)s"))
    logger = logging.getLogger("ragloop")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _register_all() -> None:
    for area in _AREAS:
        try:
            mod = importlib.import_module(f"ragloop.cli.{area}")
        except ModuleNotFoundError as e:
            if e.name == f"ragloop.cli.{area}":
                continue
            raise
        mod.register(app)


_register_all()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line and return the Exit to raise (for checks done in the CLI layer)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning RagloopError into one line and an exit code."""
    set_offline_defaults()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("RAGLOOP_DEBUG") == "1"
    try:
        # In non-standalone mode click returns the code of a `typer.Exit` instead of raising it.
        rc = app(args=argv, standalone_mode=False)
    except RagloopError as e:
        if debug:
            raise
        typer.echo(f"error: {e.message}", err=True)
        if e.hint:
            typer.echo(f"hint: {e.hint}", err=True)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as e:
        # Usage errors from the (vendored) click layer: typer >= 0.2x ships its own click copy, so match by
        # behaviour rather than by class.
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            return e.exit_code
        if debug:
            raise
        typer.echo(f"error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
        return 1
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

